"""What a spawned rank runs for the coverage table's 2-rank column (importable by the spawned processes)."""
from __future__ import annotations

import torch

import pipefusion_compile
from coverage_cases import case_by_name
from helpers import call_model, sample_loop


def run_case_rank(rank, world, name, options, steps, seed=1):
    """Build coverage case `name`, compile it on this rank (one stage per rank), run a DDIM loop."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    case = case_by_name(name)
    model, kwargs = case.build()
    # the plain run first, as in the simulate run this is compared with (tests/coverage_runner.py): a model that
    # fills tables on its first call (Z-Image's rotary tables) then gives dynamo the same graphs here as there
    sample_loop(call_model(model, case.feed), kwargs, steps=steps, seed=seed, feed=case.feed)
    compiled = torch.compile(model, backend="pipefusion", options=options)
    with torch._dynamo.config.patch(**dict(case.dynamo_config)):
        final, per_step = sample_loop(call_model(compiled, case.feed), kwargs, steps=steps, seed=seed,
                                       feed=case.feed)
    found = pipefusion_compile.programs(compiled)
    return {"final": final, "steps": per_step,
            "pipelined": sum(p.stats.get("pipelined_calls", 0) for p in found) > 0}
