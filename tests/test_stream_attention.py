"""A second token stream in its own tensor (register tokens here, LTX-2's audio): its queries attend over
the image keys, image queries attend over its keys (`passes/cross_group.py`).

Three levels: the analysis (which attention is which, the stream's token group), the lowered piece graphs
(who writes and who reads each K/V cache), and the numerics (M = 1 equals the plain model every step, the
stream's own output too; M = 4 equals the eager reference, which runs the stream as one more piece after the
image bands)."""
from __future__ import annotations

import pytest
import torch

import stream_dits as sd
from graph_utils import by_name, capture_model
from helpers import build_program, call_model, compile_pf, raised, sample_loop
from pipefusion_compile.passes.cross_group import CROSS_GROUP
from pipefusion_compile.passes.meta import Kind, MixingRule, node_meta
from pipefusion_compile.passes.pieces import BAND, TAIL, Piece
from pipefusion_compile.passes.sdpa import is_sdpa, sdpa_qkv
from pipefusion_compile.passes.tokens import analyze_tokens
from reference_pipefusion import ReferencePipeFusion

ORDERS = ("registers_first", "image_first")
STEPS = 5
IMAGE_TOKENS = 64   # 8 x 8 tokens


def _attention_by_shape(gm):
    """SDPA nodes keyed by (queries, keys) token counts, in graph order."""
    found = {}
    for n in gm.graph.nodes:
        if is_sdpa(n):
            q, k, _ = sdpa_qkv(n)
            key = (node_meta(q).token, q.meta["example_value"].shape[-2], k.meta["example_value"].shape[-2])
            found.setdefault(key[1:], []).append(n)
    return found


# ------------------------------------------------------------------------------------------------ analysis

@pytest.mark.parametrize("order", ORDERS)
def test_analysis_stream_becomes_the_tail_group_once_it_attends_to_the_image(order):
    gm, ex = capture_model(*sd.make_register_stream_dit(order))
    analyze_tokens(gm, ex)
    found = _attention_by_shape(gm)
    stream_queries = found[(sd.REGISTERS, IMAGE_TOKENS)]
    image_queries = found[(IMAGE_TOKENS, sd.REGISTERS)]
    assert len(stream_queries) == len(image_queries) == 4
    for n in stream_queries:   # register queries over image keys: an output of the TAIL group only
        info = node_meta(n).token
        assert (info.kind, info.mixing, info.attention) == (Kind.MIXING, MixingRule.STALE_KV_CROSS_GROUP, CROSS_GROUP)
        assert (info.epr, info.prefix, info.suffix) == (0, 0, sd.REGISTERS)
        assert node_meta(sdpa_qkv(n)[1]).token.epr > 0
    # image queries over the registers' keys: cross-group once the registers attended to the image; in block 0
    # of "image_first" the registers are still GLOBAL there (plain cross-attention over them)
    plain = 1 if order == "image_first" else 0
    for i, n in enumerate(image_queries):
        info = node_meta(n).token
        if i < plain:
            assert info.attention == "cross" and info.mixing is None
            assert not node_meta(sdpa_qkv(n)[1]).token.carries_tokens
            continue
        assert (info.mixing, info.attention, info.prefix, info.suffix) == (
            MixingRule.STALE_KV_CROSS_GROUP, CROSS_GROUP, 0, 0)
        k_info = node_meta(sdpa_qkv(n)[1]).token
        assert (k_info.epr, k_info.suffix) == (0, sd.REGISTERS)
    # the registers' self-attention: the TAIL group over itself; GLOBAL before the stream attended
    reg_self = found[(sd.REGISTERS, sd.REGISTERS)]
    assert node_meta(reg_self[0]).token.kind is Kind.GLOBAL
    for n in reg_self[1:]:
        info = node_meta(n).token
        assert (info.attention, info.epr, info.suffix) == ("self", 0, sd.REGISTERS)


def test_plan_runs_the_stream_as_a_tail_piece_and_caches_both_directions():
    plan = build_program(sd.make_register_stream_dit, num_stages=2, num_patches=4).plan
    assert plan.text == "last"
    assert [p.kind for p in plan.pieces(pipelined=True)] == [BAND] * 4 + [TAIL]
    rules = [m.rule for m in plan.mixing]
    assert rules.count(MixingRule.STALE_KV_CROSS_GROUP) == 8
    assert "STALE_KV_CROSS_GROUP" in str(plan)


# ------------------------------------------------------------------------------------------------ graph pass

def test_piece_graphs_write_keys_where_they_are_computed_and_read_where_the_queries_are():
    """Band pieces write the image K/V of the register queries' caches and read the registers' K/V caches;
    the TAIL piece does the opposite, and runs the register queries over the whole image cache."""
    program = build_program(sd.make_register_stream_dit, num_stages=2, num_patches=4)
    stage = program.stages[0].lowered
    band, tail = stage.piece_graph(Piece(BAND, 0, 2)).gm, stage.piece_graph(Piece(TAIL)).gm
    specs = {c.attention: c for c in stage.caches}
    cross = [name for name, c in specs.items()
             if node_meta(by_name(stage.stage_gm)[name]).token.mixing is MixingRule.STALE_KV_CROSS_GROUP]
    assert cross

    def writes(gm):
        return {n.args[0].name for n in gm.graph.nodes
                if n.op == "call_function" and n.target is torch.ops.pipefusion.kv_cache_update.default}

    def reads(gm):
        return {sdpa_qkv(n)[1].name: n.name for n in gm.graph.nodes if is_sdpa(n)}

    for name in cross:
        stream_queries = node_meta(by_name(stage.stage_gm)[name]).token.epr == 0
        writer, reader = (band, tail) if stream_queries else (tail, band)
        cache = f"{name}_cache_k"
        assert cache in writes(writer) and cache not in writes(reader)
        assert reads(reader).get(cache) == name and name not in by_name(writer)
        spec = specs[name]
        assert spec.per_row == (8 if stream_queries else 0)   # 8 image tokens per row; the stream has none
        assert spec.shape[spec.axis] == (IMAGE_TOKENS if stream_queries else sd.REGISTERS)


def test_a_masked_stream_attention_is_refused_naming_it():
    model, kwargs = sd.make_register_stream_dit(masked=True)
    compiled, _ = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    err = raised(compiled, **kwargs)
    assert "attention between two token groups with a mask" in str(err)
    assert "scaled_dot_product_attention" in str(err)


# ------------------------------------------------------------------------------------------------ numerics

def _loop(fn, kwargs):
    """sample_loop over a model returning (prediction, stream output): returns (final, predictions, streams)."""
    streams = []

    def step(x, t, **kw):
        out, stream = fn(x, t, **kw)
        streams.append(stream)
        return out

    final, outs = sample_loop(step, kwargs, steps=STEPS)
    return final, outs, streams


def _model_fn(model):
    return lambda x, t, **kw: model(x, timestep=t, **kw, return_dict=False)


@pytest.mark.parametrize("order", ORDERS)
def test_one_patch_equals_plain_model_every_step(order):
    model, kwargs = sd.make_register_stream_dit(order, return_registers=True)
    _, want, want_streams = _loop(_model_fn(model), kwargs)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    _, got, got_streams = _loop(_model_fn(compiled), kwargs)
    assert programs[0].stats["pipelined_calls"] > 0
    for g, w in zip(got + got_streams, want + want_streams):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("order", ORDERS)
def test_stale_kv_equals_eager_reference(order, stages):
    model, kwargs = sd.make_register_stream_dit(order, return_registers=True)
    reference = ReferencePipeFusion(model, num_patches=4, stream_tokens=sd.REGISTERS, stream_output=1)
    want_final, want, want_streams = _loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs)
    assert reference.layers_seen == (12 if order == "registers_first" else 11)
    _, plain, plain_streams = _loop(_model_fn(model), kwargs)
    assert (want[-1] - plain[-1]).abs().max() > 1e-3          # the stale path matters here
    assert (want_streams[-1] - plain_streams[-1]).abs().max() > 1e-3
    compiled, programs = compile_pf(model, num_stages=stages, num_patches=4, stage_backend="eager")
    got_final, got, got_streams = _loop(_model_fn(compiled), kwargs)
    assert programs[0].stats["pipelined_calls"] > 0
    for g, w in zip(got + got_streams, want + want_streams):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_final, want_final, rtol=1e-4, atol=1e-5)


def test_reference_one_patch_is_the_plain_model():
    model, kwargs = sd.make_register_stream_dit(return_registers=True)
    reference = ReferencePipeFusion(model, num_patches=1, stream_tokens=sd.REGISTERS, stream_output=1)
    _, want, want_streams = _loop(_model_fn(model), kwargs)
    _, got, got_streams = _loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs)
    for g, w in zip(got + got_streams, want + want_streams):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_two_ranks_equal_simulate_bit_for_bit(tmp_path):
    """On real ranks (gloo) the TAIL piece of the stream runs on both stages after the bands and writes
    the stream's output (returned here too), bit for bit as in simulate mode."""
    from dist_utils import run_ranks
    from dist_workers import generate
    from test_multiprocess import assert_bit_identical, simulate

    jobs = [("stream:registers_first", {"return_registers": True}, {"num_patches": 4}),
            ("stream:image_first", {}, {"num_patches": 4})]
    results = run_ranks(generate, 2, jobs, 4, tmp_path=tmp_path, timeout=600)
    for j, (name, fkw, options) in enumerate(jobs):
        want = simulate(name, fkw, {**options, "num_stages": 2}, steps=4)
        for res in results:
            got = res["value"][j]
            assert_bit_identical(got, want)
            assert got["stats"]["bytes_sent"] == got["plan_bytes"], (name, res["rank"])
            assert got["stats"]["pipelined_calls"] == 3
