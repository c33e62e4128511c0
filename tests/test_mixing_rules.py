"""The token-mixing rules beyond plain self-attention, at the analysis, graph and plan levels (the numerics
against the eager reference are in test_handwritten.py):

  * attention local to a token row: the rows lie on a batch dim ([B * F, HW, D], spatial attention per frame
    with frames as token rows), reached by a reshape that splits the token axis into (rows, rest) and folds
    the rows into the batch; no cache, a stage boundary like any attention layer;
  * extra token groups on either side of the image (U-ViT's time and class tokens before it, register tokens
    after it): a HEAD and a TAIL piece, each run once per pipelined step;
  * the plan (and `pipefusion-compile plan`) lists every token-mixing op with the rule that handles it;
  * a conv over token rows (a conv FFN's depthwise conv): HALO_ROWS, a cache of its input read with the halo;
  * a reduction over the tokens (linear attention's phi(K)^T V, a mean over tokens): STALE_INPUTS, caches of
    its token-carrying operands; its token-free result stays in its stage.
  * image queries over keys concatenated from the image's K/V and the prompt's (NucleusMoE-Image, PRX): the
    cache covers the whole key sequence, each patch writes its rows and the text K/V, no text piece.
"""
from __future__ import annotations

import torch

import handwritten_dits as hd
from graph_utils import by_name, capture_model
from helpers import build_program
from pipefusion_compile.cli import plan_graphs
from pipefusion_compile.passes.canonical_attention import AttentionForm
from pipefusion_compile.passes.meta import Kind, node_meta
from pipefusion_compile.passes.pieces import BAND, HEAD, TAIL, Piece
from pipefusion_compile.passes.sdpa import is_sdpa, sdpa_qkv
from pipefusion_compile.passes.tokens import analyze_tokens
from pipefusion_compile.plan import MixingRule

KV_UPDATE = torch.ops.pipefusion.kv_cache_update.default


def test_analysis_spatial_attention_per_frame_is_local_and_temporal_mixes():
    model, kwargs = hd.make_factorized_video_dit()   # [2, 4, 4 frames, 16, 16], frames are the token rows
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    assert (a.input_axis, a.token_rows) == (2, 4)
    nodes = by_name(gm)
    assert len(a.self_attention) == 2 and len(a.local_attention) == 2 and a.attention_layers == 4
    for name in a.local_attention:
        info = node_meta(nodes[name]).token
        # [B * F, H, HW, D]: the rows on dim 0, folded with the batch (outer 2), one per frame
        assert (info.rule, info.axis, info.outer, info.epr) == ("attention-local", 0, 2, 2)
        assert not info.kind.value == "mixing"
    folds = [n for n in gm.graph.nodes if node_meta(n).token is not None and node_meta(n).token.rule == "reshape-fold"]
    assert folds and all(node_meta(n).token.outer == 2 for n in folds)
    for name in a.self_attention:   # temporal: [B * HW, H, F, D], the frames on the sequence axis
        info = node_meta(nodes[name]).token
        assert (info.rule, info.axis, info.outer, info.epr) == ("self-attention", 2, 1, 1)


def test_graph_local_attention_has_no_cache_and_temporal_writes_its_rows():
    program = build_program(hd.make_factorized_video_dit, num_stages=2, num_patches=2)
    assert [len(s.attention_layers) for s in program.plan.stages] == [2, 2]
    for stage in program.stages:
        assert len(stage.lowered.caches) == 1   # one temporal attention per stage: its K/V only
        g = stage.lowered.patch_graph(2).graph
        attn = [n for n in g.nodes if is_sdpa(n)]
        local = [n for n in attn if node_meta(n).token.attention == "local"]
        stale = [n for n in attn if node_meta(n).token.attention == "self"]
        assert len(local) == len(stale) == 1
        assert all(a.op != "placeholder" for a in local[0].args[1:3])      # its own K/V, not a cache
        assert all("cache" in a.name for a in stale[0].args[1:3])
        (update,) = [n for n in g.nodes if n.target is KV_UPDATE]
        assert update.args[5:8] == (2, 1, 0)   # frames on axis 2 of [B * HW, H, F, D], 1 per row, no text


def test_analysis_extra_tokens_on_both_sides_are_head_and_tail_groups():
    model, kwargs = hd.make_uvit(registers=4)   # [time, class | 64 image tokens | 4 registers]
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    for name in a.self_attention:
        k = node_meta(by_name(gm)[name]).token
        assert (k.prefix, k.suffix, k.epr * a.granule) == (2, 4, 8)
    program = build_program(lambda: hd.make_uvit(registers=4), num_stages=2, num_patches=4)
    assert program.plan.text == "both"
    assert [p.kind for p in program.plan.pieces(pipelined=True)] == [HEAD, BAND, BAND, BAND, BAND, TAIL]


def test_graph_head_and_tail_pieces_write_kv_at_their_place():
    program = build_program(lambda: hd.make_uvit(registers=4), num_stages=2, num_patches=4)
    full = 2 + 64 + 4
    for stage in program.stages:
        for piece, offset in ((Piece(HEAD), 0), (Piece(BAND, 0, 2), 2), (Piece(TAIL), full - 4)):
            pg = stage.lowered.piece_graph(piece)
            updates = [n for n in pg.gm.graph.nodes if n.target is KV_UPDATE]
            assert updates and all(u.args[7] == offset for u in updates), (piece, [u.args for u in updates])
    first = program.stages[0].lowered.piece_graph(Piece(HEAD)).gm.graph
    cats = [n for n in first.nodes if n.target is torch.cat]
    # the head piece concatenates the two tokens before the image (time, class), not the image
    assert any(len(c.args[0]) == 2 for c in cats)


def test_plan_names_the_rule_of_every_mixing_op():
    model, kwargs = hd.make_factorized_video_dit()
    (plan,) = plan_graphs(model, kwargs, num_stages=2, num_patches=2)
    assert [m.rule for m in plan.mixing] == [MixingRule.LOCAL, MixingRule.STALE_KV] * 2
    assert [m.stage for m in plan.mixing] == [0, 0, 1, 1]
    text = str(plan)
    assert "LOCAL" in text and "STALE_KV" in text and "scaled_dot_product_attention(q, k, v)" in text
    model, kwargs = hd.make_manual_attention_dit("einsum")
    (plan,) = plan_graphs(model, kwargs, num_stages=2, num_patches=2)
    assert {m.form for m in plan.mixing} == {AttentionForm.HAND_WRITTEN} and len(plan.mixing) == 4
    assert all("einsum" in m.source for m in plan.mixing)
    model, kwargs = hd.make_mha_dit()
    (plan,) = plan_graphs(model, kwargs, num_stages=2, num_patches=2)
    assert {m.form for m in plan.mixing} == {AttentionForm.MHA} and len(plan.mixing) == 4


class ImageQueriesJointKeys(torch.nn.Module):
    """Image queries over [image | text] keys (NucleusMoE-Image's attention), the text K/V from the prompt.
    `keys`: "cat" (the concatenation is the attention's key), "scaled" (the keys scaled after it: no rule),
    "reused" (the concatenation read by another op too: no rule)."""

    def __init__(self, dim=16, keys="cat"):
        super().__init__()
        self.keys = keys
        self.embed = torch.nn.Conv2d(4, dim, 2, stride=2)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(2))
        self.txt = torch.nn.Linear(8, 2 * dim)
        self.out = torch.nn.Linear(dim, 16)

    def forward(self, hidden_states, encoder_hidden_states, return_dict=True):
        b = hidden_states.shape[0]
        x = self.embed(hidden_states).flatten(2).transpose(1, 2)
        for qkv in self.qkv:
            q, k, v = qkv(x).unsqueeze(1).chunk(3, dim=-1)
            tk, tv = self.txt(encoder_hidden_states).unsqueeze(1).chunk(2, dim=-1)
            keys, values = torch.cat([k, tk], 2), torch.cat([v, tv], 2)
            if self.keys == "scaled":
                keys = keys * 0.5
            x = x + torch.nn.functional.scaled_dot_product_attention(q, keys, values).squeeze(1)
            if self.keys == "reused":
                x = x + keys[:, :, :64].squeeze(1)
        x = self.out(x).reshape(b, 8, 8, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(b, 4, 16, 16)
        return (x,)


def _joint_keys(keys="cat"):
    torch.manual_seed(0)
    model = ImageQueriesJointKeys(keys=keys).eval()
    return model, {"hidden_states": torch.randn(2, 4, 16, 16), "encoder_hidden_states": torch.randn(2, 6, 8)}


def test_analysis_image_queries_over_text_keys_cache_the_whole_key_sequence():
    """Keys = cat([image K, text K of the prompt]): a self-attention whose K/V cache covers the whole key
    sequence; the analysis records, per operand of the concatenation, its token extent (0: the image)."""
    gm, ex = capture_model(*_joint_keys())
    a = analyze_tokens(gm, ex)
    assert len(a.self_attention) == 2 and not a.cross_attention
    for name in a.self_attention:
        n = by_name(gm)[name]
        assert node_meta(n).token.rule == "self-attention-global-keys"
        assert node_meta(n).extra["global_kv"] == (0, 6)
        q, k, _ = n.args[:3]
        assert (node_meta(q).token.prefix, node_meta(q).token.suffix) == (0, 0)
        assert (node_meta(k).token.prefix, node_meta(k).token.suffix) == (0, 6)


def test_plan_image_queries_over_text_keys_have_no_text_piece():
    for text_first, layout in ((False, (0, hd.PROMPT)), (True, (hd.PROMPT, 0))):
        program = build_program(lambda: hd.make_text_keys_dit(text_first), num_stages=2, num_patches=4)
        plan = program.plan
        assert plan.text is None   # the text has no queries: no piece of its own, every patch writes its K/V
        assert [p.kind for p in plan.pieces(pipelined=True)] == [BAND] * 4
        assert [m.rule for m in plan.mixing] == [MixingRule.STALE_KV_GLOBAL_KEYS] * 4
        assert "STALE_KV_GLOBAL_KEYS" in str(plan)
        for stage in program.stages:   # K and V of [B, H, 64 + 6, D] per layer, fp32
            assert stage.lowered.caches and all(
                (c.shape, c.prefix, c.suffix) == ((2, hd.HEADS, 64 + hd.PROMPT, hd.DIM // hd.HEADS), *layout)
                for c in stage.lowered.caches)
            assert plan.stages[stage.lowered.index].kv_cache_bytes == len(stage.lowered.caches) * 2 * 4 * (
                2 * hd.HEADS * (64 + hd.PROMPT) * hd.DIM // hd.HEADS)


def test_graph_each_patch_writes_its_rows_and_the_text_into_the_cache():
    for text_first in (False, True):
        program = build_program(lambda: hd.make_text_keys_dit(text_first), num_stages=2, num_patches=4)
        image_at, text_at = (hd.PROMPT, 0) if text_first else (0, 64)
        for stage in program.stages:
            g = stage.lowered.patch_graph(2).graph
            attn = [n for n in g.nodes if is_sdpa(n)]
            updates = [n for n in g.nodes if n.target is KV_UPDATE]
            assert len(updates) == 2 * len(attn) == 4
            for a in attn:
                assert all(x.op == "placeholder" and "cache" in x.name for x in sdpa_qkv(a)[1:])
            # a band of 2 rows (16 tokens) at its rows after the text, the prompt's 6 at their fixed place
            assert sorted(u.args[5:8] for u in updates) == sorted([(2, 8, image_at), (2, 0, text_at)] * 2)
            assert not any(n.target is torch.cat and any(u in attn for u in n.users) for n in g.nodes)


def test_image_queries_over_other_joint_keys_are_refused_not_run_wrongly():
    from pipefusion_compile.errors import UnsupportedGraphError

    for keys, why in (("scaled", "is not a concatenation"), ("reused", "has other users than the attention")):
        gm, ex = capture_model(*_joint_keys(keys))
        try:
            analyze_tokens(gm, ex)
        except UnsupportedGraphError as e:
            assert "keys hold other token groups than its query" in str(e) and why in str(e), str(e)
            assert "node:" in str(e)
        else:
            raise AssertionError(f"image queries over [image | text] keys ({keys}) were accepted")
    # text keys from the text stream of joint blocks: tokens of the text piece, which runs no image query
    gm, ex = capture_model(*hd.make_mixed_keys_dit("stream"))
    try:
        analyze_tokens(gm, ex)
    except UnsupportedGraphError as e:
        assert "holds tokens of other groups than the image" in str(e), str(e)
    else:
        raise AssertionError("image queries over the text stream's keys were accepted")


HALO_ROWS = torch.ops.pipefusion.halo_rows.default


def test_analysis_conv_over_token_rows_mixes_with_halo_rows():
    """The conv FFN's depthwise 3x3 conv (stride 1, padding 1) mixes neighbouring token rows: MIXING with the
    HALO_ROWS rule and a halo of one row each side; its 1x1 convs and the patch embedding do not mix."""
    model, kwargs = hd.make_conv_ffn_dit()
    gm, ex = capture_model(model, kwargs)
    analyze_tokens(gm, ex)
    convs = [n for n in gm.graph.nodes if n.target is torch.conv2d]
    rules = [node_meta(n).token.rule for n in convs]
    assert rules == ["conv-patch-embed"] + ["conv-patch-embed", "conv-halo", "conv-patch-embed"] * 4
    for n in convs:
        info = node_meta(n).token
        if info.rule == "conv-halo":
            assert (info.kind.value, info.mixing, info.halo, info.axis) == ("mixing", MixingRule.HALO_ROWS, (1, 1), 2)
        else:
            assert info.mixing is None and info.kind.value == "patched"


def test_graph_halo_conv_writes_its_rows_and_reads_them_with_the_halo():
    program = build_program(hd.make_conv_ffn_dit, num_stages=2, num_patches=4)
    for stage in program.stages:
        halo = [c for c in stage.lowered.caches if c.rule is MixingRule.HALO_ROWS]
        assert len(halo) == 2 and all(c.buffers == ("x0",) and c.shape == (2, 128, 8, 8) for c in halo)
        g = stage.lowered.patch_graph(2).graph
        reads = [n for n in g.nodes if n.target is HALO_ROWS]
        assert len(reads) == 2
        for r in reads:
            cache, x, row_start = r.args[:3]
            assert cache.op == "placeholder" and "cache_x" in cache.name and row_start.name == "row_start"
            assert r.args[3:] == (2, 1, 1, 1)       # axis, per_row, halo before / after
            (conv,) = r.users
            assert conv.target is torch.conv2d and conv.args[4] == (0, 1)   # no padding along the rows
    text = str(program.plan)
    assert "HALO_ROWS" in text and "conv over token rows" in text
    assert [m.rule for m in program.plan.mixing] == [MixingRule.STALE_KV, MixingRule.HALO_ROWS] * 4
    # the plan's cache bytes count the conv inputs too: per stage 2 x (K + V) + 2 conv inputs, fp32
    kv, conv = 2 * 2 * (2 * 2 * 64 * 16) * 4, 2 * (2 * 128 * 64) * 4
    assert [s.kv_cache_bytes for s in program.plan.stages] == [kv + conv] * 2


def test_halo_rows_reads_fresh_and_stale_rows_and_zeros_beyond_the_image():
    """The op behind the rewrite: the patch's rows land in the cache; the read has the rows above (written by
    earlier patches), the patch, the rows below (still the previous step's), zeros past the border."""
    cache = torch.arange(1.0, 9.0).reshape(1, 1, 8, 1).repeat(1, 1, 1, 3)   # "previous step": row r holds r + 1
    x = torch.full((1, 1, 2, 3), -1.0)
    got = torch.ops.pipefusion.halo_rows(cache, x, torch.tensor(3), 2, 1, 1, 2)
    assert got[0, 0, :, 0].tolist() == [3.0, -1.0, -1.0, 6.0, 7.0]
    assert cache[0, 0, :, 0].tolist() == [1.0, 2.0, 3.0, -1.0, -1.0, 6.0, 7.0, 8.0]
    top = torch.ops.pipefusion.halo_rows(cache, x, torch.tensor(0), 2, 1, 1, 1)
    bottom = torch.ops.pipefusion.halo_rows(cache, x, torch.tensor(3), 2, 2, 1, 1)   # 2 elements per row
    assert top[0, 0, :, 0].tolist() == [0.0, -1.0, -1.0, 3.0]
    assert bottom[0, 0, :, 0].tolist() == [6.0, -1.0, -1.0, 0.0]     # rows 6, 7 (elements 6, 7 at row 3)


def test_conv_that_changes_the_rows_is_refused_with_its_source_line():
    from pipefusion_compile.errors import UnsupportedGraphError

    class StridedConv(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)   # rows overlap: halo, but half the rows

        def forward(self, hidden_states):
            return (self.conv(hidden_states),)

    gm, ex = capture_model(StridedConv().eval(), {"hidden_states": torch.randn(1, 4, 8, 8)})
    try:
        analyze_tokens(gm, ex, token_axis=2)
    except UnsupportedGraphError as e:
        assert "kernel 3, stride 2, padding 1" in str(e) and "self.conv(hidden_states)" in str(e)
    else:
        raise AssertionError("a strided conv with overlapping rows was accepted")


CACHE_ROWS = torch.ops.pipefusion.cache_rows.default


def test_analysis_linear_attention_reduces_over_the_tokens():
    """ReLU linear attention: matmul(v [B, H, D + 1, N], k [B, H, N, D]) contracts the token axis of both, a
    reduction over the tokens (STALE_INPUTS) whose result has no token axis (REDUCED); applied to q [B, H, D, N]
    the tokens come back on q's columns. The F.pad of v (the ones row, off the token axis) keeps the tokens."""
    model, kwargs = hd.make_linear_attention_dit()
    gm, ex = capture_model(model, kwargs)
    a = analyze_tokens(gm, ex)
    assert a.self_attention == [] and len(a.token_reductions) == 4 and a.attention_layers == 4 and a.mixes_tokens
    for name in a.token_reductions:
        n = by_name(gm)[name]
        info = node_meta(n).token
        assert (info.kind, info.mixing, info.axis) == (Kind.REDUCED, MixingRule.STALE_INPUTS, None)
        assert [node_meta(x).token.axis for x in n.args] == [3, 2]
        (apply,) = n.users
        assert (node_meta(apply).token.rule, node_meta(apply).token.axis) == ("matmul", 3)
    pads = [n for n in gm.graph.nodes if n.target is torch._C._nn.pad]
    assert len(pads) == 4 and all(node_meta(p).token.rule == "pad" for p in pads)


def test_graph_reduction_writes_its_operands_and_reduces_over_the_caches():
    program = build_program(hd.make_linear_attention_dit, num_stages=2, num_patches=4)
    for stage in program.stages:
        specs = [c for c in stage.lowered.caches if c.rule is MixingRule.STALE_INPUTS]
        assert [(c.operand, c.axis, c.shape) for c in specs] == [(0, 3, (2, 2, 17, 64)), (1, 2, (2, 2, 64, 16))] * 2
        for whole, rows in ((False, 2), (True, 8)):   # a band of 2 of 8 rows; the one band of M = 1
            g = stage.lowered.patch_graph(rows).graph
            writes = [n for n in g.nodes if n.target is CACHE_ROWS and "matmul" in n.args[0].name]
            assert len(writes) == 4
            assert all(not w.users for w in writes)
            reductions = [n for n in g.nodes if n.target is torch.matmul and node_meta(n).token.mixing]
            assert len(reductions) == 2
            order = list(g.nodes)
            for r in reductions:
                reads_caches = all(a.op == "placeholder" and "_cache_x" in a.name for a in r.args)
                assert reads_caches != whole    # a band reads the caches; the whole image its own operands
                mine = [w for w in writes if w.args[0].name.startswith(f"{r.name}_cache_x")]
                assert len(mine) == 2 and all(order.index(w) < order.index(r) for w in mine)
    text = str(program.plan)
    assert "STALE_INPUTS" in text and "reduction over the tokens" in text and "0 self-attention" in text


def test_reduction_result_is_never_combined_token_by_token():
    """A reduction over the tokens broadcast back along the token axis is fine ([B, 1, C] + [B, N, C]); one
    with a full-size axis where the tokens are (a coincidence of sizes) is refused, not sliced per patch."""
    from pipefusion_compile.errors import UnsupportedGraphError

    class MeanOverTokens(torch.nn.Module):
        def __init__(self, bad):
            super().__init__()
            self.bad = bad
            self.embed = torch.nn.Conv2d(4, 16, 2, stride=2)
            self.out = torch.nn.Linear(16, 16)

        def forward(self, hidden_states, return_dict=True):
            b = hidden_states.shape[0]
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)      # [B, 16, 16]
            m = x.mean(dim=1, keepdim=True)                                # [B, 1, 16]: over the tokens
            x = x + (m.transpose(1, 2) if self.bad else m)                 # [B, 16, 1] lines up with the tokens
            x = self.out(x).reshape(b, 4, 4, 2, 2, 4).permute(0, 5, 1, 3, 2, 4).reshape(b, 4, 8, 8)
            return (x,)

    kwargs = {"hidden_states": torch.randn(2, 4, 8, 8)}
    gm, ex = capture_model(MeanOverTokens(False).eval(), kwargs)
    a = analyze_tokens(gm, ex)
    assert len(a.token_reductions) == 1
    gm, ex = capture_model(MeanOverTokens(True).eval(), kwargs)
    try:
        analyze_tokens(gm, ex)
    except UnsupportedGraphError as e:
        assert "a reduction over the image tokens, is combined token by token" in str(e)
    else:
        raise AssertionError("a reduction over the tokens spanning the token axis was accepted")
