"""Run a tiny PixArt (random weights) through a DDIM loop serially and as a simulated PipeFusion pipeline.

    python examples/simulate_pixart.py [--stages 2] [--patches 4] [--steps 10]

Prints the plan, the per-step relative difference of the model output (stale K/V makes it non-zero after
the warmup step) and the time per step of both runs. Random weights: the difference is a sanity figure,
not a quality measurement.
"""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler

from pipefusion_compile.models import pixart


def run(model_fn, kwargs, steps, seed=0):
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    latents = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
    outs, times = [], []
    with torch.no_grad():
        for t in sched.timesteps:
            t0 = time.perf_counter()
            out = model_fn(latents, timestep=t.expand(latents.shape[0]), **rest, return_dict=False)[0]
            times.append(time.perf_counter() - t0)
            outs.append(out)
            latents = sched.step(out.chunk(2, dim=1)[0], t, latents).prev_sample
    return latents, outs, times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--patches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, kwargs = pixart(sample_size=32, num_layers=8, heads=4, head_dim=32)
    serial, serial_outs, serial_times = run(model, kwargs, args.steps)
    compiled = torch.compile(model, backend="pipefusion", options={
        "num_stages": args.stages, "num_patches": args.patches, "stage_backend": args.backend})
    piped, piped_outs, piped_times = run(compiled, kwargs, args.steps)

    import pipefusion_compile

    for program in pipefusion_compile.programs(compiled):
        print(program.plan)
    print("\nstep  rel. diff of model output vs serial")
    for i, (a, b) in enumerate(zip(piped_outs, serial_outs)):
        print(f"{i:>4}  {((a - b).norm() / b.norm()).item():.2e}")
    print(f"\nfinal latents rel. diff: {((piped - serial).norm() / serial.norm()).item():.2e}")
    med = lambda xs: sorted(xs[2:])[len(xs[2:]) // 2]  # noqa: E731 (skip the compiling steps)
    print(f"time per step (simulate mode runs every stage in this one process, so no speedup is expected): "
          f"serial {med(serial_times) * 1e3:.1f} ms, pipefusion {med(piped_times) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
