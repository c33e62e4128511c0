"""Every built-in DiT family through the backend: what the analysis found, the plan, and a stale-mode sanity figure.

For each model (real diffusers class, tiny config, random weights, fp32, CPU, simulate mode, eager stages):
  * node count of the dynamo graph, the token layout found (image input, axis, token rows, text group),
  * FLOP share of each stage and the max/min ratio at N = 2 and 4,
  * bytes crossing each cut per patch (and the text stream's bytes per step, for joint sequences),
  * the relative error of stale mode (N = 2, M = 4, warmup 1) vs the plain model after a 5-step DDIM loop
    (random weights: a sanity figure that stale K/V changes the result a little, not a quality claim).

    python benchmarks/bench_models.py [--out benchmarks/results/models.md]
"""
from __future__ import annotations

import argparse
import sys

import torch
from diffusers import DDIMScheduler

import pipefusion_compile
from pipefusion_compile.cli import plan_model
from pipefusion_compile.models import BUILTIN, BUILTIN_OPTIONS
from pipefusion_compile.plan import _fmt_bytes

STEPS = 5


def ddim(fn, kwargs, steps=STEPS, seed=1):
    sched = DDIMScheduler(num_train_timesteps=1000)
    sched.set_timesteps(steps)
    latents = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(seed))
    rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
    with torch.no_grad():
        for t in sched.timesteps:
            out = fn(hidden_states=latents, timestep=t.expand(latents.shape[0]).to(kwargs["timestep"].dtype), **rest)
            out = out[0] if isinstance(out, tuple) else out
            eps = out.chunk(2, dim=1)[0] if out.shape[1] == 2 * latents.shape[1] else out
            latents = sched.step(eps, t, latents).prev_sample
    return latents


def stale_error(factory, extra: dict) -> tuple[float, int]:
    """Relative error of stale mode vs the plain model, and the node count of the graph it pipelined."""
    model, kwargs = factory()
    plain = ddim(lambda **kw: model(**kw, return_dict=False), kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="pipefusion",
                             options={"num_stages": 2, "num_patches": 4, "stage_backend": "eager", **extra})
    stale = ddim(lambda **kw: compiled(**kw, return_dict=False), kwargs)
    (program,) = pipefusion_compile.programs(compiled)
    return float((stale - plain).norm() / plain.norm()), len(program.gm.graph.nodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    lines = [
        "# Every built-in DiT family: analysis, plan and stale-mode sanity figure",
        "",
        "`python benchmarks/bench_models.py` (tiny configs of `pipefusion_compile/models.py`, random weights, fp32, "
        "CPU, simulate mode). Rel. error: `|stale - plain| / |plain|` of the final latents after a 5-step DDIM "
        "loop at N=2, M=4, warmup 1 (random weights: a sanity figure, not a quality claim).",
        "",
        "| model | graph nodes | token layout | N=2 FLOP shares (max/min) | N=4 FLOP shares (max/min) | "
        "bytes per patch at each cut, N=2 (M=4) | stale rel. error |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, factory in BUILTIN.items():
        shares, cut_bytes = {}, ""
        for n in (2, 4):
            (plan,) = plan_model(name, num_stages=n, num_patches=4)  # with the options the model needs
            shares[n] = " / ".join(f"{s.share:.1%}" for s in plan.stages) + f" ({plan.max_min_ratio:.3f})"
            if n == 2:
                two = plan
                cut_bytes = "; ".join(
                    f"{_fmt_bytes(c.patch_bytes)}" + (f" + text {_fmt_bytes(sum(t.text_bytes for t in c.tensors))}/step"
                                                      if any(t.text_bytes for t in c.tensors) else "")
                    + f" ({len(c.tensors)} tensor{'s' if len(c.tensors) > 1 else ''})"
                    for c in plan.cuts)
        layout = (f"`{two.token_input}` {list(two.input_shape)} axis {two.token_axis}, {two.token_rows} token rows"
                  + (f" x {two.granule}" if two.granule > 1 else "")
                  + (f"; text {two.text} (joint)" if two.text else "")
                  + (f"; {len(two.positional)} positional" if two.positional else ""))
        err, nodes = stale_error(factory, BUILTIN_OPTIONS.get(name, {}))
        lines.append(f"| {name} | {nodes} | {layout} | {shares[2]} | {shares[4]} | {cut_bytes} | "
                     f"{err:.2e} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
