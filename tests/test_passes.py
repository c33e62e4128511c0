"""Graph passes: assertions on the rewritten stage graphs."""
import torch

from helpers import build_program, compile_pf
from pipefusion_compile.models import dit, pixart
from pipefusion_compile.passes.sdpa import is_sdpa, sdpa_qkv
from pipefusion_compile.passes.meta import node_meta

KV_UPDATE = torch.ops.pipefusion.kv_cache_update.default


def _sdpa(gm):
    return [n for n in gm.graph.nodes if is_sdpa(n)]


def test_every_self_attention_reads_its_caches_after_one_update():
    program = build_program(pixart, num_stages=2, num_patches=4)
    total_self = 0
    for stage in program.stages:
        gm = stage.lowered.patch_graph(2)
        updates = [n for n in gm.graph.nodes if n.target is KV_UPDATE]
        self_attn = [n for n in _sdpa(gm) if node_meta(n).token.attention == "self"]
        assert len(updates) == len(self_attn) == len(stage.lowered.caches) == 2
        for upd, attn in zip(updates, self_attn):
            _, ck, cv = sdpa_qkv(attn)
            assert ck.op == cv.op == "placeholder"
            assert (ck.name, cv.name) == (f"{attn.name}_cache_k", f"{attn.name}_cache_v")
            assert upd.args[:2] == (ck, cv)
            assert upd.args[4].name == "row_start"
            # the fresh K/V of the patch are what is written, and the update comes before the attention
            order = list(gm.graph.nodes)
            assert order.index(upd) < order.index(attn)
            assert upd.args[2].op == "call_method" and upd.args[2].target == "transpose"
        total_self += len(self_attn)
        assert "torch.ops.pipefusion.kv_cache_update.default" in gm.code
    assert total_self == len(program.plan.self_attention) == 4


def test_cross_attention_kv_is_global_and_hoisted():
    program = build_program(pixart, num_stages=2, num_patches=2)
    for stage in program.stages:
        gm = stage.lowered.patch_graph(4)
        cross = [n for n in _sdpa(gm) if node_meta(n).token.attention == "cross"]
        assert len(cross) == 2
        hoisted = set(stage.lowered.global_outputs)
        for attn in cross:
            _, k, v = sdpa_qkv(attn)
            # K/V of the prompt arrive as inputs of the patch graph, computed once per step by the globals graph
            assert k.op == v.op == "placeholder" and {k.name, v.name} <= hoisted
        # no linear of the patch graph reads the prompt: they all moved to the globals graph
        prompt_linears = [n for n in stage.lowered.globals_gm.graph.nodes if n.target is torch._C._nn.linear]
        assert len(prompt_linears) >= 2 * 2 * 1
        for n in gm.graph.nodes:
            if n.target is torch._C._nn.linear:
                assert node_meta(n).token.carries_tokens
    # the timestep embedding is hoisted too (it is GLOBAL), never computed per patch
    patch_ops = {n.target for s in program.stages for n in s.lowered.patch_graph(4).graph.nodes}
    assert torch.sin not in patch_ops and torch.cos not in patch_ops


def _sized(lowered, rows):
    """The last stage's graph after `rewrite_token_sizes` alone (the full lowering then fuses the unpatchify)."""
    import copy

    from pipefusion_compile.passes.lower import rewrite_token_sizes
    from pipefusion_compile.passes.pieces import BAND, Piece

    return rewrite_token_sizes(copy.deepcopy(lowered.stage_gm), Piece(BAND, 0, rows), lowered.analysis)


def test_token_sizes_rewritten_only_on_token_axes():
    program = build_program(dit, num_stages=2, num_patches=4)
    last = program.stages[-1].lowered
    full = _sized(last, 8)
    patch = _sized(last, 2)
    shapes_full = [n.kwargs.get("shape") for n in full.graph.nodes if n.target == "reshape"]
    shapes_patch = [n.kwargs.get("shape") for n in patch.graph.nodes if n.target == "reshape"]
    # unpatchify: (-1, h, w, p, p, c) then (-1, c, h * p, w * p); only h (token rows) changes
    assert shapes_full[-2:] == [(-1, 8, 8, 2, 2, 8), (-1, 8, 16, 16)]
    assert shapes_patch[-2:] == [(-1, 2, 8, 2, 2, 8), (-1, 8, 4, 16)]
    # attention reshapes use -1 for the tokens and are left alone
    views = [n.args[1:] for n in patch.graph.nodes if n.target == "view"]
    assert views and all(v[1] == -1 for v in views)


def test_unpatchify_is_fused_into_the_output_write():
    """The last stage returns the patch in token layout; `write_unpatchified` puts it in its rows of the output."""
    program = build_program(dit, num_stages=2, num_patches=4)
    pg = program.stages[-1].lowered.piece_graph(program.plan.pieces(pipelined=True)[0])
    assert pg.unpatchified == {"output": 2}
    targets = [n.target for n in pg.gm.graph.nodes]
    assert torch.functional.einsum not in targets and "reshape" not in targets[-3:]
    (out,) = next(iter(pg.gm.graph.find_nodes(op="output"))).args[0]
    assert out.target is torch._C._nn.linear  # proj_out: [B, rows * w, p * p * C]
    assert program.stages[0].lowered.piece_graph(program.plan.pieces(pipelined=True)[0]).unpatchified == {}


def test_stage_boundaries_carry_only_the_planned_values():
    program = build_program(pixart, num_stages=3, num_patches=3)
    for k, stage in enumerate(program.stages[:-1]):
        crossing = {t.name for t in program.plan.cuts[k].tensors}
        assert set(stage.lowered.outputs) == crossing
    recv = [i.name for i in program.stages[1].lowered.inputs if i.source == "recv"]
    assert recv == list(program.stages[0].lowered.outputs)
    image = [i for i in program.stages[0].lowered.inputs if i.source == "image"]
    assert [i.name for i in image] == ["l_hidden_states_"] and image[0].per_row == 2
    pos = [i for i in program.stages[0].lowered.inputs if i.source == "positional"]
    assert len(pos) == 1 and pos[0].axis == 1 and pos[0].per_row == 8


def test_joint_pieces_keep_their_token_group_and_write_kv_at_its_offset():
    """Flux: [text (6) | image (64)] along the attention's token axis; SD3: [image (64) | text (6)]."""
    from pipefusion_compile.models import flux, sd3
    from pipefusion_compile.passes.pieces import BAND, EXTRA, HEAD, TAIL, Piece

    for factory, band_offset, text_offset in ((flux, 6, 0), (sd3, 0, 64)):
        program = build_program(factory, num_stages=2, num_patches=2)
        text_kind = HEAD if factory is flux else TAIL
        assert [p.kind for p in program.plan.pieces(pipelined=True) if p.kind in EXTRA] == [text_kind]
        for stage in program.stages:
            band = stage.lowered.piece_graph(Piece(BAND, 0, 4 if factory is sd3 else 32))
            text = stage.lowered.piece_graph(Piece(text_kind))
            for pg, offset in ((band, band_offset), (text, text_offset)):
                updates = [n for n in pg.gm.graph.nodes if n.target is KV_UPDATE]
                assert updates and all(u.args[7] == offset for u in updates), (factory.__name__, offset)
                # no concatenation along the token axis is left: each piece holds one token group
                assert not [n for n in pg.gm.graph.nodes if node_meta(n).token is not None
                            and node_meta(n).token.rule == "cat-joint"]
            # the band never reads the text stream and the text piece never reads the image input
            assert "l_kwargs_hidden_states_" not in {i.name for i in text.inputs}
            assert not {i.name for i in band.inputs if i.source == "recv"} & {
                i.name for i in text.inputs if i.source == "recv" and i.prefix + i.suffix and i.per_row == 0}
            if stage.lowered.index == 1:  # the last stage's band writes the model output; the text piece none
                assert band.outputs and not text.outputs


def test_joint_layouts_the_lowering_cannot_express_are_clear_errors():
    """The same text tokens on both sides of the image along the token axis (two groups, each its own piece,
    would both need them), or a model output holding text and image tokens. A model output of the text
    tokens alone is written by the text piece: with one patch it equals the plain model."""
    import pytest
    import torch.nn.functional as F

    from toy_models import ToyDiT

    class JointToy(ToyDiT):
        def __init__(self, both_sides: bool, output: str = "text"):
            super().__init__(ff_mults=(1, 1))
            self.both_sides, self.output = both_sides, output

        def forward(self, hidden_states, encoder_hidden_states, return_dict=True):
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            t = encoder_hidden_states
            for blk in self.blocks:
                parts = [t, x, t] if self.both_sides else [x, t]
                joint = torch.cat(parts, dim=1)[:, None]
                joint = F.scaled_dot_product_attention(joint, joint, joint)[:, 0]
                x = x + joint[:, t.shape[1]:t.shape[1] + x.shape[1]] if self.both_sides else x + joint[:, :x.shape[1]]
                t = t + joint[:, -t.shape[1]:]
            out = self.unpatchify(x, hidden_states.shape, return_dict=False)[0]
            if self.both_sides:
                return (out,)
            return (out, t) if self.output == "text" else (out, joint)

    for both_sides, message in ((True, "same tokens on both sides of the image"),
                                (False, "model output that holds text")):
        torch.manual_seed(0)
        model = JointToy(both_sides, output="joint").eval()
        compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
        with pytest.raises(Exception, match=f"UnsupportedGraphError: .*{message}"), torch.no_grad():
            compiled(torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32))

    torch.manual_seed(0)
    model = JointToy(False, output="text").eval()
    inputs = (torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32))
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, warmup_steps=0, stage_backend="eager")
    with torch.no_grad():
        want, got = model(*inputs), compiled(*inputs)
    assert programs[0].stats["pipelined_calls"] == 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_a_stage_output_replaced_by_select_group_keeps_its_name():
    """Flux cut right after a single-stream block's `cat([text, image])` (partition [2, 4]: after the double-
    stream blocks; [3, 3]: between two single-stream blocks). `select_group` replaces the cat by the piece's
    operand; the piece graph still returns it under the cat's name, which is what the next stage reads."""
    from pipefusion_compile.models import flux
    from pipefusion_compile.passes.lower import output_names
    from pipefusion_compile.passes.pieces import BAND, HEAD, Piece

    for partition in ([2, 4], [3, 3]):
        program = build_program(flux, num_stages=2, num_patches=2, partition=partition)
        first, second = (s.lowered for s in program.stages)
        cut = program.plan.cuts[0].after_node
        cat = next(n for n in first.stage_gm.graph.nodes if n.name == cut)
        assert node_meta(cat).token.rule == "cat-joint" and cut in first.outputs
        text_operand, image_operand = (t.name for t in cat.args[0])  # Flux: text first
        for piece, operand in ((Piece(BAND, 0, 4), image_operand), (Piece(HEAD), text_operand)):
            pg = first.piece_graph(piece)
            returned = dict(zip(pg.outputs, next(iter(pg.gm.graph.find_nodes(op="output"))).args[0]))
            assert output_names(pg.gm) == pg.outputs and set(pg.outputs) <= set(first.outputs)
            # the cat is gone (its operand, here or after [3, 3] the slice of the previous block's joint output
            # that the operand was, computes the piece's part), its name is not
            assert returned[cut].name != cut and node_meta(returned[cut]).token.rule != "cat-joint"
            if partition == [2, 4]:
                assert returned[cut].name == operand, piece.kind
            # the stage interface agrees: every value the next stage's piece receives is one this piece returns
            received = [i.name for i in second.piece_graph(piece).inputs if i.source == "recv"]
            assert cut in received and set(received) <= set(pg.outputs), (partition, piece.kind)


def test_a_global_cast_like_a_token_value_reads_only_its_dtype():
    """`emb.type_as(hidden_states)` (Cosmos): GLOBAL, hoisted into the globals graph, which never sees tokens;
    it becomes `emb.to(dtype, device)` (before, the lowering failed: a token value asked for as a global)."""
    import torch.nn as nn

    from toy_models import ToyDiT

    class CastToy(ToyDiT):
        def __init__(self):
            super().__init__(ff_mults=(1, 1))
            self.t_proj = nn.Linear(1, 32)

        def forward(self, hidden_states, timestep, return_dict=True):
            x = self.embed(hidden_states).flatten(2).transpose(1, 2)
            emb = self.t_proj(torch.sin(timestep)[:, None]).type_as(x)[:, None]
            for blk in self.blocks:
                x = blk(x + emb)
            return self.unpatchify(x, hidden_states.shape, return_dict)

    torch.manual_seed(0)
    model = CastToy().eval()
    kwargs = dict(hidden_states=torch.randn(1, 4, 16, 16), timestep=torch.tensor([0.5]))
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kwargs)[0], model(**kwargs)[0], rtol=1e-5, atol=1e-6)
    casts = [n for st in programs[0].stages for n in st.lowered.globals_gm.graph.nodes if n.target == "to"]
    assert casts and all(len(n.args) == 1 and n.kwargs["dtype"] == torch.float32 for n in casts)


def test_a_positional_input_on_a_folded_axis_is_sliced_in_every_outer_slice():
    """A table folded like the tokens it meets ([outer * S, ...], outer-major) gives a band its rows of each
    of the `outer` slices: rows [1, 3) of 4 rows x 2 per row, outer 3 -> elements 2..5 of each slice of 8."""
    from pipefusion_compile.passes.lower import InputSource, StageInput
    from pipefusion_compile.passes.pieces import BAND, FULL, Piece

    full = torch.arange(3 * 8).reshape(3 * 8, 1)
    inp = StageInput("table", InputSource.POSITIONAL, axis=0, per_row=3 * 2, outer=3)
    band = inp.narrow(full, 4, Piece(BAND, 1, 2))
    assert band[:, 0].tolist() == [2, 3, 4, 5, 10, 11, 12, 13, 18, 19, 20, 21]
    assert inp.token_range(4, Piece(BAND, 1, 2)) == (2, 12)
    assert inp.narrow(full, 4, Piece(FULL, 0, 4)).shape == full.shape


def test_key_concatenation_moves_below_the_layout_ops_to_the_attention():
    """`concat_keys_at_attention`: cat([image K, text K], 1) on [B, S, H, D], then permute to [B, H, S, D],
    becomes cat of the permuted operands along dim 2, read by the attention itself; the values are equal."""
    import handwritten_dits as hd
    from graph_utils import capture_model
    from pipefusion_compile.passes.key_concat import concat_keys_at_attention

    model, kwargs = hd.make_text_keys_dit()
    gm, ex = capture_model(model, kwargs)
    with torch.no_grad():
        want = gm(*ex)
    assert all(sdpa_qkv(n)[1].target == "permute" for n in _sdpa(gm))
    changed = concat_keys_at_attention(gm)
    assert changed == [n.name for n in _sdpa(gm)] and len(changed) == 4
    for n in _sdpa(gm):
        for kv in sdpa_qkv(n)[1:]:
            assert kv.target is torch.cat and kv.kwargs["dim"] == 2
            assert [tuple(a.meta["example_value"].shape) for a in kv.args[0]] == [(2, 2, 64, 16), (2, 2, 6, 16)]
            assert all(a.target == "permute" for a in kv.args[0])
    with torch.no_grad():
        torch.testing.assert_close(gm(*ex), want, rtol=0, atol=0)
    # keys no longer than the queries (the [text | image] queries of joint attention) are left as they are
    model, kwargs = hd.make_hand_mmdit()
    gm, _ = capture_model(model, kwargs)
    assert concat_keys_at_attention(gm) == []
