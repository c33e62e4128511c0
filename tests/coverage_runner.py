"""Run one coverage case (tests/coverage_cases.py) through the checks of the coverage table.

Each column is computed on its own and catches everything: a crash in one cell never stops the row or the
table. A failure is reported as "<ExceptionClass>: <first line>"; a failure that is not a
`pipefusion_compile.errors.PipefusionError` (a crash inside a pass, a wrong result, a compiled call that ran
without pipelining) is marked `NOT PipefusionError`, since every failure should name the op, node and source
line on purpose.
"""
from __future__ import annotations

import dataclasses
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

import pipefusion_compile
from coverage_cases import Case
from helpers import call_model, sample_loop
from pipefusion_compile import pipefusion_backend
from pipefusion_compile.errors import PipefusionError
from reference_pipefusion import ReferencePipeFusion

PASS = "yes"


@dataclass
class Row:
    name: str
    graphs: str = "-"                 # graphs dynamo handed the backend, graph breaks
    plan: str = "-"                   # "N stages / R token rows", or the error
    m1_equal_plain: str = "-"         # num_patches=1 == the plain model at every step
    m4_equal_reference: str = "-"     # num_patches=4, warmup 1 == ReferencePipeFusion at every step
    ranks2_equal_simulate: str = "-"  # 2 real ranks == simulate, bit for bit (only with ranks=True)
    error: str = ""                   # the first failure: "<class>: <first line>" (+ NOT PipefusionError)
    seconds: float = 0.0
    failures: list = field(default_factory=list, repr=False)  # (column, exception) per failed cell

    @property
    def passed_m4(self) -> bool:
        return self.m4_equal_reference == PASS


class CheckFailed(AssertionError):
    """A check of the table failed without an exception from the backend (wrong numbers, not pipelined)."""


def unwrap(e: BaseException) -> BaseException:
    """The backend's own exception, out of dynamo's BackendCompilerFailed (or another wrapper that chains it)."""
    from torch._dynamo.exc import BackendCompilerFailed

    while isinstance(e, BackendCompilerFailed) and (getattr(e, "inner_exception", None) or e.__cause__):
        e = getattr(e, "inner_exception", None) or e.__cause__
    return e


def describe(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    text = f"{type(e).__name__}: {lines[0].strip() if lines else ''}"
    if not isinstance(e, PipefusionError):
        text += " [NOT PipefusionError]"
        # where it happened, for a crash (the innermost frame of the package or of diffusers)
        frames = traceback.extract_tb(e.__traceback__)
        inner = [f for f in frames if "pipefusion_compile" in f.filename or "diffusers" in f.filename]
        if inner and not isinstance(e, CheckFailed):
            f = inner[-1]
            text += f" at {f.filename.split('site-packages/')[-1].split('wt-cov/')[-1]}:{f.lineno} ({f.name})"
    return text


def _compile(model, options: dict):
    """torch.compile with the pipefusion backend; returns (compiled, the graphs dynamo handed the backend)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return pipefusion_backend(gm, example_inputs, options=options)

    return torch.compile(model, backend=backend), graphs


def _pipelined(compiled) -> list:
    """The programs that pipelined at least one call; raise when none did."""
    found = pipefusion_compile.programs(compiled)
    if not found:
        reasons = "; ".join(str(d).splitlines()[0] for d in pipefusion_compile.declined(compiled))
        raise CheckFailed(f"no program was built (ran unchanged){': ' + reasons if reasons else ''}")
    if sum(p.stats.get("pipelined_calls", 0) for p in found) == 0:
        raise CheckFailed("a program was built but no call was pipelined (pipelined_calls == 0)")
    return found


def _compare(got_steps, want_steps, rtol, atol, what):
    if len(got_steps) != len(want_steps):
        raise CheckFailed(f"{what}: {len(got_steps)} steps vs {len(want_steps)}")
    for i, (got, want) in enumerate(zip(got_steps, want_steps)):
        if got.shape != want.shape:
            raise CheckFailed(f"{what}: step {i} shape {tuple(got.shape)} vs {tuple(want.shape)}")
        scale = max(1.0, float(want.abs().max()))
        try:
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol * scale)
        except AssertionError:
            diff = float((got - want).abs().max())
            raise CheckFailed(f"{what}: differs at step {i} (max abs diff {diff:.2e}, |want| max {scale:.2e})") \
                from None


def _graphs_cell(graphs) -> str:
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return f"{len(graphs)} graph{'s' if len(graphs) != 1 else ''}, {breaks} break{'s' if breaks != 1 else ''}"


def base_options(case: Case, stages: int, patches: int, warmup: int = 1) -> dict:
    return {"num_stages": stages, "num_patches": patches, "warmup_steps": warmup, "stage_backend": "eager",
            **dict(case.options)}


def run_case(case: Case, stages: int = 2, patches: int = 4, steps: int = 3, ranks: bool = False) -> Row:
    row = Row(case.name)
    t0 = time.perf_counter()
    try:
        if case.skip:
            row.error = f"skip: {case.skip}"
            return row
        with torch._dynamo.config.patch(**dict(case.dynamo_config)):
            _run(case, row, stages, patches, steps, ranks)
    finally:
        row.seconds = time.perf_counter() - t0
        torch._dynamo.reset()
    if row.failures and not row.error:
        col, e = row.failures[0]
        row.error = f"{col}: {describe(e)}"
    return row


def _fail(row: Row, column: str, e: BaseException) -> str:
    e = unwrap(e)
    row.failures.append((column, e))
    return "no" if isinstance(e, CheckFailed) else ("error" if isinstance(e, PipefusionError) else "crash")


def _run(case: Case, row: Row, stages: int, patches: int, steps: int, ranks: bool) -> None:
    try:
        torch.manual_seed(0)
        model, kwargs = case.build()
        _, plain = sample_loop(call_model(model, case.feed), kwargs, steps=steps, feed=case.feed)
    except BaseException as e:  # the builder or the plain model: nothing else can run
        row.failures.append(("build", e))
        row.graphs = row.plan = row.m1_equal_plain = row.m4_equal_reference = "build failed"
        return

    # M = 4 first: its compile gives the graphs and the plan columns
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    simulate_final = simulate_steps = None
    compiled, graphs = _compile(model, base_options(case, stages, patches))
    try:
        final, got = sample_loop(call_model(compiled, case.feed), kwargs, steps=steps, feed=case.feed)
    except BaseException as e:
        row.graphs = _graphs_cell(graphs) if graphs else "none traced"
        row.plan = _fail(row, f"M={patches} compile/run", e)
        row.m4_equal_reference = "not run"
    else:
        row.graphs = _graphs_cell(graphs)
        try:
            found = _pipelined(compiled)
            plan = found[0].plan
            row.plan = f"{plan.num_stages} stages / {plan.input_rows} token rows" + (
                f", text {plan.text}" if plan.text else "") + (
                f" (+{len(found) - 1} more programs)" if len(found) > 1 else "")
        except BaseException as e:
            row.plan = _fail(row, "plan", e)
            row.m4_equal_reference = "not run"
        else:
            simulate_final, simulate_steps = final, got
            try:
                reference = ReferencePipeFusion(model, num_patches=patches, warmup_steps=1,
                                                text_tokens=case.text_tokens, text_first=case.text_first,
                                                layout=case.layout, prediction=case.feed.prediction,
                                                reductions=case.reductions, key_text_tokens=case.key_text_tokens,
                                                stream_tokens=case.stream_tokens, after_tokens=case.after_tokens)
                # the reference returns the prediction already (it assembles the patches' rows of it)
                feed = dataclasses.replace(case.feed, prediction=None)
                _, want = sample_loop(lambda x, t, **kw: reference(x, **{feed.timestep_arg: t}, **kw), kwargs,
                                      steps=steps, feed=feed)
                _compare(got, want, 1e-4, 1e-5, f"M={patches} vs the eager reference")
                row.m4_equal_reference = PASS
            except BaseException as e:
                row.m4_equal_reference = _fail(row, f"M={patches}", e)

    # M = 1 against the plain model
    torch._dynamo.reset()
    try:
        compiled, _ = _compile(model, base_options(case, stages, 1))
        _, got = sample_loop(call_model(compiled, case.feed), kwargs, steps=steps, feed=case.feed)
        _pipelined(compiled)
        _compare(got, plain, 1e-5, 1e-6, "M=1 vs the plain model")
        row.m1_equal_plain = PASS
    except BaseException as e:
        row.m1_equal_plain = _fail(row, "M=1", e)

    if ranks:
        torch._dynamo.reset()
        try:
            if simulate_steps is None:
                raise CheckFailed("no simulate result to compare with")
            row.ranks2_equal_simulate = _two_ranks(case, stages, patches, steps, simulate_final, simulate_steps)
        except BaseException as e:
            row.ranks2_equal_simulate = _fail(row, "2 ranks", e)


def _two_ranks(case: Case, stages, patches, steps, final, per_step) -> str:
    from coverage_workers import run_case_rank
    from dist_utils import run_ranks

    with tempfile.TemporaryDirectory() as tmp:
        results = run_ranks(run_case_rank, stages, case.name, base_options(case, stages, patches), steps,
                            tmp_path=tmp, timeout=300.0)
    for res in results:
        value = res["value"]
        if not value["pipelined"]:
            raise CheckFailed(f"rank {res['rank']}: no call was pipelined")
        if not torch.equal(value["final"], final) or not all(
                torch.equal(a, b) for a, b in zip(value["steps"], per_step)):
            diff = float((value["final"] - final).abs().max())
            raise CheckFailed(f"rank {res['rank']} differs from simulate (final max abs diff {diff:.2e})")
    return PASS
