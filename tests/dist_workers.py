"""Functions the spawned ranks run (importable by the spawned processes)."""
from __future__ import annotations

import torch

import pipefusion_compile
from helpers import call_model, sample_loop
from pipefusion_compile.models import BUILTIN


def generate(rank, world, model_name, options_list, steps):
    """For each options dict: compile the model with pipefusion on this rank and run a DDIM loop."""
    out = []
    for options in options_list:
        torch._dynamo.reset()
        model, kwargs = BUILTIN[model_name]()
        compiled = torch.compile(model, backend="pipefusion", options={"stage_backend": "eager", **options})
        final, per_step = sample_loop(call_model(compiled), kwargs, steps=steps)
        (program,) = pipefusion_compile.programs(compiled)
        out.append({"final": final, "steps": per_step, "stats": dict(program.stats),
                    "plan_bytes": program.plan.p2p_bytes_per_step(program.stage_index),
                    "schedule": str(program.schedule_graph(pipelined=True).graph)})
    return out
