"""Functions the spawned ranks of `test_errors.py` run: small pipelines in which one rank fails on purpose."""
from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

import pipefusion_compile
from toy_models import make_toy


def faulty_pipelines(rank, world, scenarios, out_dir, steps=4):
    """Run the toy DiT once per scenario `(victim, step, patch, fault, options)`, each on a process group of its
    own (a timeout closes the connections of its group only). Rank `victim`, computing `patch` of `step`, exits
    (fault "exit") or sleeps for `fault[1]` seconds (fault ("stall", seconds)). Each rank writes how each run
    ended to `out_dir/s<scenario>_rank<rank>.json` as soon as it ends: the failing call's error type and
    message, and how long that call took (written before a victim exits, so earlier outcomes survive it)."""
    from pipefusion_compile.schedule import StageCall as _StageCall

    groups = [dist.new_group(list(range(world))) for _ in scenarios]
    original = _StageCall.forward
    current = {}

    def forward(self, patch_index, *rest):
        program = self._owner[0]
        if rank == current["victim"] and program.comm.step == current["step"] and patch_index == current["patch"]:
            if current["fault"] == "exit":
                os._exit(17)
            time.sleep(current["fault"][1])
        return original(self, patch_index, *rest)

    _StageCall.forward = forward
    for k, ((victim, step, patch, fault, options), group) in enumerate(zip(scenarios, groups)):
        current.update(victim=victim, step=step, patch=patch, fault=fault)
        torch._dynamo.reset()
        model, kwargs = make_toy(ff_mults=(1, 1))
        compiled = torch.compile(model, backend="pipefusion", options={
            "stage_backend": "eager", "num_patches": 2, "group": group, **options})
        outcome = {"step": None}
        with torch.no_grad():
            for i in range(steps):
                t0 = time.monotonic()
                try:
                    compiled(hidden_states=kwargs["hidden_states"] + 0.1 * i)
                except Exception as e:
                    outcome = {"step": i, "type": type(e).__name__, "message": str(e),
                               "call_s": time.monotonic() - t0,
                               "is_pipefusion": isinstance(e, pipefusion_compile.PipefusionError)}
                    break
        with open(os.path.join(out_dir, f"s{k}_rank{rank}.json"), "w") as f:
            json.dump(outcome, f)
    return "done"
