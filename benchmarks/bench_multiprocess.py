"""Multi-process PipeFusion on CPU: 2 ranks x 1 thread vs 1 process x 1 thread, same model, loop and steps.

    python benchmarks/bench_multiprocess.py [--runs 3] [--steps 20] [--models dit pixart flux]

Models (real diffusers classes, random weights, fp32, eager stages), each 1024 image tokens at hidden 384:
  dit     DiTTransformer2DModel, 12 layers, 6 x 64 heads, 64x64 latent; DDIM
  pixart  PixArtTransformer2DModel, 12 layers, 6 x 64 heads, 64x64 latent, cross-attention to 16 text tokens;
          DPM-Solver++ (multistep)
  flux    FluxTransformer2DModel, 4 double + 8 single blocks, 6 x 64 heads, 32x32 packed latent, 16 text tokens;
          flow-match Euler
One generation = `--steps` scheduler steps (the first is the warmup step), from the first call to the final
latents resolved; its wall time on the slowest rank is what is compared. "Steady step" = median time of one
step after the second. Each process is pinned to its own core (os.sched_setaffinity) and runs one thread. The
serial baseline is the plain model in rank 0's process while rank 1 waits; runs alternate (serial, then each
configuration, repeated), and ratios pair the serial run with the configuration runs right after it.

Configurations on 2 ranks: pipefusion with patch-lazy outputs (the default) at M=2 (the default M = N stages),
M=4 and M=8; pipefusion with `lazy_outputs=False` (every step waits for its whole output: the pipeline fills and
drains each step) at M=2 and M=4; and for flux diffusers' own Ulysses context parallelism (`enable_parallelism(ContextParallelConfig(ulysses_degree=2))`).
diffusers builds its device mesh on `torch.accelerator.device_count()`, which is 0 on a machine without an
accelerator; `one_device_per_rank` makes it 1 while `enable_parallelism` runs (one CPU "device" per rank, which
is what each rank has). diffusers itself is not changed.

Writes benchmarks/results/multiprocess.md and Gantt charts of one DiT generation (lazy and per-step).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HIDDEN = dict(heads=6, head_dim=64)
# (num_patches, lazy_outputs); M=2 = N is the default. With lazy outputs there is no bubble between steps for
# more patches to shrink, so M > N only makes each patch smaller (and its kernels less efficient).
CONFIGS = [(2, True), (4, True), (8, True), (2, False), (4, False)]


def build(name: str):
    """(model, inputs(latents, t) -> kwargs, latent shape, scheduler, model output -> what the scheduler steps)."""
    import diffusers
    from pipefusion_compile import models

    if name == "dit":
        model, kw = models.dit(sample_size=64, num_layers=12, **HIDDEN)
        inputs = lambda x, t: dict(hidden_states=x, timestep=t.expand(1), class_labels=kw["class_labels"])
        return model, inputs, kw["hidden_states"].shape, diffusers.DDIMScheduler(), lambda o: o.chunk(2, dim=1)[0]
    if name == "pixart":
        model, kw = models.pixart(sample_size=64, num_layers=12, prompt_tokens=16, **HIDDEN)
        inputs = lambda x, t: dict(hidden_states=x, timestep=t.expand(1), encoder_hidden_states=kw["encoder_hidden_states"],
                                   added_cond_kwargs=kw["added_cond_kwargs"])
        return (model, inputs, kw["hidden_states"].shape, diffusers.DPMSolverMultistepScheduler(),
                lambda o: o.chunk(2, dim=1)[0])
    if name == "flux":
        model, kw = models.flux(height=32, width=32, num_layers=4, num_single_layers=8, prompt_tokens=16, **HIDDEN)
        rest = {k: v for k, v in kw.items() if k not in ("hidden_states", "timestep")}
        inputs = lambda x, t: dict(hidden_states=x, timestep=(t / 1000).expand(1), **rest)
        return (model, inputs, kw["hidden_states"].shape, diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                lambda o: o)
    raise ValueError(name)


def generation(model, name, built, steps, seed=0):
    """One generation; returns (total seconds, per-step seconds). A step's time runs from its call to the next
    call (the last one's to the final latents resolved), so a call that returns early is not counted short."""
    from pipefusion_compile.lazy import materialize

    _, inputs, shape, sched, eps_of = built
    sched.set_timesteps(steps)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    marks = [time.perf_counter()]
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(**inputs(latents, t), return_dict=False)[0]
            latents = sched.step(eps_of(out), t, latents).prev_sample
            marks.append(time.perf_counter())
        latents = materialize(latents)
    marks[-1] = time.perf_counter()
    return marks[-1] - marks[0], [b - a for a, b in zip(marks, marks[1:])], latents


def pin(core: int) -> None:
    # Set, not inherited: each rank gets its own core whatever the launching process was pinned to.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core % os.cpu_count()})
    torch.set_num_threads(1)


@contextlib.contextmanager
def one_device_per_rank():
    """diffusers' `enable_parallelism` places rank r on device `r % torch.accelerator.device_count()`; without an
    accelerator that count is 0. Each rank has one CPU: make the count 1 while it runs."""
    real = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = real


def rank_main(rank, world, port, name, configs, runs, steps, timeline_dir, out_path):
    """Builds every configuration first (each its own model instance), then runs them in turns: for run i,
    the serial generation on rank 0 (rank 1 idle, so one core is busy, as in a plain single-process run), then
    one generation of each configuration. Ratios pair adjacent runs, so a drift of the machine's speed (other
    tenants, clock) does not favour a configuration."""
    pin(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=900))
    import pipefusion_compile

    torch._dynamo.config.cache_size_limit = 64    # one entry per configuration (and its lazy-input retrace)
    runners = {}
    for config in configs:
        built = build(name)
        model = built[0]
        if config == "ulysses":
            from diffusers import ContextParallelConfig

            with one_device_per_rank():
                model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
            run = model
        else:
            m, lazy = config
            options = {"num_stages": world, "num_patches": m, "stage_backend": "eager", "lazy_outputs": lazy}
            if timeline_dir:
                options["timeline"] = os.path.join(timeline_dir, f"m{m}_{'lazy' if lazy else 'per_step'}")
            run = torch.compile(model, backend="pipefusion", options=options)
        generation(run, name, built, 3)  # compile, first use of every stage graph, the lazy-input retrace
        if timeline_dir:   # keep the measured generations only (each rank its own file)
            for program in pipefusion_compile.programs(run):
                program._flush_timeline()   # the waits for the last output, recorded after the last call
            mine = os.path.join(options["timeline"], f"rank{rank}.jsonl")
            if os.path.exists(mine):
                os.remove(mine)
        runners[str(config)] = (run, built)
    plain = build(name) if rank == 0 else None
    if plain is not None:
        generation(plain[0], name, plain, 2)
    results = {key: {"times": []} for key in [*runners, "serial"]}
    for _ in range(runs):
        dist.barrier()
        if plain is not None:
            results["serial"]["times"].append(generation(plain[0], name, plain, steps)[:2])
        dist.barrier()
        for key, (run, built) in runners.items():
            results[key]["times"].append(generation(run, name, built, steps)[:2])
    for key, (run, built) in runners.items():
        if key != "ulysses":
            (program,) = pipefusion_compile.programs(run)
            results[key].update(stats=dict(program.stats),
                                plan_bytes=program.plan.p2p_bytes_per_step(program.stage_index))
    dist.barrier()
    torch.save(results, f"{out_path}.rank{rank}")
    dist.destroy_process_group()


def patch_cost(name: str, steps: int = 10, patches=(2, 4, 8)) -> list[str]:
    """What patching alone costs: one process, one thread, simulate mode (both stages in turn, same executor as
    the ranks) against the plain model, median steady step. Runs in a child process pinned to core 0."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        times = pool.apply(_patch_cost_worker, (name, steps, patches))
    plain = times.pop("plain")
    return ["One process (simulate mode: both stages in turn, the executor the ranks run), median steady step: "
            f"plain model {plain * 1e3:.0f} ms; "
            + "; ".join(f"M={m} {t * 1e3:.0f} ms ({t / plain:.2f}x)" for m, t in times.items())
            + ". The difference is the cost of running the stage in M smaller patches (the same kernels on fewer "
              "rows each), which the ranks pay too.", ""]


def _patch_cost_worker(name, steps, patches):
    pin(0)
    torch._dynamo.config.cache_size_limit = 64
    out = {}
    for m in ("plain", *patches):
        built = build(name)
        run = built[0] if m == "plain" else torch.compile(
            built[0], backend="pipefusion",
            options={"num_patches": m, "num_stages": 2, "simulate": True, "stage_backend": "eager"})
        generation(run, name, built, 3)
        out[m] = statistics.median(generation(run, name, built, steps)[1][2:])
    return out


def launch(world, name, configs, runs, steps, timeline_dir=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res")
        mp.start_processes(rank_main, args=(world, port, name, configs, runs, steps, timeline_dir, out),
                           nprocs=world, start_method="spawn")
        return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]


def spread(values) -> str:
    values = sorted(values)
    return f"{values[0]:.2f} / {statistics.median(values):.2f} / {values[-1]:.2f}"


def label(config) -> str:
    if config == "ulysses":
        return "diffusers Ulysses (ulysses_degree=2)"
    m, lazy = config
    return (f"pipefusion M={m}{' (default)' if m == 2 and lazy else ''}, "
            + ("lazy outputs" if lazy else "per-step (`lazy_outputs=False`)"))


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--models", nargs="*", default=["dit", "pixart", "flux"])
    parser.add_argument("--out", default="benchmarks/results/multiprocess.md")
    parser.add_argument("--timeline-dir", default="benchmarks/results")
    args = parser.parse_args(argv)

    bound = args.steps / (1 + (args.steps - 1) / 2)
    lines = [
        f"# Multi-process PipeFusion on CPU ({datetime.date.today()}, torch {torch.__version__}, {os.cpu_count()} cores)",
        "",
        f"2 ranks x 1 thread (gloo, 127.0.0.1) vs 1 process x 1 thread, every process pinned to its own core; "
        f"{args.steps} steps per generation (the first is the warmup step), {args.runs} generations each, run in "
        f"turns (serial, then each configuration) with ratios pair by pair (serial run i / run i), min / median / max. Bound for a generation with one serial "
        f"warmup step: {bound:.2f}x; for a pipelined step: 2x. `python benchmarks/bench_multiprocess.py` "
        f"(`make bench`).",
        "",
    ]
    for name in args.models:
        configs = list(CONFIGS) + (["ulysses"] if name == "flux" else [])
        ranks = launch(2, name, configs, args.runs, args.steps)
        serial_runs = ranks[0]["serial"]["times"]
        serial_gen = [total for total, _ in serial_runs]
        serial_step = [statistics.median(s[2:]) for _, s in serial_runs]
        lines += [
            f"## {name}",
            "",
            f"Serial: median {statistics.median(serial_gen):.2f} s per generation, {statistics.median(serial_step):.3f} "
            f"s per steady step.",
            "",
            *patch_cost(name),
            "| 2 ranks | generation s (median) | generation speedup | steady-step speedup | bytes sent per step (rank 0) |",
            "|---|---|---|---|---|",
        ]
        for config in configs:
            key = str(config)
            gens = [max(r[key]["times"][i][0] for r in ranks) for i in range(args.runs)]
            steps = [statistics.median(max(r[key]["times"][i][1][k] for r in ranks) for k in range(2, args.steps))
                     for i in range(args.runs)]
            sent = ranks[0][key].get("stats", {}).get("bytes_sent")
            lines.append(
                f"| {label(config)} | {statistics.median(gens):.2f} | {spread(s / g for s, g in zip(serial_gen, gens))} | "
                f"{spread(s / g for s, g in zip(serial_step, steps))} | "
                f"{'' if sent is None else f'{sent / 2**20:.2f} MiB'} |")
        lines.append("")
        print("\n".join(lines), flush=True)
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    if args.timeline_dir:
        from pipefusion_compile.timeline import merge

        with tempfile.TemporaryDirectory() as d:
            launch(2, "dit", [(4, True), (4, False)], 1, 6, timeline_dir=d)
            for tag, what in (("lazy", "patch-lazy outputs"), ("per_step", "lazy_outputs=False")):
                png = os.path.join(args.timeline_dir, f"timeline_n2_m4_{tag}.png")
                merge(os.path.join(d, f"m4_{tag}"), None, png, steps=(2, 5),
                      title=f"DiT, 2 ranks x 1 CPU thread, M=4, steps 2-4, {what}")
                print(f"timeline: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
