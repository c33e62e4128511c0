"""Sequence parallelism inside a stage (Ulysses, `ulysses.py`, `passes/sequence_parallel.py`): the pieces each rank
runs, the rewritten piece graphs, the errors, and on 4 gloo ranks pp 2 x sp 2 and cfg 2 x sp 2 against the same
plan in one process (whole bands), bit for bit, with the bytes each rank sends equal to the plan's prediction."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import pipefusion_compile
from dist_utils import run_ranks
from dist_workers import generate, pipeline_jobs, pipeline_sequence, run_job, with_rank_threads
from graph_utils import capture_model
from pipefusion_compile.errors import OptionsError, PipefusionError
from pipefusion_compile.models import BUILTIN
from pipefusion_compile.options import PipefusionOptions
from pipefusion_compile.passes.lower import lower
from pipefusion_compile.passes.pieces import BAND, FULL, TAIL, Piece, sub_band
from pipefusion_compile.passes.sequence_parallel import SequenceParallel
from pipefusion_compile.plan import build_plan

STEPS = 3
OPS = torch.ops.pipefusion


# --------------------------------------------------------------------------------------------- analysis level
def test_sub_bands_cover_each_band_in_order():
    for rows in range(2, 9):
        for parts in range(1, rows + 1):
            band = Piece(BAND, 5, rows)
            subs = [sub_band(band, parts, r) for r in range(parts)]
            assert [s.row0 for s in subs] == [5 + sum(s.rows for s in subs[:r]) for r in range(parts)]
            assert sum(s.rows for s in subs) == rows and min(s.rows for s in subs) >= 1
            assert all(s.split == tuple(x.rows for x in subs) for s in subs)
            assert len({s.key for s in subs}) == len({s.rows for s in subs})   # the key: rows and the split


def _plan(name, **options):
    model, kwargs = BUILTIN[name]()
    gm, ex = capture_model(model, kwargs)
    opts = PipefusionOptions.from_dict({"stage_backend": "eager", **options}).resolve()
    plan, analysis = build_plan(gm, ex, opts)
    return gm, ex, plan, analysis


def test_each_rank_runs_its_part_of_every_band_and_the_text_whole():
    _, _, plan, _ = _plan("SD3Transformer2DModel", num_stages=2, num_patches=2)
    whole = plan.pieces(True)
    parts = [dataclasses.replace(plan, sp_degree=2, sp_rank=r).pieces(True) for r in range(2)]
    for r, pieces in enumerate(parts):
        assert [p.kind for p in pieces] == [p.kind for p in whole]
        assert [p for p in pieces if p.kind is TAIL] == [Piece(TAIL)]   # every rank runs the text whole
        bands = [p for p in pieces if p.kind is BAND]
        assert bands == [sub_band(b, 2, r) for b in whole if b.kind is BAND]
    assert dataclasses.replace(plan, sp_degree=2).pieces(False) == (Piece(FULL, 0, plan.token_rows),)
    assert "sequence parallel: 2 ranks per stage" in str(dataclasses.replace(plan, sp_degree=2, sp_rank=1))


# --------------------------------------------------------------------------------------------- graph pass
def test_rewrite_puts_all_to_alls_around_each_attention_and_halves_the_caches():
    gm, _, plan, analysis = _plan("SD3Transformer2DModel", num_stages=2, num_patches=2)
    sp = SequenceParallel(2, 1, "sp-test")
    plan = dataclasses.replace(plan, sp_degree=2, sp_rank=1)
    plain = lower(gm, dataclasses.replace(plan, sp_degree=1, sp_rank=0), analysis)
    stages = lower(gm, plan, analysis, sp=sp)
    for stage, ref in zip(stages, plain):
        assert [s.shape[1] * 2 for s in stage.caches] == [s.shape[1] for s in ref.caches]   # heads / 2
        n_attn = len(stage.caches)
        band = next(p for p in plan.pieces(True) if p.kind is BAND)
        g = stage.piece_graph(band).gm.graph
        scatter = [n for n in g.nodes if n.target is OPS.sp_scatter_heads.default]
        gather = [n for n in g.nodes if n.target is OPS.sp_gather_heads.default]
        assert len(scatter) == len(gather) == n_attn
        spec = stage.caches[0]
        sizes = [rows * spec.per_row for rows in band.split]
        assert scatter[0].args[3] == sizes and gather[0].args[1] == sizes
        updates = [n for n in g.nodes if n.target is OPS.kv_cache_update.default]
        # the band's fresh K/V land at the band's rows: this rank's part starts sizes[0] elements into it
        assert all(u.args[2].args[0] is scatter[i] for i, u in enumerate(updates))
        assert [u.args[7] for u in updates] == [spec.prefix - sizes[0]] * n_attn
        text = stage.piece_graph(Piece(TAIL)).gm.graph
        assert len([n for n in text.nodes if n.target is OPS.sp_all_gather_heads.default]) == n_attn
        narrows = [n for n in text.nodes if n.target is torch.narrow]
        assert {n.args[1:] for n in narrows} == {(1, 1, 1)}   # heads [1, 2) of 2 (tiny SD3: 2 heads)


# --------------------------------------------------------------------------------------------- errors
def _compile_and_call(name, options, **factory_kwargs):
    torch._dynamo.reset()
    model, kwargs = BUILTIN[name](**factory_kwargs)
    compiled = torch.compile(model, backend="pipefusion", options={"stage_backend": "eager", **options})
    with torch.no_grad():
        return compiled(**kwargs)


def test_sequence_parallel_not_dividing_the_heads_is_named():
    with pytest.raises(Exception) as e:
        _compile_and_call("PixArtTransformer2DModel", {"num_stages": 1, "num_patches": 1, "sequence_parallel": 3})
    msg = str(e.value)
    assert "sequence_parallel=3" in msg and "heads" in msg and "divides 2" in msg and "from: hidden_states = F.scaled_dot_product_attention(" in msg


def test_bands_smaller_than_the_degree_are_named():
    with pytest.raises(Exception) as e:
        _compile_and_call("PixArtTransformer2DModel", {"num_stages": 1, "num_patches": 8, "sequence_parallel": 2})
    assert "sequence_parallel=2 splits every band" in str(e.value) and "has 1 row;" in str(e.value)


def test_bad_sequence_parallel_options():
    """(A product of degrees that is not the world size: `test_hybrid.test_degrees_not_the_world_size_are_refused`.)"""
    with pytest.raises(OptionsError, match="sequence_parallel=0"):
        PipefusionOptions(sequence_parallel=0)
    with pytest.raises(OptionsError, match="sp_group="):
        PipefusionOptions(sp_group=[0, 1])
    with pytest.raises(OptionsError, match="chooses num_stages, cfg_parallel and sequence_parallel"):
        PipefusionOptions(parallel="auto", sequence_parallel=2).resolve()


def test_in_one_process_sequence_parallel_runs_whole_bands():
    """The degree is checked but not simulated: the result is the plan's without it, bit for bit."""
    got = run_job("PixArtTransformer2DModel", {}, {"num_stages": 2, "num_patches": 2, "sequence_parallel": 2}, STEPS)
    want = run_job("PixArtTransformer2DModel", {}, {"num_stages": 2, "num_patches": 2}, STEPS)
    assert torch.equal(got["final"], want["final"])


# --------------------------------------------------------------------------------------------- 4 real ranks
JOBS = [  # (name, factory kwargs, options): pp 2 x sp 2 on an image-only and a joint-text model, cfg 2 x sp 2
    ("PixArtTransformer2DModel", {}, {"num_stages": 2, "sequence_parallel": 2, "num_patches": 2}),
    ("SD3Transformer2DModel", {}, {"num_stages": 2, "sequence_parallel": 2, "num_patches": 2}),
    ("PixArtTransformer2DModel", {"batch": 2}, {"num_stages": 1, "cfg_parallel": 2, "sequence_parallel": 2,
                                                "num_patches": 2}),
]


def test_hybrids_with_sequence_parallel_on_four_ranks_equal_simulate_bit_for_bit(tmp_path):
    """Bit for bit: each rank's linear layers run on its part of a band, the plan in one process on the whole
    band, and the attention on half the heads; measured here, CPU kernels give the same bits for each row and
    head whatever the rows and heads around it (at these shapes; assert_close would be the fallback)."""
    results = run_ranks(generate, 4, JOBS, STEPS, tmp_path=tmp_path, timeout=600)
    for j, (name, fkw, options) in enumerate(JOBS):
        whole = {k: v for k, v in options.items() if k != "sequence_parallel"}
        want = with_rank_threads(run_job, name, fkw, {**whole, "simulate": True}, STEPS)
        plain = with_rank_threads(run_job, name, fkw, {"num_stages": 1, "num_patches": 1, "simulate": True}, STEPS)
        assert not torch.allclose(want["final"], plain["final"], atol=1e-4)   # the stale K/V changed something
        for res in results:
            got = res["value"][j]
            assert torch.equal(got["final"], want["final"]), (name, options, res["rank"])
            for a, b in zip(got["steps"], want["steps"]):
                assert torch.equal(a, b), (name, options, res["rank"])
            # bytes: the all-to-alls and gathers of the group as the plan predicts, the pipeline's p2p per step
            assert got["stats"]["sp_bytes_sent"] == got["sp_plan_bytes"] > 0, (name, options, res["rank"])
            assert got["stats"]["bytes_sent"] == got["plan_bytes_by_step"][-1], (name, options, res["rank"])
            assert got["stats"]["sp_collectives"] > 0


PIPELINES = [  # (tiny pipeline, options, variants): unchanged diffusers pipelines on 4 ranks
    ("pixart_sigma", {"num_stages": 2, "sequence_parallel": 2, "num_patches": 2}, ["first", "batch2"]),
    ("flux", {"num_stages": 1, "cfg_parallel": 2, "sequence_parallel": 2, "num_patches": 2}, ["first"]),
    ("wan", {"num_stages": 1, "cfg_parallel": 2, "sequence_parallel": 2, "num_patches": 2}, ["first"]),
]


def test_unchanged_pipelines_on_four_ranks_with_sequence_parallel(tmp_path):
    """PixArt-Sigma pp 2 x sp 2 (a second batch size in the same process), Flux true CFG and Wan as two calls per
    step, cfg 2 x sp 2 (the two-call form: each call's stream on its half, two ranks each). Bit for bit but Wan:
    its parts of a band hold 2 token rows, and a CPU linear layer over fewer than 4 rows takes another kernel
    than over the whole band (measured: last bits differ), so Wan is assert_close at 1e-5."""
    results = run_ranks(pipeline_jobs, 4, PIPELINES, tmp_path=tmp_path, timeout=900)
    for j, (name, options, variants) in enumerate(PIPELINES):
        whole = {k: v for k, v in options.items() if k != "sequence_parallel"}
        want = with_rank_threads(pipeline_sequence, 0, 1, name, {**whole, "simulate": True}, variants)
        for res in results:
            got = res["value"][j]
            assert got["distributed"] and got["stages"] == [options["num_stages"]]
            for variant, a, b in zip(variants, got["outputs"], want["outputs"]):
                if name == "wan":
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
                else:
                    assert torch.equal(a, b), (name, variant, res["rank"])
