"""Attention written in any form is rewritten to SDPA (`passes/canonical_attention.py`) and pipelined.

Levels: the rewrite on the dynamo graph (which nodes, which form, what is left alone), the lowered stage graph
(the K/V cache write before the attention that reads it), and numerics (M=1 equals the plain model; the
M=4 comparisons against the eager reference are in test_handwritten.py).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pipefusion_compile
from graph_utils import capture_model
from helpers import compile_pf
from pipefusion_compile.errors import UnsupportedGraphError
from pipefusion_compile.passes.canonical_attention import AttentionForm, attention_form, canonicalize_attention
from pipefusion_compile.passes.sdpa import is_sdpa

FORMS = ("sdpa", "manual", "manual_mask", "bmm", "einsum", "aten", "aten_mask", "mha", "mha_weights_unused")
EXPECTED = {"sdpa": AttentionForm.SDPA, "manual": AttentionForm.HAND_WRITTEN, "manual_mask": AttentionForm.HAND_WRITTEN,
            "bmm": AttentionForm.HAND_WRITTEN, "einsum": AttentionForm.HAND_WRITTEN, "aten": AttentionForm.ATEN,
            "aten_mask": AttentionForm.ATEN,
            "mha": AttentionForm.MHA, "mha_weights_unused": AttentionForm.MHA}


class Attend(nn.Module):
    """Self-attention over [B, S, D] written in one of `FORMS` (or a form SDPA cannot express)."""

    def __init__(self, form: str, dim: int = 16, heads: int = 2, tokens: int = 64):
        super().__init__()
        self.form, self.heads = form, heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.bias = nn.Parameter(torch.randn(heads, tokens, tokens) * 0.1)  # a learned additive bias (mask)

    def forward(self, x):
        b, n, d = x.shape
        h, hd = self.heads, d // self.heads
        if self.form == "mha":
            return self.mha(x, x, x, need_weights=False)[0]
        if self.form == "mha_weights_unused":
            return self.mha(x, x, x)[0]
        if self.form == "mha_weights_used":
            out, weights = self.mha(x, x, x)
            return out + weights.mean(-1, keepdim=True)
        q, k, v = self.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4).unbind(0)
        scale = hd ** -0.5
        if self.form == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        elif self.form == "manual":
            o = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v
        elif self.form == "manual_mask":
            o = F.softmax(torch.matmul(q, k.transpose(-2, -1)) / hd ** 0.5 + self.bias, dim=-1) @ v
        elif self.form == "manual_other_dim":   # a softmax over the queries: not attention SDPA can compute
            o = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-2) @ v
        elif self.form == "manual_multiplicative":   # scores times a tensor: no SDPA mask expresses it
            o = ((q @ k.transpose(-2, -1)) * self.bias).softmax(dim=-1) @ v
        elif self.form == "bmm":
            q, k, v = (t.reshape(b * h, n, hd) for t in (q, k, v))
            s = torch.baddbmm(torch.empty(b * h, n, n, dtype=q.dtype), q, k.transpose(1, 2), beta=0, alpha=scale)
            o = torch.bmm(s.softmax(-1), v).reshape(b, h, n, hd)
        elif self.form == "einsum":
            s = torch.einsum("bhid,bhjd->bhij", q, k) * scale
            o = torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v)
        elif self.form == "aten":
            o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        elif self.form == "aten_mask":   # the mask (a keyword of the kernel) must be carried over, not dropped
            o = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=self.bias[None])[0]
        else:
            raise ValueError(self.form)
        return o.transpose(1, 2).reshape(b, n, d)


class FormDiT(nn.Module):
    """Patch embed, `layers` blocks whose attention is written in `form`, unpatchify. [B, 4, 16, 16]."""

    def __init__(self, form: str, layers: int = 2, dim: int = 16):
        super().__init__()
        self.embed = nn.Conv2d(4, dim, 2, stride=2)
        self.attn = nn.ModuleList(Attend(form, dim) for _ in range(layers))
        self.ff = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.out = nn.Linear(dim, 16)

    def forward(self, hidden_states, return_dict=True):
        b = hidden_states.shape[0]
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        for attn, ff in zip(self.attn, self.ff):
            x = x + attn(x)
            x = x + F.gelu(ff(x))
        x = self.out(x).reshape(b, 8, 8, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(b, 4, 16, 16)
        return (x,)


def make(form: str, layers: int = 2):
    torch.manual_seed(0)
    return FormDiT(form, layers).eval(), torch.randn(2, 4, 16, 16)


@pytest.mark.parametrize("form", FORMS)
def test_every_form_becomes_one_sdpa_per_layer(form):
    model, x = make(form)
    gm, example_inputs = capture_model(model, {"hidden_states": x})
    done = canonicalize_attention(gm)
    sdpa = [n for n in gm.graph.nodes if is_sdpa(n)]
    assert len(sdpa) == 2
    assert [attention_form(n) for n in sdpa] == [EXPECTED[form]] * 2
    assert [r.form for r in done] == ([] if form == "sdpa" else [EXPECTED[form]] * 2)
    # nothing of the old form is left: no softmax, no product of the scores, no MHA call, no aten kernel
    left = [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes
            if n.op in ("call_function", "call_method")]
    gone = ("softmax", "matmul", "bmm", "baddbmm", "einsum", "multi_head_attention_forward",
            "_scaled_dot_product_flash_attention_for_cpu")
    assert not [t for t in left if t in gone or t.split(".")[-1] in gone]
    with torch.no_grad():
        torch.testing.assert_close(gm(*example_inputs)[0], model(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ("manual_other_dim", "manual_multiplicative", "mha_weights_used"))
def test_forms_sdpa_cannot_express_are_left_and_named(form):
    """Not rewritten (the graph keeps its own ops), so the backend refuses them, naming the op."""
    model, x = make(form)
    gm, _ = capture_model(model, {"hidden_states": x})
    assert canonicalize_attention(gm) == []
    compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as e:
        with torch.no_grad():
            compiled(x)
    err = e.value.inner_exception
    assert isinstance(err, UnsupportedGraphError)
    assert "does not recognize as attention" in str(err) and "node:" in str(err)


@pytest.mark.parametrize("form", [f for f in FORMS if f != "sdpa"])
def test_rewritten_attention_gets_stale_kv_caches(form):
    """The lowered band graph writes the band's K/V into the caches before the attention reads them."""
    model, x = make(form)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    with torch.no_grad():
        compiled(x)
    (program,) = programs
    assert [len(s.attention_layers) for s in program.plan.stages] == [1, 1]
    for stage in program.stages:
        g = stage.lowered.patch_graph(4).graph
        nodes = list(g.nodes)
        update = [i for i, n in enumerate(nodes) if n.target is torch.ops.pipefusion.kv_cache_update.default]
        attn = [i for i, n in enumerate(nodes) if is_sdpa(n)]
        assert len(update) == len(attn) == 1 and update[0] < attn[0]
        (sdpa,) = (n for n in nodes if is_sdpa(n))
        assert all(a.op == "placeholder" and "cache" in a.name for a in sdpa.args[1:3])


@pytest.mark.parametrize("form", [f for f in FORMS if f != "sdpa"])
def test_one_patch_equals_plain_model(form):
    model, x = make(form)
    with torch.no_grad():
        want = model(x)[0]
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    with torch.no_grad():
        got = compiled(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert programs and not pipefusion_compile.declined(compiled)
