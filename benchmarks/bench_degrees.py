"""parallel='auto' on this machine's 2 ranks: every candidate it lists, measured next to its prediction.

    python benchmarks/bench_degrees.py [--runs 4] [--steps 10] [--cases cfg_batch two_calls]

Model: DiTTransformer2DModel, 12 layers, 6 x 64 heads (hidden 384), 64x64 latent = 1024 image tokens, random
weights, fp32, eager stages, DDIM with classifier-free guidance (scale 4):
  cfg_batch  cond + uncond in one batch of 2 per call (DiTPipeline, PixArt, SD3): candidates cfg 2 (batch
             form), pp 2 at M = 2, 4, and sp 2 (Ulysses inside one stage, M = 1)
  two_calls  CFG as two calls per step with batch 1 (Wan, Flux true CFG; `calls_per_step=2`): cfg 2 (two-call
             form), pp 2 at M = 2, 4, and sp 2
Each rank is pinned to its own core and runs one thread (gloo over 127.0.0.1). Rank 0 and 1 first compile with
the default options (parallel='auto', which calibrates and prints its table); then every candidate of that table
is compiled with its degrees given, and the candidates run in turns (run 1 of each, run 2 of each, ...), so a
drift of the machine's speed does not favour one; each turn starts one candidate later than the one before, so
none always runs in the same place (first after the serial model, which leaves rank 1 idle). "Measured" = the median steady step (steps 3..N of each
generation, slowest rank), min-max over the runs. The serial plain model (rank 0 alone) is measured in the
same turns for the speedups.

Writes benchmarks/results/degrees.md.
"""
from __future__ import annotations

import argparse
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

HIDDEN = dict(heads=6, head_dim=64)
GUIDANCE = 4.0


def build(case: str):
    import diffusers
    from pipefusion_compile import models

    batch = 2 if case == "cfg_batch" else 1
    model, kw = models.dit(sample_size=64, num_layers=12, batch=batch, **HIDDEN)
    return model, kw["hidden_states"][:1].shape, diffusers.DDIMScheduler()


def generation(model, case: str, shape, sched, steps: int, seed: int = 0):
    """One guided generation; (total s, per-step s). A step runs from its first call to the next step's."""
    from pipefusion_compile.lazy import materialize

    sched.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    cond, uncond = torch.tensor([3]), torch.tensor([1])   # two labels stand for cond and uncond (random weights)
    marks = [time.perf_counter()]
    with torch.no_grad():
        for t in sched.timesteps:
            if case == "cfg_batch":
                out = model(hidden_states=torch.cat([x, x]), timestep=t.expand(2), class_labels=torch.cat([cond, uncond]),
                            return_dict=False)[0]
                eps_c, eps_u = out.chunk(2, dim=1)[0].chunk(2)
            else:
                eps_c = model(hidden_states=x, timestep=t.expand(1), class_labels=cond, return_dict=False)[0]
                eps_u = model(hidden_states=x, timestep=t.expand(1), class_labels=uncond, return_dict=False)[0]
                eps_c, eps_u = eps_c.chunk(2, dim=1)[0], eps_u.chunk(2, dim=1)[0]
            x = sched.step(eps_u + GUIDANCE * (eps_c - eps_u), t, x).prev_sample
            marks.append(time.perf_counter())
        x = materialize(x)
    marks[-1] = time.perf_counter()
    return marks[-1] - marks[0], [b - a for a, b in zip(marks, marks[1:])]


def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core % os.cpu_count()})
    torch.set_num_threads(1)


def rank_main(rank, world, port, case, runs, steps, out_path):
    pin(rank)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=900))
    from pipefusion_compile import degrees

    torch._dynamo.config.cache_size_limit = 64
    calls = 2 if case == "two_calls" else 1
    model, shape, sched = build(case)
    auto = torch.compile(model, backend="pipefusion", options={"stage_backend": "eager", "calls_per_step": calls})
    generation(auto, case, shape, sched, 3)
    choice = degrees.choice_of(auto)
    runners = {}
    for c in choice.candidates:
        if not c.fits:
            continue
        m, shape, sched = build(case)
        options = {"stage_backend": "eager", "num_stages": c.pp, "cfg_parallel": c.cfg, "num_patches": c.patches,
                   "sequence_parallel": c.sp}
        run = torch.compile(m, backend="pipefusion", options=options)
        generation(run, case, shape, sched, 3)
        runners[_key(c)] = (run, shape, sched)
    plain = build(case) if rank == 0 else None
    times = {key: [] for key in [*runners, "serial"]}
    keys = list(runners)
    for turn in range(runs):
        dist.barrier()
        if plain is not None:
            times["serial"].append(generation(plain[0], case, plain[1], plain[2], steps))
        dist.barrier()
        # each turn starts one candidate later: none always runs first after the serial model (rank 1 idle)
        for key in keys[turn % len(keys):] + keys[:turn % len(keys)]:
            run, shape_, sched_ = runners[key]
            dist.barrier()
            times[key].append(generation(run, case, shape_, sched_, steps))
    torch.save({"times": times, "choice": choice}, f"{out_path}.rank{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _key(c) -> tuple:
    return (c.cfg, c.pp, c.sp, c.patches)


def launch(case: str, runs: int, steps: int, world: int = 2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res")
        mp.start_processes(rank_main, args=(world, port, case, runs, steps, out), nprocs=world, start_method="spawn")
        return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(world)]


def report(case: str, results, steps: int) -> list[str]:
    choice = results[0]["choice"]
    serial = [statistics.median(per[2:]) for _, per in results[0]["times"]["serial"]]

    def steady(key):   # per run: the slowest rank's median steady step
        per_rank = [[statistics.median(per[2:]) for _, per in r["times"][key]] for r in results]
        return [max(vals) for vals in zip(*per_rank)]

    rows, measured = [], {}
    for c in choice.candidates:
        key = _key(c)
        if key not in results[0]["times"]:
            continue
        got = steady(key)
        measured[key] = statistics.median(got)
        rows.append((c, got))
    fastest = min(measured.values())
    chosen = _key(choice.chosen)
    lines = [f"### {case}: {choice.batch} sample(s) per call, {choice.calls_per_step} call(s) per step",
             "", f"machine constants: {choice.constants.describe()}", "",
             "| candidate | form | predicted step | measured step (median, min-max) | error | speedup vs serial |",
             "|---|---|---|---|---|---|"]
    base = statistics.median(serial)
    for c, got in rows:
        key = _key(c)
        med = measured[key]
        err = (c.step_s - med) / med
        mark = " **(auto)**" if key == chosen else ""
        lines.append(f"| {c.label}{mark} | {c.form} | {c.step_s * 1e3:.0f} ms | "
                     f"{med * 1e3:.0f} ms ({min(got) * 1e3:.0f}-{max(got) * 1e3:.0f}) | {err:+.0%} | "
                     f"{base / med:.2f}x |")
    lines += ["", f"serial plain model: {base * 1e3:.0f} ms per step ({min(serial) * 1e3:.0f}-{max(serial) * 1e3:.0f}).",
              f"auto chose {choice.chosen.label}: measured {measured[chosen] * 1e3:.0f} ms, "
              f"fastest measured {fastest * 1e3:.0f} ms -> {'the fastest' if measured[chosen] == fastest else f'{measured[chosen] / fastest - 1:+.1%} from the fastest'}"
              f" ({'within' if measured[chosen] <= 1.05 * fastest else 'NOT within'} 5%).", ""]
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cases", nargs="+", default=["cfg_batch", "two_calls"])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                   "degrees.md"))
    args = p.parse_args(argv)
    lines = [f"# parallel='auto' on 2 CPU ranks: predicted vs measured ({datetime.date.today()})", "",
             f"`python benchmarks/bench_degrees.py --runs {args.runs} --steps {args.steps}`; DiT 12 layers, hidden "
             "384, 1024 image tokens, DDIM with CFG, 2 gloo ranks x 1 thread, each pinned to a core.", ""]
    for case in args.cases:
        t0 = time.perf_counter()
        results = launch(case, args.runs, args.steps)
        lines += report(case, results, args.steps)
        print("\n".join(lines[-12:]), flush=True)
        print(f"({case}: {time.perf_counter() - t0:.0f} s)", flush=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
