"""Unchanged diffusers pipelines end to end, with the transformer replaced by the pipefusion-compiled one.

`pipe.transformer = torch.compile(pipe.transformer, backend="pipefusion", options=...)` with default
torch.compile settings (so dynamo generalizes to symbolic sizes on a second input shape, as it does for users),
`output_type="latent"`, fp32, CPU, tiny random components (`tiny_pipelines.py`). For every pipeline:

- one compiled transformer (M=1, N=2), in one process, runs this input sequence: the first input, a second
  resolution, a batch of 2 prompts, guidance off, the first input again; each result equals the plain
  pipeline's (tight fp32 tolerance). The first of them is the "M=1 equals the plain pipeline" check;
- M=4 runs, and a repeat with the same seed is bit-identical;
- pipelines that call the transformer twice per step (Wan CFG, Flux true CFG): M=4 equals two separately
  compiled copies, one per call stream, bit for bit.

Every compiled run also checks that the backend pipelined the transformer (a program with 2 stages exists and
the pipefusion programs ran every transformer call), so a graph the backend declined cannot pass as a success.

The sequence runs once per pipeline (cached) and each of its inputs is its own test, so a failure names the
input; the plain references come from one plain pipeline running the same sequence.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch

import pipefusion_compile
from tiny_pipelines import FACTORIES, STEPS, SeparateCopies, TinyPipeline

NUM_STAGES = 2
RTOL, ATOL = 1e-5, 1e-6
NAMES = list(FACTORIES)
TWO_CALLS = ["flux", "wan"]  # their "first" input calls the transformer twice per step (checked below)
SEQUENCE = ("first", "second_resolution", "batch2", "guidance_off", "first")
# DiTPipeline has no height / width (the latent size is the transformer's sample_size): no second resolution.
NO_VARIANT = {("dit", "second_resolution")}
SEQUENCE_CASES = [pytest.param(name, i, id=f"{name}-{i}-{variant}") for name in NAMES
                  for i, variant in enumerate(SEQUENCE) if (name, variant) not in NO_VARIANT]


def compile_transformer(tiny: TinyPipeline, transformer: torch.nn.Module, num_patches: int):
    options = dict(num_stages=NUM_STAGES, num_patches=num_patches, stage_backend="eager", **tiny.options)
    return torch.compile(transformer, backend="pipefusion", options=options)


def patches(tiny: TinyPipeline) -> int:
    """M for the pipelined checks: 4, or the token rows of the smallest input if fewer."""
    return min(4, tiny.max_patches)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(
        actual, expected, rtol=RTOL, atol=ATOL,
        msg=lambda m: f"{what}: relative error {rel_err(actual, expected):.3g} vs the plain pipeline\n{m}")


def describe(e: BaseException) -> str:
    """Exception type and first line; for dynamo's BackendCompilerFailed also the backend's own exception."""
    def first_line(x):
        return next((line for line in str(x).splitlines() if line.strip() and not line.endswith("raised:")), "")

    inner = getattr(e, "inner_exception", None)
    if inner is not None:
        return f"{type(e).__name__} <- {type(inner).__name__}: {first_line(inner)}"
    return f"{type(e).__name__}: {first_line(e)}"


class CallCounter:
    """Counts the calls a (plain) transformer gets."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1


@functools.cache
def plain_sequence(name: str) -> tuple:
    """One plain pipeline runs SEQUENCE: per input, (latents, transformer calls), None where not applicable."""
    tiny = FACTORIES[name]()
    counter = CallCounter(tiny.pipe.transformer)
    results = []
    for variant in SEQUENCE:
        if variant not in tiny.calls:
            results.append(None)
            continue
        before = counter.calls
        out = tiny(variant)
        results.append((out, counter.calls - before))
    return tuple(results)


def plain(name: str, variant: str) -> tuple[torch.Tensor, int]:
    return plain_sequence(name)[SEQUENCE.index(variant)]


def calls_run(compiled) -> int:
    """Transformer calls the pipefusion programs of `compiled` have run (warmup + pipelined)."""
    return sum(p.stats["warmup_calls"] + p.stats["pipelined_calls"] for p in pipefusion_compile.programs(compiled))


def assert_pipelined(compiled, what: str) -> None:
    progs = pipefusion_compile.programs(compiled)
    assert any(p.plan.num_stages == NUM_STAGES for p in progs), (
        f"{what}: no pipefusion program with {NUM_STAGES} stages was built (programs: "
        f"{[p.plan.num_stages for p in progs]}): the backend did not pipeline the transformer")


def fresh_dynamo() -> None:
    """Dynamo reuses a graph (so one pipefusion program, with per-module state) for every module of the same
    code and shapes; program stats then count the calls of all of them. The cached runs below start from a
    fresh dynamo so that the stats of `programs(compiled)` count the calls of `compiled` only."""
    torch._dynamo.reset()


def run_compiled(name: str, tiny: TinyPipeline, compiled, variant: str, what: str) -> torch.Tensor:
    """Run one input through the pipeline with the compiled transformer; checks that every transformer call
    went through a pipefusion program."""
    before = calls_run(compiled)
    out = tiny(variant)
    expected_calls = plain(name, variant)[1]
    assert_pipelined(compiled, what)
    ran = calls_run(compiled) - before
    assert ran == expected_calls, f"{what}: the pipefusion programs ran {ran} of the {expected_calls} transformer calls"
    return out


@functools.cache
def compiled_sequence(name: str) -> tuple:
    """One compiled transformer (M=1) runs SEQUENCE in this process: per input, (latents, None) or
    (None, what failed). Later inputs still run after a failure: which of them still work is part of the result."""
    fresh_dynamo()
    tiny = FACTORIES[name]()
    tiny.pipe.transformer = compiled = compile_transformer(tiny, tiny.pipe.transformer, 1)
    results = []
    for i, variant in enumerate(SEQUENCE):
        if variant not in tiny.calls:
            results.append(None)
            continue
        try:
            results.append((run_compiled(name, tiny, compiled, variant, f"{name} M=1, input {i} ({variant})"), None))
        except Exception as e:
            results.append((None, describe(e)))
    return tuple(results)


@functools.cache
def pipelined_first(name: str) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """M=4 on the first input, run twice with one compiled transformer: (first run, repeat, per-program stats
    after the first run)."""
    fresh_dynamo()
    tiny = FACTORIES[name]()
    tiny.pipe.transformer = compiled = compile_transformer(tiny, tiny.pipe.transformer, patches(tiny))
    first = run_compiled(name, tiny, compiled, "first", f"{name} M={patches(tiny)}")
    stats = [dict(p.stats) for p in pipefusion_compile.programs(compiled)]
    repeat = run_compiled(name, tiny, compiled, "first", f"{name} M={patches(tiny)}, repeat")
    return first, repeat, stats


# ------------------------------------------------------------------------------------------------ harness
@pytest.mark.parametrize("name", NAMES)
def test_harness_plain_references(name):
    """The references are sound: a fresh pipeline gives what the sequence's plain pipeline gave for the first
    input, and that pipeline gives it again at the end of the sequence; the two-call pipelines call the
    transformer twice per step, the others once."""
    ref = plain_sequence(name)
    assert torch.equal(ref[-1][0], ref[0][0])
    assert torch.equal(FACTORIES[name]()("first"), ref[0][0])
    for r in ref:
        assert r is None or torch.isfinite(r[0]).all()
    assert FACTORIES[name]().two_calls == (name in TWO_CALLS)
    assert ref[0][1] == (2 if name in TWO_CALLS else 1) * STEPS


@pytest.mark.parametrize("name", TWO_CALLS)
def test_harness_separate_copies_uncompiled_equal_plain(name):
    """The two-copies wrapper is transparent: with uncompiled copies it gives the plain pipeline's latents."""
    tiny = FACTORIES[name]()
    orig = tiny.pipe.transformer
    tiny.pipe.transformer = wrapper = SeparateCopies(copy.deepcopy(orig), copy.deepcopy(orig))
    assert torch.equal(tiny("first"), plain(name, "first")[0])
    assert wrapper.calls == 2 * STEPS


# ------------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize("name, index", SEQUENCE_CASES)
def test_input_sequence_equals_plain(name, index):
    """Input `index` of SEQUENCE, run by one compiled transformer (M=1) after the inputs before it."""
    variant = SEQUENCE[index]
    out, error = compiled_sequence(name)[index]
    what = f"{name} M=1, input {index} ({variant})"
    if error is not None:
        pytest.fail(f"{what}: {error}", pytrace=False)
    assert_matches(out, plain(name, variant)[0], what)


@pytest.mark.parametrize("name", NAMES)
def test_patches_run_and_repeat_is_identical(name):
    first, repeat, stats = pipelined_first(name)
    assert torch.isfinite(first).all()
    assert torch.equal(first, repeat), (
        f"{name}: a repeat with the same seed differs (rel. {rel_err(repeat, first):.3g})")
    assert sum(s["pipelined_calls"] for s in stats) > 0, f"{name}: the patch pipeline never ran: {stats}"
    if name not in TWO_CALLS:  # one call per step: one warmup call per generation (the two-call case is below)
        assert sum(s["warmup_calls"] for s in stats) == 1, f"{name}: {stats}"


@pytest.mark.parametrize("name", TWO_CALLS)
def test_two_call_streams_equal_separate_copies(name):
    """A pipeline that calls the transformer twice per step (cond, then uncond): one compiled transformer gives
    what two separately compiled copies (one per call stream) give, bit for bit; each stream has its own
    warmup (warmup_steps=1: the first call of each stream)."""
    first, _, stats = pipelined_first(name)
    fresh_dynamo()
    tiny = FACTORIES[name]()
    orig = tiny.pipe.transformer
    cond, uncond = separate_copies(tiny, orig)
    tiny.pipe.transformer = wrapper = SeparateCopies(cond, uncond)
    separate = tiny("first")
    assert wrapper.calls == 2 * STEPS
    for copy_ in (cond, uncond):
        assert_pipelined(copy_, f"{name} separate copy")
    shared = {id(p) for p in pipefusion_compile.programs(cond)} & {id(p) for p in pipefusion_compile.programs(uncond)}
    assert not shared, "the two copies must not run through one program (the reference would share its state)"
    assert torch.equal(first, separate), (
        f"{name} M={patches(tiny)}: one compiled transformer differs from two separately compiled copies "
        f"(rel. {rel_err(first, separate):.3g}); per-program stats {stats}")
    warmup = sum(s["warmup_calls"] for s in stats)
    assert warmup == 2, f"{name}: {warmup} warmup call(s) in one generation, expected one per call stream: {stats}"


def separate_copies(tiny: TinyPipeline, transformer: torch.nn.Module):
    """Two compiled deep copies of `transformer` that do not share a pipefusion program. With equal options dynamo
    would reuse one graph (one program, per-module state) for both; the second copy asks for the torch kernels,
    which is what "auto" picks on CPU (same numbers), so dynamo compiles it on its own."""
    cond = compile_transformer(tiny, copy.deepcopy(transformer), patches(tiny))
    options = dict(num_stages=NUM_STAGES, num_patches=patches(tiny), stage_backend="eager", kernels="torch",
                   **tiny.options)
    uncond = torch.compile(copy.deepcopy(transformer), backend="pipefusion", options=options)
    return cond, uncond
