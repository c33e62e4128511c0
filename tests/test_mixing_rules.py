"""The token-mixing rules beyond plain self-attention, at the analysis, graph and plan levels (the numerics
against the eager reference are in test_handwritten.py):

  * attention local to a token row: the rows lie on a batch dim ([B * F, HW, D], spatial attention per frame
    with frames as token rows), reached by a reshape that splits the token axis into (rows, rest) and folds
    the rows into the batch; no cache, a stage boundary like any attention layer;
  * extra token groups on either side of the image (U-ViT's time and class tokens before it, register tokens
    after it): a HEAD and a TAIL piece, each run once per pipelined step;
  * image queries over keys concatenated from the image's K/V and the prompt's (NucleusMoE-Image, PRX): the
    cache covers the whole key sequence, each patch writes its rows and the text K/V, no text piece;
  * the plan (and `pipefusion-compile plan`) lists every token-mixing op with the rule that handles it.
"""
from __future__ import annotations

import torch

import handwritten_dits as hd
from graph_utils import by_name, capture_model
from helpers import build_program
from pipefusion_compile.cli import plan_graphs
from pipefusion_compile.passes.canonical_attention import AttentionForm
from pipefusion_compile.passes.meta import node_meta
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
