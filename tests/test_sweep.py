"""Differential sweep: compiled PipeFusion == the independent eager reference, over built-in models x
resolution x batch x N x M x every legal cut x warmup (`sweep_configs.py`), each configuration compiled fresh.

    (default)                  a small sample (`sweep_configs.small()`), part of `make test`
    PIPEFUSION_SWEEP=full      the whole product (`make sweep`)
    PIPEFUSION_SWEEP=<k>       a seeded sample of k configurations (seed: PIPEFUSION_SWEEP_SEED, default 0)
    PIPEFUSION_SWEEP=<j>:<k>   what the sample of k adds to the sample of j (to extend a sweep already run)
    PIPEFUSION_SWEEP_REPORT=<path>   write a summary (counts per model, pass/fail, time) there at the end

The reference's result depends on the model, resolution, batch, M and warmup only (not on N or the cuts), so
it runs once per such group and is kept for the other configurations of the group.
"""
from __future__ import annotations

import os
import time
import traceback

import pytest
import torch

import sweep_configs
from helpers import call_model, compile_pf, sample_loop
from reference_pipefusion import bands
from sweep_configs import STEPS, Config
from test_numerics import OPTIONS, make_reference

MODE = os.environ.get("PIPEFUSION_SWEEP", "")
if MODE == "full":
    CONFIGS = sweep_configs.full()
elif MODE.replace(":", "", 1).isdigit():
    _START, _, _K = MODE.rpartition(":")
    CONFIGS = sweep_configs.sample(int(_K), int(os.environ.get("PIPEFUSION_SWEEP_SEED", "0")), int(_START or 0))
else:
    CONFIGS = sweep_configs.small()

_REFERENCE: dict[tuple, tuple] = {}
_PLAIN: dict[tuple, tuple] = {}
RESULTS: list[tuple[Config, str, float, str]] = []  # (config, "pass" / "fail", seconds, first error line)


def _reference(c: Config, model, kwargs):
    if c.reference_key not in _REFERENCE:
        reference = make_reference(c.model, model, kwargs, c.patches, warmup_steps=c.warmup)
        _REFERENCE[c.reference_key] = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs,
                                                  steps=STEPS)
    return _REFERENCE[c.reference_key]


def _plain(c: Config, model, kwargs):
    key = (c.model, c.resolution, c.batch)
    if key not in _PLAIN:
        _PLAIN[key] = sample_loop(call_model(model), kwargs, steps=STEPS)
    return _PLAIN[key]


def check_config(c: Config) -> None:
    model, kwargs = c.build()
    want_final, want_steps = _reference(c, model, kwargs)
    compiled, programs = compile_pf(model, num_stages=c.stages, num_patches=c.patches, warmup_steps=c.warmup,
                                    partition=list(c.partition), stage_backend="eager", **OPTIONS.get(c.model, {}))
    got_final, got_steps = sample_loop(call_model(compiled), kwargs, steps=STEPS)
    assert len(programs) == 1, f"{len(programs)} programs (graph breaks?)"
    plan = programs[0].plan
    # the plan is the configuration: N stages of the given attention layers each, M bands as the reference's
    assert tuple(len(s.attention_layers) for s in plan.stages) == c.partition
    assert plan.patches == tuple(bands(plan.token_rows, c.patches))
    assert plan.token_rows == sweep_configs.TOKEN_ROWS[(c.model, c.resolution)]
    stats = programs[0].stats
    assert (stats["warmup_calls"], stats["pipelined_calls"]) == (c.warmup, STEPS - c.warmup)
    for step, (got, want) in enumerate(zip(got_steps, want_steps)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"step {step} vs reference: {m}")
    torch.testing.assert_close(got_final, want_final, rtol=1e-4, atol=1e-5)
    if c.patches == 1:  # one patch: the plain model's numbers, every step
        _, plain_steps = _plain(c, model, kwargs)
        for step, (got, want) in enumerate(zip(got_steps, plain_steps)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {step} vs plain model: {m}")


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.id)
def test_compiled_equals_eager_reference(config):
    t0 = time.perf_counter()
    try:
        check_config(config)
    except BaseException as e:
        first = next((line for line in traceback.format_exception_only(type(e), e)[-1].splitlines() if line), "")
        RESULTS.append((config, "fail", time.perf_counter() - t0, first[:300]))
        raise
    RESULTS.append((config, "pass", time.perf_counter() - t0, ""))


def test_the_small_sample_has_every_cut_of_flux_and_of_an_image_model():
    small = sweep_configs.small()
    for model, stage_counts in (("flux", (2, 3)), ("pixart", (2, 3, 4))):
        layers = sweep_configs.MODELS[model][0]
        for stages in stage_counts:
            got = sorted(c.partition for c in small if c.model == model and c.stages == stages)
            assert got == sorted(sweep_configs.compositions(layers, stages))
    assert {c.model for c in small} == set(sweep_configs.MODELS)
    assert sweep_configs.small() == small and sweep_configs.sample(50) == sweep_configs.sample(50)  # seeded
    # a larger sample extends a smaller one
    assert set(sweep_configs.sample(80)) == set(sweep_configs.sample(40)) | set(sweep_configs.sample(80, start=40))


@pytest.fixture(scope="module", autouse=True)
def _report():
    t0 = time.perf_counter()
    yield
    path = os.environ.get("PIPEFUSION_SWEEP_REPORT")
    if path and RESULTS:
        write_report(path, time.perf_counter() - t0)


def write_report(path: str, wall_s: float) -> None:
    full = sweep_configs.full()
    if MODE == "full":
        what = "the full product"
    elif MODE.replace(":", "", 1).isdigit():
        seed = os.environ.get("PIPEFUSION_SWEEP_SEED", "0")
        what = (f"`sweep_configs.sample({_K}, seed={seed}, start={_START or 0})` (seeded sample: the chosen "
                f"configurations {_START or 0} to {_K})")
    else:
        what = "the `make test` sample, `sweep_configs.small()`"
    lines = [
        "# Differential sweep: compiled PipeFusion vs the eager reference",
        "",
        f"`PIPEFUSION_SWEEP={MODE}`: {len(RESULTS)} of the {len(full)} configurations of the full product, "
        f"{what}; {STEPS} DDIM steps each, stage_backend eager, simulate mode. Wall time {wall_s / 60:.1f} min "
        f"(torch {torch.__version__}, {torch.get_num_threads()} thread(s)).",
        "",
        "Each configuration: a fresh `torch.compile` with an explicit `partition`; every step's output and the "
        "final latents equal the eager reference (rtol 1e-4, atol 1e-5); with M = 1 also the plain model "
        "(rtol 1e-5, atol 1e-6).",
        "",
        "| model | configs in full product | run | pass | fail | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for model in sweep_configs.MODELS:
        mine = [r for r in RESULTS if r[0].model == model]
        lines.append(f"| {model} | {sum(c.model == model for c in full)} | {len(mine)} | "
                     f"{sum(r[1] == 'pass' for r in mine)} | {sum(r[1] == 'fail' for r in mine)} | "
                     f"{sum(r[2] for r in mine):.0f} |")
    lines.append(f"| **all** | {len(full)} | {len(RESULTS)} | {sum(r[1] == 'pass' for r in RESULTS)} | "
                 f"{sum(r[1] == 'fail' for r in RESULTS)} | {sum(r[2] for r in RESULTS):.0f} |")
    lines += ["", "Configurations run per dimension value:", ""]
    for dim in ("stages", "patches", "batch", "warmup", "resolution"):
        counts: dict = {}
        for r in RESULTS:
            v = getattr(r[0], dim)
            counts[v] = counts.get(v, 0) + 1
        lines.append(f"- {dim}: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items(), key=str)))
    failures = [r for r in RESULTS if r[1] == "fail"]
    lines += ["", f"## Failures ({len(failures)})", ""]
    lines += [f"- `{r[0].id}`: {r[3]}" for r in failures] or ["none"]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
