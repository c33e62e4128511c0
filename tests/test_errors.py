"""Failures users meet: every one is a `PipefusionError` that names the cause, nothing runs unchanged without
saying so, and nothing hangs.

1. Attention the backend does not recognize (hand-written softmax(q @ k^T) @ v, bmm / baddbmm / einsum,
   `nn.MultiheadAttention`, aten SDPA kernels): a WARNING naming the op and source line and a `declined()`
   record, or an error under option `strict` (the default when num_stages > 1).
2. Bad or unsupported input at every user-facing entry point raises a `PipefusionError` subclass (through
   torch.compile: as dynamo's BackendCompilerFailed around it), never a bare KeyError/TypeError/IndexError.
3. A peer rank that dies or stalls: the survivor says which, within seconds, and a true timeout says so.
"""
import ast
import builtins
import datetime
import json
import logging
import os
import pathlib
import re
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pipefusion_compile
from helpers import raised
from pipefusion_compile import OptionsError, PipefusionError, PlanError, UnsupportedGraphError

PACKAGE = pathlib.Path(pipefusion_compile.__file__).parent


def compile_pf(fn, **options):
    return torch.compile(fn, backend="pipefusion", options={"stage_backend": "eager", **options})


# ---------------------------------------------------------------------------------------------------------
# Small graphs: an image [1, 4, 8, 8] -> 64 tokens of 4 channels -> attention -> back to the image.


def tokens(x):
    return x.flatten(2).transpose(1, 2)


def heads(t):
    return t.reshape(1, 64, 2, 2).transpose(1, 2)


def image(t):
    return t.transpose(1, 2).reshape(1, 4, 8, 8)


def merge_heads(a):
    return image(a.transpose(1, 2).reshape(1, 64, 4))


def baddbmm_attention(x):
    t = tokens(x)
    bias = torch.zeros(1, 64, 64)
    return image(torch.softmax(torch.baddbmm(bias, t, t.transpose(1, 2), alpha=0.5), dim=-1).bmm(t))


def sdpa_attention(x):
    q = heads(tokens(x))
    return merge_heads(F.scaled_dot_product_attention(q, q, q))


class SoftmaxHead(nn.Module):
    """softmax(x @ W) with W a parameter: a linear layer, not attention."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return image((tokens(x) @ self.w).softmax(dim=-1))


def cross_attention(x, prompt):
    """Attention of the image tokens over a prompt: its keys do not carry image tokens."""
    t = tokens(x)
    return image(torch.softmax(t @ prompt.transpose(1, 2), dim=-1) @ prompt)


X = torch.randn(1, 4, 8, 8)

def softmax_over_queries(x):
    """softmax over the queries (dim=-2): not the function SDPA computes, so not rewritten to it."""
    q = heads(tokens(x))
    scores = q @ q.transpose(-2, -1) * 0.5
    return merge_heads(scores.softmax(dim=-2) @ q)


def gated_scores(x):
    """Scores multiplied by a token-dependent gate before the softmax: no SDPA mask expresses that."""
    q = heads(tokens(x))
    scores = (q @ q.transpose(-2, -1)) * torch.sigmoid(q.sum(-1, keepdim=True))
    return merge_heads(torch.softmax(scores, dim=-1) @ q)


class MHAWeightsBlock(nn.Module):
    """nn.MultiheadAttention whose averaged attention weights are read (SDPA does not return them)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        t = tokens(x)
        out, weights = self.attn(t, t, t)
        return image(t + out * weights.mean(-1, keepdim=True))


# Attention written in forms the backend does not rewrite to SDPA (the forms it does rewrite, hand-written
# softmax(q k^T) v with matmul/bmm/einsum, nn.MultiheadAttention and aten kernels, are pipelined:
# tests/test_attention_forms.py)
UNRECOGNIZED = [
    (softmax_over_queries, "hand-written attention", "scores.softmax(dim=-2) @ q"),
    (gated_scores, "hand-written attention", "torch.softmax(scores, dim=-1) @ q"),
    (baddbmm_attention, "hand-written attention", "torch.baddbmm(bias"),   # beta=1: the bias buffer is added
    (MHAWeightsBlock(), "torch.nn.MultiheadAttention", "self.attn(t, t, t)"),
]


@pytest.mark.parametrize("fn, form, line", UNRECOGNIZED, ids=lambda v: getattr(v, "__name__", None))
def test_unrecognized_attention_is_an_error_when_pipelining(fn, form, line):
    err = raised(compile_pf(fn, num_stages=2), X)  # strict is on by default with num_stages > 1
    assert isinstance(err, UnsupportedGraphError)
    msg = str(err)
    assert "attention-like computation over the image tokens" in msg and form in msg, msg
    assert line in msg, msg  # the source line, from dynamo's stack trace
    assert "scaled_dot_product_attention" in msg and "'strict': False" in msg  # what the user can change


@pytest.mark.parametrize("fn, form, line", UNRECOGNIZED[:1] + UNRECOGNIZED[-1:],
                         ids=lambda v: getattr(v, "__name__", None))
def test_unrecognized_attention_without_strict_warns_runs_unchanged_and_is_recorded(fn, form, line, caplog):
    with caplog.at_level(logging.INFO, logger="pipefusion_compile"):
        compiled = compile_pf(fn, num_stages=2, strict=False)
        with torch.no_grad():
            got = compiled(X)
            torch.testing.assert_close(got, fn(X))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "runs UNCHANGED" in warnings[0] and form in warnings[0] and line in warnings[0]
    records = [r for r in pipefusion_compile.declined() if any(form in a for a in r.attention)]
    assert records and "[1, 4, 8, 8]" in str(records[-1])
    if isinstance(fn, nn.Module):  # found through the model's weights, like programs()
        (record,) = pipefusion_compile.declined(compiled)
        assert form in record.attention[0] and not pipefusion_compile.programs(compiled)


def test_strict_defaults_off_for_one_stage(caplog):
    with caplog.at_level(logging.WARNING, logger="pipefusion_compile"):
        with torch.no_grad():
            compile_pf(softmax_over_queries, num_stages=1)(X)
    assert any("runs UNCHANGED" in r.getMessage() for r in caplog.records)
    err = raised(compile_pf(softmax_over_queries, num_stages=1, strict=True), X)
    assert "hand-written attention" in str(err)


@pytest.mark.parametrize("fn, args", [
    (SoftmaxHead(), (X,)),                              # softmax(x @ W): W is a parameter
    (cross_attention, (X, torch.randn(1, 6, 4))),       # the keys come from the prompt
    (lambda x: F.conv2d(x, torch.ones(4, 4, 3, 3), padding=1), (X,)),  # no attention at all
], ids=["softmax-of-linear", "cross-attention", "conv"])
def test_graphs_without_attention_over_image_tokens_run_unchanged_quietly(fn, args, caplog):
    with caplog.at_level(logging.INFO, logger="pipefusion_compile"):
        with torch.no_grad():
            got = compile_pf(fn, num_stages=2, strict=True)(*args)
    torch.testing.assert_close(got, fn(*args))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("runs unchanged" in r.getMessage() for r in caplog.records)


def test_pipelined_model_is_not_declined():
    from toy_models import make_toy

    model, kwargs = make_toy(ff_mults=(1, 1))
    compiled = compile_pf(model, num_stages=2, num_patches=2)
    with torch.no_grad():
        compiled(**kwargs)
    assert len(pipefusion_compile.programs(compiled)) == 1
    assert pipefusion_compile.declined(compiled) == []
    with pytest.raises(PipefusionError, match="expected a torch.compile'd module"):
        pipefusion_compile.declined(42)


# ---------------------------------------------------------------------------------------------------------
# Bad or unsupported input: a PipefusionError naming the cause, at every entry point


def _toy(**options):
    from toy_models import make_toy

    model, kwargs = make_toy(ff_mults=(1, 1))
    return lambda: compile_pf(model, **options)(**kwargs)


def _toy_at(size, **options):
    from toy_models import make_toy

    model, kwargs = make_toy(ff_mults=(1, 1), size=size)
    return lambda: compile_pf(model, **options)(**kwargs)


def _world_size_mismatch():
    import torch.distributed as dist
    from dist_utils import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        _toy(num_stages=2)()
    finally:
        dist.destroy_process_group()


def _no_image_output(x):
    q = heads(tokens(x))
    return F.scaled_dot_product_attention(q, q, q).sum(dim=(1, 2))


def _no_tensor_output(x):
    q = heads(tokens(x))
    return [F.scaled_dot_product_attention(q, q, q).shape[0], 3]


def _group_norm_next_to_attention(x):
    a = sdpa_attention(x)
    return F.group_norm(a.flatten(2), 2).reshape(1, 4, 8, 8)


def _symbolic_traced_graph():
    gm = torch.fx.symbolic_trace(sdpa_attention)
    pipefusion_compile.pipefusion_backend(gm, [X], options={"num_stages": 1})


BAD_INPUT = [
    # options
    ("options not a dict", lambda: torch.compile(sdpa_attention, backend="pipefusion", options="num_stages=2")(X),
     OptionsError, "expected a dict of pipefusion options"),
    ("option list of pairs",
     lambda: torch.compile(sdpa_attention, backend="pipefusion", options=[("num_stages", 2)])(X),
     OptionsError, "expected a dict"),
    ("unknown option", lambda: compile_pf(sdpa_attention, num_stage=2)(X), OptionsError,
     r"unknown pipefusion option\(s\) \['num_stage'\]"),
    ("num_stages 0", lambda: compile_pf(sdpa_attention, num_stages=0)(X), OptionsError, "num_stages=0"),
    ("timeout nan", lambda: compile_pf(sdpa_attention, timeout_s=float("nan"))(X), OptionsError, "timeout_s=nan"),
    ("timeout inf", lambda: compile_pf(sdpa_attention, timeout_s=float("inf"))(X), OptionsError, "timeout_s=inf"),
    ("strict not a bool", lambda: compile_pf(sdpa_attention, strict="yes")(X), OptionsError, "strict='yes'"),
    ("options class", lambda: pipefusion_compile.PipefusionOptions(num_patches="4"), OptionsError,
     "num_patches='4'"),
    ("token_axis beyond the input", lambda: compile_pf(sdpa_attention, token_axis=9)(X), OptionsError,
     r"token_axis=9: the image input .* \[1, 4, 8, 8\] has 4 dims"),
    ("token_axis on the columns", _toy(num_stages=2, token_axis=3), UnsupportedGraphError,
     "option token_axis=3 puts the token rows on axis 3"),
    # the model and the plan
    ("more stages than attention layers", _toy(num_stages=3), PlanError,
     "num_stages=3 is more than the 2 attention layers"),
    ("M larger than the token rows", _toy(num_stages=2, num_patches=9), PlanError,
     "num_patches=9 is larger than the 8 token rows"),
    ("image too small to split", _toy_at(2, num_stages=1), UnsupportedGraphError,
     r"\[1, 4, 2, 2\] is too small: its 2 rows make a single token row"),
    ("world size mismatch", _world_size_mismatch, PlanError,
     "the process group has 1 ranks but the plan has num_stages=2"),
    ("unsupported op next to attention", lambda: compile_pf(_group_norm_next_to_attention)(X),
     UnsupportedGraphError, r"group_norm has no token rule(.|\n)*F.group_norm\(a.flatten\(2\), 2\)"),
    ("attention but no image output", lambda: compile_pf(_no_image_output, num_stages=2)(X),
     UnsupportedGraphError, "could not find the image input"),
    ("no tensor output", lambda: compile_pf(_no_tensor_output, num_stages=2)(X), UnsupportedGraphError,
     "the graph returns no tensor"),
    ("graph not traced by dynamo", _symbolic_traced_graph, UnsupportedGraphError,
     "carries no example values"),
    # other entry points
    ("unknown built-in model", lambda: pipefusion_compile.plan("NoSuchModel"), pipefusion_compile.ModelSpecError,
     "unknown model 'NoSuchModel'"),
    ("model module that does not import", lambda: pipefusion_compile.plan("no_such_module:make"),
     pipefusion_compile.ModelSpecError, "cannot load make from module no_such_module"),
    ("programs of a non-module", lambda: pipefusion_compile.programs("model"), PipefusionError,
     "expected a torch.compile'd module, got str"),
]


@pytest.mark.parametrize("name, call, kind, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_raises_a_pipefusion_error_naming_the_cause(name, call, kind, message):
    err = raised(call)
    assert isinstance(err, kind), f"{type(err).__name__}: {err}"
    assert err.__class__.__module__.startswith("pipefusion_compile")
    assert re.search(message, str(err)), str(err)


def test_non_tensor_inputs_are_fine():
    def fn(x, scale, mode):
        y = sdpa_attention(x * scale)
        return y if mode == "plain" else -y

    with torch.no_grad():
        got = compile_pf(fn, num_stages=1, num_patches=2, warmup_steps=2)(X, 2.0, "plain")
    torch.testing.assert_close(got, fn(X, 2.0, "plain"))


def test_dynamic_true_plans_per_concrete_shape():
    """dynamic=True hands the backend symbolic sizes from the first call on (and LayerNorm's eps as a 0-d
    tensor read with .item()): it plans one program per concrete shape and equals the plain model."""
    from toy_models import make_toy

    model, kwargs = make_toy(ff_mults=(1, 1))
    compiled = torch.compile(model, backend="pipefusion", dynamic=True,
                             options={"num_stages": 2, "num_patches": 1, "stage_backend": "eager"})
    for size in (16, 12):
        x = {"hidden_states": torch.randn(1, 4, size, size)}
        with torch.no_grad():
            torch.testing.assert_close(compiled(**x), model(**x))
    assert sorted(p.plan.input_shape for p in pipefusion_compile.programs(compiled)) == [(1, 4, 12, 12),
                                                                                         (1, 4, 16, 16)]


# Failures inside the backend itself (simulated by breaking one step): named by phase, node or stage, and
# never a bare exception. A fake-tensor exception would even make dynamo fall back to eager silently.


def test_failing_token_rule_names_the_op_and_line(monkeypatch):
    from pipefusion_compile.passes import token_rules

    def broken(ctx):
        raise KeyError("weight")

    monkeypatch.setitem(token_rules.RULES, F.layer_norm, broken)
    err = raised(_toy(num_stages=2))
    assert "the token rule of op torch.nn.functional.layer_norm failed on this node: KeyError" in str(err)
    assert "self.norm1(x)" in str(err)


def test_failing_cost_analysis_names_the_node_and_does_not_fall_back_to_eager(monkeypatch):
    from torch._subclasses.fake_tensor import UnsupportedOperatorException

    from pipefusion_compile.passes import cost

    real = cost.node_flops

    def flops(node, fake_mode=None):
        if node.target is F.gelu:
            raise UnsupportedOperatorException("aten.gelu.default")
        return real(node, fake_mode)

    monkeypatch.setattr(cost, "node_flops", flops)
    err = raised(_toy(num_stages=2))
    assert "the cost analysis could not run this op on fake tensors" in str(err) and "F.gelu" in str(err)


@pytest.mark.parametrize("module, name, phase", [
    ("pipefusion_compile.plan", "find_cut_candidates", "planning the pipeline failed: KeyError"),
    ("pipefusion_compile.passes.lower", "rewrite_token_sizes", "pass rewrite_token_sizes failed: KeyError"),
])
def test_failing_phase_is_named(monkeypatch, module, name, phase):
    import importlib

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(importlib.import_module(module), name, broken)
    assert phase in str(raised(_toy(num_stages=2, num_patches=2)))


def test_inner_backend_failure_names_the_stage(monkeypatch):
    import torch._inductor.compile_fx as compile_fx

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(compile_fx, "compile_fx", broken)
    err = raised(_toy(num_stages=2, num_patches=2, stage_backend="inductor"))
    assert "stage 0, a band piece of 8 token rows: the inner backend 'inductor' failed" in str(err)
    assert "'stage_backend': 'eager'" in str(err)


def test_timeline_and_kernel_errors_are_pipefusion_errors(tmp_path):
    from pipefusion_compile.kernels import write_band_reference
    from pipefusion_compile.timeline import merge

    assert "no rank*.jsonl timeline files" in str(raised(merge, str(tmp_path), None, None))
    err = raised(write_band_reference, torch.zeros(1, 4, 8), torch.zeros(1, 4, 4), 2, 6)
    assert "outside the output's 8 rows" in str(err)


def test_library_code_raises_no_bare_builtin_exceptions():
    """Every `raise` in the package raises a PipefusionError subclass (re-raises aside) and nothing relies on
    `assert`, which `python -O` removes and which names no cause."""
    builtin = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
               and issubclass(getattr(builtins, n), BaseException)}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assert):
                found.append(f"{path.name}:{node.lineno} assert")
            elif isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id in builtin:
                    found.append(f"{path.name}:{node.lineno} raise {exc.id}")
    assert not found, found


# ---------------------------------------------------------------------------------------------------------
# Peer death and timeouts, with real processes (gloo over 127.0.0.1)


def test_peer_death_is_reported_at_once_and_a_stall_as_a_timeout(tmp_path):
    """Two runs on two ranks, each on its own process group. Run 0: rank 0 stalls for 4 s in step 2 with
    timeout_s=2: rank 1 times out after 2 s and says so. Run 1: rank 0 exits in step 2 with timeout_s=60:
    rank 1 fails within seconds, saying that rank 0 closed the connection."""
    from dist_utils import run_ranks
    from error_workers import faulty_pipelines

    scenarios = [(0, 2, 1, ("stall", 4), {"timeout_s": 2}), (0, 2, 1, "exit", {"timeout_s": 60})]
    t0 = time.monotonic()
    results = run_ranks(faulty_pipelines, 2, scenarios, str(tmp_path), tmp_path=tmp_path, timeout=120,
                        allow_errors=True)
    assert time.monotonic() - t0 < 110
    assert results[0]["error"] == "no result" and results[1]["value"] == "done"  # rank 0 exited in run 1

    def outcome(run, rank):
        with open(os.path.join(tmp_path, f"s{run}_rank{rank}.json")) as f:
            return json.load(f)

    stalled = outcome(0, 1)
    assert stalled["type"] == "PipefusionCommError" and stalled["step"] == 2, stalled
    assert "timed out after 2s waiting for patch 1 from stage 0 (rank 0)" in stalled["message"]
    assert 1.5 < stalled["call_s"] < 15
    woke = outcome(0, 0)  # the stalled rank finds its peer gone when it wakes: an error, not a hang
    assert woke["type"] == "PipefusionCommError" and "closed the connection" in woke["message"], woke

    died = outcome(1, 1)
    # with patch-lazy outputs rank 0 runs up to a step ahead of rank 1: rank 1 may still be in step 1, waiting
    # for a patch rank 0 sent before it died (the send was still in flight)
    assert died["type"] == "PipefusionCommError" and died["step"] in (1, 2), died
    msg = died["message"]
    # patch 1, or patch 0 when rank 0 exits before its send of patch 0 has gone through
    assert re.search(r"rank 1 \(stage 1\), step (1|2), patch (\d): receiving patch \2 from stage 0 \(rank 0\) "
                     r"failed after \d+\.\ds", msg), msg
    assert "rank 0 (stage 0) closed the connection: it probably exited or crashed" in msg
    assert "timed out" not in msg
    assert died["call_s"] < 15  # at once, not after timeout_s=60
