"""Token analysis: classification of real models' nodes and unit tests of each op rule."""
import operator

import pytest
import torch
import torch.nn.functional as F

from graph_utils import by_name, capture_graphs, capture_model
from pipefusion_compile.errors import UnsupportedGraphError
from pipefusion_compile.models import dit, flux, ltx_video, pixart, sd3
from pipefusion_compile.passes.meta import Kind, node_meta
from pipefusion_compile.passes.tokens import AttemptOutcome, analyze_tokens


def _info(gm, name):
    return node_meta(by_name(gm)[name]).token


def _linears(gm):
    return [n for n in gm.graph.nodes if n.target is torch._C._nn.linear]


def test_pixart_classification():
    model, kwargs = pixart(num_layers=3)
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    assert a.token_input == "l_hidden_states_" and a.input_axis == 2
    assert (a.input_rows, a.granule, a.token_rows) == (16, 2, 8)
    assert len(a.self_attention) == 3 and len(a.cross_attention) == 3
    assert a.positional == ["l_self_dict_modules_pos_embed_buffers_pos_embed_"]
    assert _info(gm, a.positional[0]).axis == 1
    # the patch embedding conv is token-local; its output has one element per 2 input rows on axis 2
    conv = next(n for n in gm.graph.nodes if n.target is torch.conv2d)
    assert node_meta(conv).token.kind is Kind.PATCHED and node_meta(conv).token.axis == 2
    assert node_meta(conv).token.epr == 0.5
    # every linear that reads the prompt or the timestep is GLOBAL; every linear on image tokens is PATCHED
    for lin in _linears(gm):
        info = node_meta(lin).token
        src = node_meta(lin.args[0]).token
        assert info.kind is (Kind.PATCHED if src.carries_tokens else Kind.GLOBAL), lin.name
    prompt_linears = [n for n in _linears(gm) if node_meta(n).token.kind is Kind.GLOBAL]
    # caption projection (2) + timestep embedding (3) + K and V of each cross-attention (2 per layer)
    assert len(prompt_linears) == 2 + 3 + 2 * 3
    for name in a.self_attention:
        info = _info(gm, name)
        assert info.kind is Kind.MIXING and info.attention == "self" and info.axis == 2
    for name in a.cross_attention:
        sdpa = by_name(gm)[name]
        assert node_meta(sdpa.args[1]).token.kind is Kind.GLOBAL
    out = next(n for n in gm.graph.nodes if n.op == "output").all_input_nodes[0]
    assert node_meta(out).token.axis == 2 and node_meta(out).token.epr == 1


def test_dit_classification():
    model, kwargs = dit(num_layers=2)
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    assert len(a.self_attention) == 2 and a.cross_attention == []
    assert a.counts["mixing"] == 2
    # class-label embedding and the adaLN modulation are GLOBAL
    emb = [n for n in gm.graph.nodes if n.target is F.embedding]
    assert emb and all(node_meta(n).token.kind is Kind.GLOBAL for n in emb)
    einsum = next(n for n in gm.graph.nodes if n.target is torch.functional.einsum)
    # unpatchify 'nhwpqc->nchpwq': the token rows move from axis 1 to axis 2
    assert node_meta(einsum.args[1]).token.axis == 1 and node_meta(einsum).token.axis == 2


def test_ltx_video_packed_tokens_rope_and_masked_cross_attention():
    model, kwargs = ltx_video(num_layers=2)
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    # packed [B, frames * rows * cols, C]: every token is a "row", frame-major, so a band is a token range
    assert (a.input_axis, a.input_rows, a.granule) == (1, 2 * 8 * 8, 1)
    assert len(a.self_attention) == 2 and len(a.cross_attention) == 2
    # RoPE cos/sin tables are computed once (GLOBAL) and sliced per patch (POSITIONAL) along their token axis
    assert len(a.positional) == 2
    for name in a.positional:
        info = _info(gm, name)
        assert info.kind is Kind.POSITIONAL and info.axis == 1
    # the prompt mask stays GLOBAL and is used by the cross-attention only
    for name in a.cross_attention:
        sdpa = by_name(gm)[name]
        mask = sdpa.kwargs.get("attn_mask")
        assert mask is not None and node_meta(mask).token.kind is Kind.GLOBAL


def analyze_fn(fn, x=None, **extra):
    x = torch.randn(1, 4, 8, 8) if x is None else x
    (gm, ex), = capture_graphs(fn, x, **extra)
    return gm, analyze_tokens(gm, ex)


def _positional(gm):
    return [n for n in gm.graph.nodes if n.op != "output" and node_meta(n).token.kind is Kind.POSITIONAL]


def _axes(gm):
    return {n.name: node_meta(n).token.axis for n in gm.graph.nodes
            if n.op != "output" and node_meta(n).token.carries_tokens}


def test_rule_view_reshape_flatten_unflatten_permute_transpose():
    def f(x):
        t = x.flatten(2)              # [1, 4, 64]     axis 2, 8 per row
        t = t.transpose(1, 2)         # [1, 64, 4]     axis 1
        t = t.reshape(1, 8, 8, 4)     # [1, 8, 8, 4]   axis 1, 1 per row
        t = t.permute(0, 3, 1, 2)     # [1, 4, 8, 8]   axis 2
        u = t.unflatten(1, (2, 2))    # [1, 2, 2, 8, 8] axis 3
        u = u.flatten(1, 2)           # [1, 4, 8, 8]   axis 2
        return u * 2

    gm, a = analyze_fn(f)
    axes = _axes(gm)
    assert list(axes.values()) == [2, 2, 1, 1, 2, 3, 2, 2]
    assert a.granule == 1 and a.token_rows == 8


def test_rule_view_splitting_rows_sets_granule():
    def f(x):
        t = x.reshape(1, 4, 4, 16)    # two input rows per element on axis 2
        return (t + 1).reshape(1, 4, 8, 8)

    gm, a = analyze_fn(f)
    assert a.granule == 2 and a.token_rows == 4


def test_rule_reshape_merging_batch_into_tokens_fails():
    def f(x):
        t = x.permute(0, 2, 1, 3).reshape(4, 4, 32)   # [2, 8, 4, 8]: batch x half the rows: not a fold
        return (t * 2).reshape(2, 8, 4, 8).permute(0, 2, 1, 3)

    with pytest.raises(UnsupportedGraphError, match="merges the token axis"):
        analyze_fn(f, torch.randn(2, 4, 8, 8))


def _analyze_frames_first(f, x):
    (gm, ex), = capture_graphs(f, x)
    return gm, analyze_tokens(gm, ex, token_axis=1)


def test_rule_fold_batch_with_frames_for_a_per_frame_conv_and_unfold():
    """[B, F, C, H, W] -> reshape(-1, C, H, W) -> conv -> view(B, F, ...): the frames (token rows) are folded
    with the batch (outer-major) for a per-frame conv, and unfolded by the view."""
    w = torch.randn(4, 4, 3, 3)

    def f(x):
        b, fr, c, h, wd = x.shape
        t = x.reshape(-1, c, h, wd)                       # [B*F, 4, 8, 8]: folded, outer B
        t = F.conv2d(t, w, padding=1)                     # over H, W; the folded axis is the conv's batch
        t = F.silu(t).flatten(2)                          # element-wise, reshape keeping the fold
        return t.view(b, fr, c, h, wd)                    # unfold: frames on axis 1 again

    gm, a = _analyze_frames_first(f, torch.randn(2, 3, 4, 8, 8))
    nodes = [n for n in gm.graph.nodes if n.op != "output" and node_meta(n).token.carries_tokens]
    infos = {n.name: node_meta(n).token for n in nodes}
    folded = [n for n, i in infos.items() if i.outer > 1]
    assert [infos[n].rule for n in folded] == ["reshape-fold", "conv-batch-axis", "elementwise", "reshape"]
    assert all(infos[n].outer == 2 and infos[n].axis == 0 and infos[n].epr == 2 for n in folded)
    unfold = next(i for i in infos.values() if i.rule == "reshape-unfold")
    assert (unfold.axis, unfold.outer, unfold.epr) == (1, 1, 1)
    assert a.token_rows == 3 and a.granule == 1


def test_frames_first_token_axis_is_found_and_a_failure_lists_the_axes_tried():
    w = torch.randn(4, 4, 1, 1)

    def f(x):   # [B, F, C, H, W]: the conventional axis for 5-D inputs (2) is the channels here
        t = F.conv2d(x.reshape(-1, 4, 8, 8), w).view(2, 3, 4, 8, 8)
        q = t.permute(0, 1, 3, 4, 2).reshape(2, 1, 3 * 64, 4)
        return F.scaled_dot_product_attention(q, q, q).reshape(2, 3, 8, 8, 4).permute(0, 1, 4, 2, 3)

    (gm, ex), = capture_graphs(f, torch.randn(2, 3, 4, 8, 8))
    a = analyze_tokens(gm, ex)
    assert (a.input_axis, a.token_rows, len(a.self_attention)) == (1, 3, 1)
    assert [(t.axis, t.outcome) for t in a.attempts] == [(1, AttemptOutcome.CHOSEN)]

    def g(x):   # no attention: nothing tells the axes apart, so the conventional axis decides
        return F.conv2d(x.reshape(-1, 4, 8, 8), w).view(2, 3, 4, 8, 8)

    (gm, ex), = capture_graphs(g, torch.randn(2, 3, 4, 8, 8))
    with pytest.raises(UnsupportedGraphError, match="conv over the channels") as err:
        analyze_tokens(gm, ex)
    text = str(err.value)
    assert "axis 1: the analysis succeeded but found no self-attention" in text
    assert "axis 2: the analysis failed: conv over the channels" in text and "token_axis" in text
    assert analyze_tokens(gm, ex, token_axis=1).token_rows == 3


@pytest.mark.parametrize("case", ["positional", "attention"])
def test_rule_folded_token_axis_slices_tables_and_caches_per_block(case):
    """A table with one entry per (batch, frame) on the folded [B * F] axis is POSITIONAL with the same fold
    (sliced block by block), and attention along the folded axis is a self-attention over it (its cache
    written block by block)."""
    table = torch.randn(6, 4, 1, 1)

    def f(x):
        t = x.reshape(-1, 4, 8, 8)                        # [B*F, 4, 8, 8], outer 2
        if case == "positional":
            t = t + table
        else:
            q = t.flatten(1).unsqueeze(0)
            t = F.scaled_dot_product_attention(q, q, q).reshape(6, 4, 8, 8)
        return t.reshape(2, 3, 4, 8, 8)

    gm, a = _analyze_frames_first(f, torch.randn(2, 3, 4, 8, 8))
    infos = {n.name: n.meta["pipefusion"].token for n in gm.graph.nodes if n.op != "output"}
    if case == "positional":
        (name,) = a.positional
        assert (infos[name].axis, infos[name].outer) == (0, 2)
    else:
        (name,) = a.self_attention
        assert (infos[name].axis, infos[name].outer, infos[name].attention) == (1, 2, "self")


@pytest.mark.parametrize("case", ["slice", "not-a-fold"])
def test_rule_folded_token_axis_refuses_position_dependent_ops(case):
    def f(x):
        t = x.reshape(-1, 4, 8, 8)                        # [B*F, 4, 8, 8], outer 2
        if case == "slice":
            t = torch.cat([t[3:], t[:3]])
        elif case == "not-a-fold":
            t = t.reshape(2, 3, 4, 8, 8).reshape(3, 2, 4, 8, 8)   # unfolds, then regroups batch x frames
            return t.reshape(2, 3, 4, 8, 8)
        return t.reshape(2, 3, 4, 8, 8)

    expected = {"slice": "folded with the dims before it", "not-a-fold": "merges the token axis"}[case]
    with pytest.raises(UnsupportedGraphError, match=expected) as err:
        _analyze_frames_first(f, torch.randn(2, 3, 4, 8, 8))
    assert "from:" in str(err.value) or "node:" in str(err.value)


def test_rule_cat_split_chunk_on_other_axes_and_positional_tables():
    table = torch.randn(1, 4, 8, 1)

    def f(x):
        a, b = x.chunk(2, dim=1)                 # split channels: both keep axis 2
        c = torch.cat([a, b, table.expand(1, 4, 8, 8)], dim=1)
        d, e = torch.split(c, [4, 4], dim=1)
        return d + e

    gm, a = analyze_fn(f)
    axes = _axes(gm)
    assert all(v == 2 for k, v in axes.items() if k != "chunk" and k != "split")
    assert [n.name for n in _positional(gm)] == ["expand"]


def test_rule_split_along_tokens_is_reported():
    def f(x):
        top, bottom = x.split(4, dim=2)
        return torch.cat([bottom, top], dim=2)

    with pytest.raises(UnsupportedGraphError, match="slicing the token axis through the image tokens"):
        analyze_fn(f)


def test_rule_slicing_and_indexing():
    def f(x):
        y = x[:, :2]                 # channel slice: fine
        y = y[:, None]               # [1, 1, 2, 8, 8]: axis moves to 3
        y = y[0]                     # [1, 2, 8, 8]: axis 2
        y = y[..., ::1, :]           # full slice of the token axis: fine
        return torch.cat([y, y], 1)

    gm, _ = analyze_fn(f)
    axes = list(_axes(gm).values())
    assert axes == [2, 2, 3, 2, 2, 2]

    def g(x):
        return x[:, :, 2:] * 1.0

    with pytest.raises(UnsupportedGraphError, match="slicing the token axis through the image tokens"):
        analyze_fn(g)


def test_rule_rope_arithmetic_marks_cos_sin_positional():
    def f(x):
        t = x.flatten(2).transpose(1, 2)                       # [1, 64, 4] tokens on axis 1
        pos = torch.arange(64, dtype=torch.float32)[:, None] * torch.arange(1, 3, dtype=torch.float32)
        cos, sin = pos.cos().repeat_interleave(2, -1), pos.sin().repeat_interleave(2, -1)  # [64, 4]
        x1, x2 = t.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-x2, x1], dim=-1).flatten(3 - 1)
        out = t * cos + rotated * sin
        return out.transpose(1, 2).reshape(1, 4, 8, 8)

    gm, a = analyze_fn(f)
    positional = _positional(gm)
    assert len(positional) == 2 and all(node_meta(n).token.axis == 0 for n in positional)


def test_rule_inplace_interleaved_rope_write_and_casts():
    def f(x):
        t = x.flatten(2).transpose(1, 2)                        # [1, 64, 4] tokens on axis 1
        freqs = torch.arange(64, dtype=torch.float32)[:, None] * torch.ones(2)   # [64, 2] global table
        cos, sin = freqs.cos(), freqs.sin()
        x1, x2 = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2] = x1 * cos - x2 * sin                    # Wan's RoPE: operator.setitem
        out[..., 1::2] = x1 * sin + x2 * cos
        out = out.type_as(cos)                                  # cast: only `out` carries tokens
        return out.transpose(1, 2).reshape(1, 4, 8, 8)

    gm, a = analyze_fn(f)
    writes = [n for n in gm.graph.nodes if n.target is operator.setitem]
    assert len(writes) == 2 and all(node_meta(n).token.axis == 1 for n in writes)
    assert {node_meta(n).token.axis for n in _positional(gm)} == {0}

    def bad(x):
        out = x.clone()
        out[:, :, :4] = 0.0                                      # writes half of the token rows
        return out

    with pytest.raises(UnsupportedGraphError, match="in-place write to part of the token axis"):
        analyze_fn(bad)


def test_rule_einsum_contracting_tokens_is_a_reduction_over_the_tokens():
    """Summing over the tokens is a reduction (STALE_INPUTS: it reads caches of its token-carrying operands);
    what is computed from it alone has no token axis (REDUCED)."""
    def f(x):
        t = x.flatten(2)
        g = torch.einsum("bcs,bds->bcd", t, t)
        return x + g.mean()

    gm, a = analyze_fn(f)
    (name,) = a.token_reductions
    assert node_meta(by_name(gm)[name]).token.kind is Kind.REDUCED
    assert [node_meta(n).token.kind for n in gm.graph.nodes if n.op == "call_method" and n.target == "mean"] == [
        Kind.REDUCED]


def test_softmax_over_tokens_names_op_node_and_source_line():
    def f(x):
        t = x.flatten(2).transpose(1, 2)
        ctx = t.softmax(dim=1)   # normalized over the tokens: every output token reads all of them
        return (t + ctx).transpose(1, 2).reshape(1, 4, 8, 8)

    with pytest.raises(UnsupportedGraphError) as err:
        analyze_fn(f)
    msg = str(err.value)
    assert "reduction over the token axis" in msg
    assert "call_method" in msg and "softmax" in msg
    assert "ctx = t.softmax(dim=1)" in msg


def test_conv_over_rows_and_unknown_ops_fail_clearly():
    w = torch.randn(4, 4, 3, 3)

    def conv(x):   # a halo conv (stride 1, padding keeping the rows) is supported; a strided one is not
        return F.conv2d(x, w, stride=2, padding=1)

    with pytest.raises(UnsupportedGraphError, match="conv over token rows"):
        analyze_fn(conv)

    def groupnorm(x):
        return F.group_norm(x, 2)

    with pytest.raises(UnsupportedGraphError, match="group_norm has no token rule") as err:
        analyze_fn(groupnorm)
    assert "F.group_norm(x, 2)" in str(err.value)


def test_rule_joint_sequences_cat_slice_split_token_groups():
    text = torch.randn(1, 5, 4)   # a prompt: GLOBAL, 5 tokens

    def f(x, reorder=False):
        img = x.flatten(2).transpose(1, 2)                     # [1, 64, 4] image tokens
        joint = torch.cat([img, text], dim=1)                  # SD3 order: image first, then text
        joint = joint * 2.0
        image_part, text_part = joint[:, :64], joint[:, 64:]   # back to the groups
        if reorder:   # the text computed after the image, moved before it
            image_part = torch.cat([text_part, image_part], dim=1)[:, 5:]
        both = torch.cat([image_part, text_part * 3.0], dim=1)
        i2, t2 = both.split_with_sizes([64, 5], dim=1)
        return i2.transpose(1, 2).reshape(1, 4, 8, 8)

    gm, a = analyze_fn(f)
    info = {n.name: node_meta(n).token for n in gm.graph.nodes if n.op != "output"}
    cats = [n.name for n in gm.graph.nodes if n.target is torch.cat]
    assert (info[cats[0]].prefix, info[cats[0]].suffix) == (0, 5)          # [image | text]
    assert (info[cats[1]].prefix, info[cats[1]].suffix) == (0, 5)          # [image | text] again
    getitems = [n for n in gm.graph.nodes if n.target is operator.getitem and node_meta(n.args[0]).token.joint]
    image_part, text_part = (info[n.name] for n in getitems[:2])
    assert not image_part.joint and image_part.epr == 8                   # 8 tokens per input row
    assert (text_part.epr, text_part.prefix, text_part.suffix) == (0, 0, 5)  # the text after the image
    split = next(n for n in gm.graph.nodes if n.target == "split_with_sizes")
    i2, t2 = info[split.name].elements
    assert (t2.epr, t2.prefix, t2.suffix) == (0, 0, 5) and (i2.prefix, i2.suffix) == (0, 0)
    assert a.granule == 1 and a.token_rows == 8
    # each side of the image is its own piece: tokens of the group after the image cannot move before it
    with pytest.raises(UnsupportedGraphError, match="group after the image tokens and is concatenated before"):
        analyze_fn(lambda x: f(x, reorder=True))


@pytest.mark.parametrize("case", ["image", "text", "image-and-text", "mismatched-value"])
def test_rule_inplace_write_into_one_token_group(case):
    """RoPE on the image part of a joint [text | image] query: `q[:, 5:] = rope(q[:, 5:])`."""
    text = torch.randn(1, 5, 4)
    cos = torch.randn(64, 4)

    def f(x):
        q = torch.cat([text, x.flatten(2).transpose(1, 2)], dim=1) * 2.0   # [1, 69, 4], 5 text tokens first
        if case == "image":
            q[:, 5:] = q[:, 5:] * cos
        elif case == "text":
            q[:, :5] = q[:, :5] + 1.0
        elif case == "image-and-text":
            q[:, 4:] = q[:, 4:] * 2.0
        else:
            q[:, 5:] = cos.expand(1, 64, 4)   # a global table into the image group (no rule slices it)
        return q[:, 5:].transpose(1, 2).reshape(1, 4, 8, 8)

    if case in ("image", "text"):
        gm, a = analyze_fn(f)
        node = next(n for n in gm.graph.nodes if n.target is operator.setitem)
        info = node_meta(node).token
        assert info.rule == "setitem-group" and (info.prefix, info.suffix) == (5, 0)
        assert node_meta(node).extra["group_write"] == ({"text": "head"}.get(case, case), 1)
        if case == "image":
            assert [n.name for n in _positional(gm)] == [by_name(gm)[n].name for n in a.positional]
            assert len(a.positional) == 1   # the cos table, sliced per band
    else:
        match = "image tokens and part of the text" if case == "image-and-text" else "does not hold exactly"
        with pytest.raises(UnsupportedGraphError, match=match):
            analyze_fn(f)


def test_rule_joint_slice_through_the_image_fails():
    text = torch.randn(1, 5, 4)

    def f(x):
        joint = torch.cat([text, x.flatten(2).transpose(1, 2)], dim=1)   # [1, 69, 4]
        half = joint[:, :30]                                            # 5 text + 25 image tokens
        return x + half.mean()

    with pytest.raises(UnsupportedGraphError, match="through the image tokens"):
        analyze_fn(f)


@pytest.mark.parametrize("factory", [sd3, flux])
def test_mmdit_joint_attention_is_analyzed_planned_and_lowered(factory):
    from pipefusion_compile.options import PipefusionOptions
    from pipefusion_compile.plan import build_plan

    model, kwargs = factory()
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    assert len(a.self_attention) >= 4 and not a.cross_attention
    for name in a.self_attention:  # joint attention: query, keys and values hold text and image tokens
        n = by_name(gm)[name]
        assert node_meta(n).token.joint and node_meta(n).token.attention == "self"
    plan = build_plan(gm, ex, PipefusionOptions(num_stages=2).resolve(), a)[0]
    assert plan.max_min_ratio <= 1.10
    assert any(t.text_bytes for c in plan.cuts for t in c.tensors)  # the text stream crosses the cut
    assert plan.text == ("first" if factory is flux else "last")
    assert [p.kind for p in plan.pieces(pipelined=True)] == (
        ["head", "band", "band"] if factory is flux else ["band", "band", "tail"])
    assert [p.kind for p in plan.pieces(pipelined=False)] == ["full"]


def test_rule_view_as_complex_keeps_the_token_axis():
    """[B, S, H, D/2, 2] -> complex [B, S, H, D/2]: the token axis stays 1 (aligning from the right moved it
    to 0 and planned QwenImage as 2 token rows: its batch)."""
    def f(x):
        c = torch.view_as_complex(x.reshape(2, 64, 2, 4, 2))
        return torch.view_as_real(c * c).flatten(2)

    gm, a = analyze_fn(f, torch.randn(2, 64, 16))
    for n in gm.graph.nodes:
        info = node_meta(n).token
        if n.op == "call_function" and n.target in (torch.view_as_complex, torch.view_as_real):
            assert (info.axis, info.epr) == (1, 1)
    assert a.token_rows == 64


@pytest.mark.parametrize("case", ["repeat", "repeat-tokens", "interleave", "interleave-tokens"])
def test_rule_repeat_and_repeat_interleave_off_the_token_axis(case):
    def f(x):   # x [B, S, C], tokens on 1
        if case == "repeat":
            return x.repeat(1, 1, 2)
        if case == "repeat-tokens":
            return x.repeat(1, 2, 1)
        if case == "interleave":
            return x.repeat_interleave(2, dim=2)
        return x.repeat_interleave(2, dim=1)

    if case.endswith("tokens"):
        with pytest.raises(UnsupportedGraphError, match="token axis"):
            analyze_fn(f, torch.randn(2, 16, 4))
    else:
        gm, _ = analyze_fn(f, torch.randn(2, 16, 4))
        out = [n for n in gm.graph.nodes if n.op == "call_method"][-1]
        assert node_meta(out).token.axis == 1


def test_rule_comparisons_and_logic_are_elementwise():
    """`x == 0`, `~mask`, `mask & (x > 0)`: one output per element, so a mask keeps the token axis, and a table
    compared with the tokens is positional (HunyuanVideo 1.5 tests `torch.all(image_embeds == 0)`)."""
    def f(x):
        t = x.flatten(2).transpose(1, 2)                         # [1, 64, 4] tokens on axis 1
        table = torch.arange(64, dtype=torch.float32)[:, None]   # [64, 1] global
        mask = (t == 0) | ~(t > table) & t.ne(1.0)
        return torch.where(mask, 0.0, t).transpose(1, 2).reshape(1, 4, 8, 8)

    gm, _ = analyze_fn(f)
    compares = [n for n in gm.graph.nodes if n.target in (operator.eq, operator.gt, operator.invert, operator.or_,
                                                          operator.and_, "ne")]
    assert len(compares) == 6 and all(node_meta(n).token.axis == 1 for n in compares)
    assert [node_meta(n).token.axis for n in _positional(gm)] == [0]


def test_rule_unpatchify_of_frames_folds_the_frames_with_the_batch():
    """[B, F, C, H, W] frames as token rows -> tokens [B, F * h * w, p * p * C] -> diffusers' per-frame
    unpatchify view [B * F, h, w, p, p, C] (the frames folded with the batch, the channels split) -> permute ->
    [B, F, C, H, W] (unfolded): AnyFlow's `_unpack_latent_sequence`."""
    def f(x):
        b, fr, c, h, wd = x.shape
        t = x.reshape(b, fr, c, h // 2, 2, wd // 2, 2).permute(0, 1, 3, 5, 4, 6, 2).reshape(b, -1, 4 * c)
        t = t * 2.0                                                  # [2, 3 * 16, 16] tokens, 16 per frame
        t = t.view(b * fr, h // 2, wd // 2, 2, 2, c)                 # folded, outer B
        t = t.permute(0, 5, 1, 3, 2, 4)
        return t.reshape(b, fr, c, h, wd)                            # unfolded: frames on axis 1 again

    gm, a = _analyze_frames_first(f, torch.randn(2, 3, 4, 8, 8))
    infos = [node_meta(n).token for n in gm.graph.nodes if n.op != "output" and node_meta(n).token.carries_tokens]
    fold = next(i for i in infos if i.rule == "reshape-fold")
    assert (fold.axis, fold.outer, fold.epr) == (0, 2, 2)
    assert infos[-1].rule == "reshape-unfold" and (infos[-1].axis, infos[-1].outer, infos[-1].epr) == (1, 1, 1)
    assert a.token_rows == 3


def test_rule_a_table_on_a_folded_token_axis_is_positional_with_the_fold():
    """Latte's temporal blocks: tokens folded with the batch ([B * HW, F, D]) meet a per-position timestep
    table of the same fold ([B * HW, 1, D], `repeat_interleave` of a [B, D] embedding): the table is POSITIONAL
    on the folded axis with the same `outer`, so a patch takes its range of every batch slice."""
    def f(x, temb):
        t = x.flatten(2).transpose(1, 2)                          # [2, 64, 4] tokens on axis 1
        s = t.reshape(2 * 64, 1, 4)                               # folded with the batch: outer 2
        table = temb.repeat_interleave(64, dim=0)[:, None]        # [128, 1, 4] global, per position
        s = s * (1 + table)
        return s.reshape(2, 64, 4).transpose(1, 2).reshape(2, 4, 8, 8)

    (gm, ex), = capture_graphs(f, torch.randn(2, 4, 8, 8), torch.randn(2, 4))
    analyze_tokens(gm, ex, image_input="x")
    table, = _positional(gm)
    info = node_meta(table).token
    assert (info.axis, info.outer, info.epr) == (0, 2, 16)


def test_transposed_conv_unpatchify_keeps_rows_and_an_overlapping_one_is_refused():
    """kernel == stride (AceStep's ConvTranspose1d out projection): each token row becomes `stride` rows of its
    own; a transposed conv whose kernel overlaps neighbouring rows is refused with its source line."""
    w = torch.randn(4, 4, 2, 2)

    def unpatchify(x):
        return F.conv_transpose2d(x, w, stride=2)

    gm, a = analyze_fn(unpatchify)
    (n,) = [n for n in gm.graph.nodes if n.target is torch.conv_transpose2d]
    info = node_meta(n).token
    assert (info.rule, info.axis, info.epr) == ("conv-transpose-unpatchify", 2, 2)
    w3 = torch.randn(4, 4, 3, 3)

    def overlapping(x):
        return F.conv_transpose2d(x, w3, padding=1)

    with pytest.raises(UnsupportedGraphError, match="transposed conv over token rows") as err:
        analyze_fn(overlapping)
    assert "F.conv_transpose2d(x, w3, padding=1)" in str(err.value)


def test_rule_clamp_min_max_flip_and_narrow_of_other_axes():
    """SANA-WM's GDN scan: `clamp_min` / `clamp_max` are element-wise; `flip` and `narrow` of another axis (the
    frames of a bidirectional scan, shifted by one) keep every token where it is."""
    def f(x):
        t = x.flatten(2)                                   # [1, 4, 64] tokens on axis 2
        t = t.clamp_min(0.1) + torch.clamp_max(t, 2.0)
        t = torch.flip(t, dims=[1]) + t.flip(1)            # the channels reversed
        t = torch.cat([t.narrow(1, 0, 1), t.narrow(1, 1, 3)], dim=1)
        return t.reshape(1, 4, 8, 8)

    gm, _ = analyze_fn(f)
    ops = [n for n in gm.graph.nodes if n.target in ("clamp_min", torch.clamp_max, torch.flip, "flip", "narrow")]
    assert len(ops) == 6 and all(node_meta(n).token.axis == 2 for n in ops)


@pytest.mark.parametrize("op", [lambda t: t.flip(2), lambda t: t.narrow(2, 0, 32)])
def test_rule_flip_and_narrow_of_the_token_axis_are_refused(op):
    def f(x):
        return op(x.flatten(2)).sum() * x

    with pytest.raises(UnsupportedGraphError, match="of the token axis"):
        analyze_fn(f)
