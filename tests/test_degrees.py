"""parallel='auto': the candidates, their predicted step times and bytes, the choice, the CLI table, and the
choice on real ranks."""
import dataclasses
import math

import pytest
import torch

from dist_utils import run_ranks
from dist_workers import auto_job, run_job, with_rank_threads
from graph_utils import capture_model
from pipefusion_compile.cli import main
from pipefusion_compile.degrees import CfgForm, MachineConstants, enumerate_candidates, predict_call
from pipefusion_compile.errors import OptionsError
from pipefusion_compile.models import BUILTIN
from pipefusion_compile.options import PipefusionOptions
from pipefusion_compile.passes.batch import split_batch
from pipefusion_compile.plan import build_plan
from pipefusion_compile.sequence_program import sp_bytes_per_step

K = MachineConstants(flops_per_s=1e10, link_bytes_per_s=1e9, link_latency_s=1e-5, piece_overhead_s=1e-4,
                     call_overhead_s=1e-3, memory_bytes=2**40, source="test")
OPTS = PipefusionOptions(stage_backend="eager", num_stages=2).resolve()


def _dit(batch=2, layers=8):
    model, kwargs = BUILTIN["DiTTransformer2DModel"](batch=batch, num_layers=layers)
    return capture_model(model, kwargs)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_candidates_are_every_factorization_and_the_fastest_is_chosen(world):
    gm, ex = _dit()
    choice = enumerate_candidates(gm, ex, OPTS, world, K)
    got = {(c.cfg, c.pp, c.sp, c.patches, c.form) for c in choice.candidates if c.fits}
    rows = 8   # 16 x 16 latent, patch 2; 2 heads: sp 1 or 2
    want = set()
    for cfg in (1, 2):
        for sp in (1, 2):
            if world % (cfg * sp):
                continue
            pp = world // (cfg * sp)
            ms = [1] if pp == 1 else [m for m in (pp, 2 * pp) if m <= rows and rows // m >= sp]
            want |= {(cfg, pp, sp, m, CfgForm.NONE if cfg == 1 else CfgForm.BATCH) for m in ms}
    assert got == want
    assert {c.sp for c in choice.candidates if not c.fits} == {sp for sp in (4, 8) if world % sp == 0} | (
        {2} if world == 8 else set())   # sp 4 and 8 do not divide 2 heads; sp 2 x pp 4 with M=8: 1-row bands
    assert choice.chosen.step_s == min(c.step_s for c in choice.candidates if c.fits)
    assert [c.step_s for c in choice.candidates] == sorted(c.step_s for c in choice.candidates)
    table = str(choice)
    assert table.count("->") == 1 and "Ulysses" in table and "DistriFusion" in table


def test_prediction_is_the_model_of_the_module_docstring():
    gm, ex = _dit()
    choice = enumerate_candidates(gm, ex, OPTS, 4, K)
    for c in [c for c in choice.candidates if c.fits]:
        g, inputs = (split_batch(gm, ex, 2)[:2] if c.form is CfgForm.BATCH else (gm, ex))
        plan, analysis = build_plan(g, inputs, dataclasses.replace(OPTS, num_stages=c.pp, num_patches=c.patches))
        out = sum(o.numel() * 4 for o in [n.meta["example_value"] for n in gm.graph.find_nodes(op="output")[0]
                                          .all_input_nodes])
        part_out = out // 2 if c.form is CfgForm.BATCH else out
        if c.sp > 1:   # the plan of sequence-parallel part 0, its group's traffic from the traced shapes
            plan = dataclasses.replace(plan, sp_degree=c.sp)
            sp_bytes = tuple(sp_bytes_per_step(plan, g, analysis, s) for s in range(c.pp))
            assert c.sp_bytes == sp_bytes and all(sp_bytes)
            continue
        pieces = len(plan.pieces(pipelined=True))
        stage = [((s.flops + s.global_flops) / K.flops_per_s, pieces * K.piece_overhead_s,
                  (plan.p2p_bytes_per_step(s.index) + (part_out * (c.pp - 1) if s.index == c.pp - 1 else 0))
                  / K.link_bytes_per_s
                  + (pieces if s.index < c.pp - 1 else c.patches * (c.pp - 1)) * K.link_latency_s)
                 for s in plan.stages]
        busy = max(sum(t) for t in stage)
        bubble = busy * (c.pp - 1) / c.patches if c.form is CfgForm.BATCH else 0.0
        gather = part_out / K.link_bytes_per_s + K.link_latency_s if c.form is CfgForm.BATCH else 0.0
        assert math.isclose(c.step_s, busy + bubble + K.call_overhead_s + gather, rel_tol=1e-9), c
        assert c.p2p_bytes == predict_call(plan, part_out, K, c.form is CfgForm.BATCH)["sent"]


def test_batch_of_one_lists_cfg_only_for_two_calls():
    gm, ex = _dit(batch=1)
    one = enumerate_candidates(gm, ex, OPTS, 4, K, calls_per_step=1)
    assert {c.form for c in one.candidates if c.fits} == {CfgForm.NONE}
    assert any("batch of 1" in c.note for c in one.candidates)
    two = enumerate_candidates(gm, ex, OPTS, 4, K, calls_per_step=2)
    forms = {c.form for c in two.candidates}
    assert CfgForm.TWO_CALLS in forms
    c = next(c for c in two.candidates if c.form is CfgForm.TWO_CALLS)
    assert c.cfg_bytes[-1] > 0 and not any(c.cfg_bytes[:-1])   # only the owner's last stage sends it on


def test_memory_that_does_not_fit_is_not_chosen():
    gm, ex = _dit()
    tight = dataclasses.replace(K, memory_bytes=1)
    with pytest.raises(Exception, match="no factorization of the world fits"):
        enumerate_candidates(gm, ex, OPTS, 2, tight)


def test_cli_prints_the_table_for_a_world_of_8(capsys):
    rc = main(["plan", "DiTTransformer2DModel", "--world", "8", "--batch", "2", "--bandwidth", "25",
               "--latency-us", "10", "--gflops", "100"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "parallel='auto': world 8, batch 2" in out and "25.00 GB/s" in out and "100.0 GFLOP/s" in out
    assert "not possible" in out   # 4 attention layers cannot make 8 stages
    assert out.count("->") == 1


def test_auto_options_are_checked():
    with pytest.raises(OptionsError, match="parallel='auto' chooses the degrees for the ranks"):
        PipefusionOptions(parallel="auto").resolve()
    with pytest.raises(OptionsError, match="expected 'auto' or 'manual'"):
        PipefusionOptions(parallel="fast")
    with pytest.raises(OptionsError, match="unknown constant"):
        MachineConstants.from_dict({"speed": 1.0}, K)


@pytest.mark.parametrize("case", ["pieces_expensive", "memory_tight", "pieces_expensive_batch1"])
def test_auto_on_two_ranks_chooses_the_same_everywhere_and_equals_simulate(case, tmp_path):
    """Expensive pieces (and collectives) make splitting the batch the fastest (batch 2), or with a batch of 1
    and cheap collectives sequence parallelism (one piece per call, where a pipeline runs M); memory that only a pipeline stage's share of the
    weights fits makes the pipeline the only candidate that fits. Either way every rank makes the same choice,
    the result is the chosen configuration's in one process bit for bit, and each rank sends per step what the
    chosen candidate predicts."""
    steps = 3
    batch = 1 if case == "pieces_expensive_batch1" else 2
    gm, ex = capture_model(*BUILTIN["DiTTransformer2DModel"](batch=batch))   # the model the ranks build
    by_form = {c.form: c for c in enumerate_candidates(gm, ex, OPTS, 2, K).candidates if c.sp == 1}
    if case == "pieces_expensive":   # and collectives: sp 2, also one piece per call, must not tie with cfg 2
        machine, want = {"piece_overhead_s": 1.0, "collective_s": 0.1}, (2, 1, 1)
    elif case == "pieces_expensive_batch1":
        machine, want = {"piece_overhead_s": 1.0, "collective_s": 1e-6}, (1, 1, 2)
    else:
        mid = (by_form[CfgForm.NONE].memory_bytes + by_form[CfgForm.BATCH].memory_bytes) // 2
        assert by_form[CfgForm.NONE].memory_bytes < mid < by_form[CfgForm.BATCH].memory_bytes
        machine, want = {"memory_bytes": mid}, (1, 2, 1)
    results = run_ranks(auto_job, 2, "DiTTransformer2DModel", {"batch": batch}, {"machine": machine}, steps,
                        tmp_path=tmp_path, timeout=400)
    chosen = {r["value"]["chosen"] for r in results}
    assert len(chosen) == 1, results[0]["value"]["table"]
    cfg, pp, m, _, sp = next(iter(chosen))
    assert (cfg, pp, sp) == want, results[0]["value"]["table"]
    sim = with_rank_threads(run_job, "DiTTransformer2DModel", {"batch": batch},
                    {"num_stages": pp, "num_patches": m, "cfg_parallel": cfg, "simulate": True}, steps)
    for r in results:
        assert r["value"]["auto_choice"] == r["value"]["table"]   # `degrees.choice_of(compiled)` finds it
        assert torch.equal(r["value"]["final"], sim["final"])
        stats = r["value"]["stats"]
        sent = stats["bytes_sent"] + (stats["output_bytes"] if r["value"]["stage"] == pp - 1 else 0)
        sent += stats.get("sp_bytes_sent", 0) // steps   # M = 1: warmup and pipelined steps send the same
        assert sent + stats.get("cfg_bytes_sent", 0) // steps == r["value"]["predicted_bytes"], r["value"]["table"]
