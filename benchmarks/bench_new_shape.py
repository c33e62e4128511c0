"""What a new input shape costs, per unchanged diffusers pipeline (tiny random components, CPU).

For each pipeline, in one process with one compiled transformer (default torch.compile settings): the first
call (dynamo trace + plan + lower), a call at a second resolution (dynamo retraces with symbolic sizes; the
backend specializes, plans and lowers for the new shape), and that call again (cached: nothing compiles).
Reported: wall seconds per pipeline call and the backend's own time (specialize + plan + lower), median of
`--repeats` fresh processes' worth of runs in this process (each run starts from a fresh dynamo).

    python benchmarks/bench_new_shape.py --out benchmarks/results/new_shape.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import pipefusion_compile  # noqa: E402
import tiny_pipelines  # noqa: E402

PIPELINES = ["pixart_sigma", "sd3", "flux", "wan", "cogvideox", "ltx", "hunyuan_dit"]


def run_once(name: str, backend: str) -> dict:
    torch._dynamo.reset()
    tiny = getattr(tiny_pipelines, name)()
    tiny.pipe.transformer = torch.compile(tiny.pipe.transformer, backend="pipefusion", options={
        "num_stages": 2, "num_patches": 2, "stage_backend": backend, **tiny.options})
    times = {}
    for label, variant in (("first", "first"), ("new_shape", "second_resolution"), ("cached", "second_resolution")):
        t0 = time.perf_counter()
        tiny(variant)
        times[label] = time.perf_counter() - t0
    found = pipefusion_compile.programs(tiny.pipe.transformer)
    new = [p for p in found if p.plan.input_shape != found[0].plan.input_shape] or found
    times["backend_s"] = sum(p.stats.get("plan_s", 0) + p.stats.get("lower_s", 0) for p in new[-1:])
    times["stage_compile_s"] = sum(p.stats.get("compile_s", 0) for p in new[-1:])
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="eager", choices=["eager", "inductor"])
    ap.add_argument("--pipelines", nargs="*", default=PIPELINES)
    ap.add_argument("--out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = [f"New input shape cost (stage_backend={args.backend}, N=2, M=2, {tiny_pipelines.STEPS} steps per "
            f"call, 1 thread, median of {args.repeats}, min-max in brackets)", "",
            "| pipeline | first call (s) | call at a new shape (s) | same shape again (s) | backend: plan + lower "
            "of the new shape (s) | stage compile (s) |", "|---|---|---|---|---|---|"]
    for name in args.pipelines:
        runs = [run_once(name, args.backend) for _ in range(args.repeats)]

        def cell(key):
            v = [r[key] for r in runs]
            return f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"

        rows.append(f"| {name} | {cell('first')} | {cell('new_shape')} | {cell('cached')} | {cell('backend_s')} | "
                    f"{cell('stage_compile_s')} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
