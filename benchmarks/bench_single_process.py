"""Single-process (simulate mode) measurements for the foundation issue.

For each model (real diffusers classes, random weights, moderate size, fp32, CPU, 1 thread):
  * FLOPs per stage and the max/min stage ratio of the FLOP partition at N = 2 and 4;
  * time to compile: plan (analyses + partition) and lower (stage graphs), eager stage backend;
  * one pipelined step (eager stages, N = 2) vs one step of the plain eager model, at M = 1, 2, 4,
    measured side by side in this run (median of repeats).

    python benchmarks/bench_single_process.py [--repeats 7] [--out benchmarks/results/single_process.md]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import pipefusion_compile
from pipefusion_compile.models import dit, ltx_video, pixart

CONFIGS = {
    "PixArtTransformer2DModel": lambda: pixart(sample_size=32, num_layers=12, heads=6, head_dim=64, prompt_tokens=16),
    "DiTTransformer2DModel": lambda: dit(sample_size=32, num_layers=12, heads=6, head_dim=64),
    "LTXVideoTransformer3DModel": lambda: ltx_video(frames=4, height=8, width=8, num_layers=12, heads=6,
                                                    head_dim=64, prompt_tokens=16),
}


class _Programs:
    """The programs compiled for one model, looked up lazily through the public API."""

    def __init__(self, compiled):
        self.compiled = compiled

    def __getitem__(self, i):
        return pipefusion_compile.programs(self.compiled)[i]


def compile_with(model, **options):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pipefusion", options=options)
    return compiled, _Programs(compiled)


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def with_timestep(kwargs, t):
    kw = dict(kwargs)
    kw["timestep"] = torch.full_like(kwargs["timestep"], t)
    return kw


def bench_model(name, factory, repeats):
    model, kwargs = factory()
    rows = {"model": name}
    with torch.no_grad():
        rows["plain_s"] = timed(lambda: model(**kwargs), repeats)
        for stages in (2, 4):
            compiled, programs = compile_with(model, num_stages=stages, num_patches=1, stage_backend="eager")
            t0 = time.perf_counter()
            compiled(**kwargs)
            first_call = time.perf_counter() - t0
            plan = programs[0].plan
            rows[f"N{stages}_shares"] = [round(s.share * 100, 1) for s in plan.stages]
            rows[f"N{stages}_ratio"] = plan.max_min_ratio
            rows[f"N{stages}_flops"] = [s.flops for s in plan.stages]
            if stages == 2:
                st = programs[0].stats
                rows["plan_s"], rows["lower_s"], rows["build_s"] = st["plan_s"], st["lower_s"], st["compile_s"]
                rows["first_call_s"] = first_call
                rows["nodes"] = len(programs[0].gm.graph.nodes)
                rows["plan"] = str(plan)
        for m in (1, 2, 4):
            compiled, programs = compile_with(model, num_stages=2, num_patches=m, stage_backend="eager")
            compiled(**with_timestep(kwargs, 999))           # warmup step (full sequence)
            compiled(**with_timestep(kwargs, 998))           # first pipelined step builds the patch graphs
            step = iter(range(997, 0, -1))
            rows[f"M{m}_s"] = timed(lambda: compiled(**with_timestep(kwargs, next(step))), repeats)
            assert programs[0].stats["warmup_calls"] == 1
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", nargs="*", default=list(CONFIGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [bench_model(name, CONFIGS[name], args.repeats) for name in args.models]

    lines = [
        f"# Single-process measurements (torch {torch.__version__}, CPU, {args.threads} thread, fp32, "
        f"median of {args.repeats})",
        "",
        "Models: 12 layers, hidden 384 (6 heads x 64), 256 image tokens, random weights.",
        "",
        "| model | graph nodes | plan s | lower s | stage-graph build s (eager) | N=2 FLOP shares % (max/min) "
        "| N=4 FLOP shares % (max/min) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['nodes']} | {r['plan_s']:.2f} | {r['lower_s']:.2f} | {r['build_s']:.2f} "
            f"| {r['N2_shares']} ({r['N2_ratio']:.3f}) | {r['N4_shares']} ({r['N4_ratio']:.3f}) |"
        )
    lines += [
        "",
        "One step, N=2 stages in one process (simulate, eager stages) vs the plain eager model:",
        "",
        "| model | plain ms | M=1 ms (x) | M=2 ms (x) | M=4 ms (x) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        p = r["plain_s"]
        cells = " | ".join(f"{r[f'M{m}_s'] * 1e3:.1f} ({r[f'M{m}_s'] / p:.2f}x)" for m in (1, 2, 4))
        lines.append(f"| {r['model']} | {p * 1e3:.1f} | {cells} |")
    text = "\n".join(lines)
    print(text)
    for r in results:
        print(f"\n{r['model']} N=2 plan:\n{r['plan']}")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
