"""Real multi-process pipelines (gloo over 127.0.0.1) against simulate mode, and failure behaviour."""
import re
import time

import pytest
import torch

from dist_utils import run_ranks
from dist_workers import die_mid_step, generate, generate_in_groups, mismatched_options, run_job, with_rank_threads

MODELS = ["PixArtTransformer2DModel", "DiTTransformer2DModel", "LTXVideoTransformer3DModel", "HunyuanDiT2DModel",
          "WanTransformer3DModel"]
JOINT = ["SD3Transformer2DModel", "FluxTransformer2DModel",  # joint text+image attention: text is one more piece
         "CogVideoXTransformer3DModel"]
STEPS = 4  # warmup + 3 pipelined steps: every step compared bit for bit


def simulate(name, fkw, options, steps=STEPS, seed=1):
    """The same job in simulate mode, with the ranks' thread count: a reduction (e.g. HunyuanDiT's text
    pooling mean) may sum in another order with more threads, which changes the last bit."""
    return with_rank_threads(run_job, name, fkw, {**options, "simulate": True}, steps, seed=seed)


def assert_bit_identical(got, want):
    assert torch.equal(got["final"], want["final"])
    for a, b in zip(got["steps"], want["steps"]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_equal_each_other_and_simulate_bit_for_bit(world, tmp_path):
    jobs = [(name, {}, {"num_patches": m}) for name in MODELS for m in (1, 4)]
    if world != 3:  # joint attention: the warmup step already runs the full-sequence piece on every rank
        jobs += [(name, {}, {"num_patches": 4}) for name in JOINT]
    if world == 2:
        # classifier-free guidance in the batch, pipelined (parallel='auto' might split the batch instead)
        jobs.append(("PixArtTransformer2DModel", {"batch": 2}, {"num_patches": 4, "num_stages": 2}))
    results = run_ranks(generate, world, jobs, STEPS, tmp_path=tmp_path, timeout=600)
    for j, (name, fkw, options) in enumerate(jobs):
        want = simulate(name, fkw, {**options, "num_stages": world})
        for res in results:
            got = res["value"][j]
            assert_bit_identical(got, want)
            # the runtime counts what it sends; the plan predicted it exactly (per step, every step)
            assert got["stats"]["bytes_sent"] == got["plan_bytes"], (name, options, res["rank"])
            if got["stage"] < world - 1:
                assert got["plan_bytes"] > 0
        stats = [res["value"][j]["stats"] for res in results]
        assert stats[-1]["output_bytes"] == want["steps"][0].numel() * 4 * (world - 1)  # model output, fp32
        assert all(s["pipelined_calls"] == STEPS - 1 for s in stats)


def test_resident_parameters_are_the_stage_share(tmp_path):
    jobs = [("DiTTransformer2DModel", {"num_layers": 8}, {"num_patches": 2})]
    for world in (2, 4):
        results = run_ranks(generate, world, jobs, 2, tmp_path=tmp_path / str(world))
        total = results[0]["value"][0]["param_bytes"]
        for res in results:
            s = res["value"][0]["stats"]
            assert s["resident_param_bytes"] + s["released_param_bytes"] == total
            # each rank keeps its blocks plus the small replicated embedding / final layers
            assert s["resident_param_bytes"] < total / world * 1.35, (world, s, total)


def test_schedule_graph_shows_the_comm_ops(tmp_path):
    results = run_ranks(generate, 3, [("DiTTransformer2DModel", {}, {"num_patches": 2})], 2, tmp_path=tmp_path)
    first, middle, last = (r["value"][0]["schedule"] for r in results)
    # every rank but the last receives the 2 output bands (posted first); the last sends each to both others
    assert first.count("pipefusion.irecv") == 2 and first.count("outbuf_") >= 2 and first.count("pipefusion.isend") == 2
    assert middle.count("pipefusion.irecv") == 4 and middle.count("pipefusion.isend") == 2
    assert middle.index("pipefusion.irecv") < middle.index("pipefusion.wait.default")
    assert last.count("pipefusion.write_unpatchified") == 2 and last.count("pipefusion.isend") == 4  # unpatchify fused
    assert last.count("pipefusion.pack") == 2 and "pipefusion.irecv" in last and "outbuf_" not in last
    for text in (first, middle, last):
        assert "pipefusion.broadcast" not in text and "pipefusion.wait_sends" in text


def test_cogvideox_batch_of_two_equals_simulate_bit_for_bit(tmp_path):
    """CogVideoX with classifier-free guidance's batch of 2: the patch embedding folds batch x frames for its
    per-frame conv; text first; 2 ranks, M=1 and M=2 (4 latent frames)."""
    jobs = [("CogVideoXTransformer3DModel", {"batch": 2}, {"num_patches": m}) for m in (1, 2)]
    results = run_ranks(generate, 2, jobs, 4, tmp_path=tmp_path, timeout=600)
    for j, (name, fkw, options) in enumerate(jobs):
        want = simulate(name, fkw, {**options, "num_stages": 2}, steps=4)
        for res in results:
            got = res["value"][j]
            assert_bit_identical(got, want)
            assert got["stats"]["bytes_sent"] == got["plan_bytes"]


def test_joint_schedule_sends_the_text_piece_once_per_step(tmp_path):
    """Flux (text first): a pipelined step is [text, band 0, band 1]; each piece crosses the cut once."""
    results = run_ranks(generate, 2, [("FluxTransformer2DModel", {}, {"num_patches": 2})], 2, tmp_path=tmp_path)
    first, last = (r["value"][0]["schedule"] for r in results)
    assert first.count("pipefusion.isend") == 3 and last.count("pipefusion.irecv") == 3
    assert first.index("stage_head") < first.index("stage_band")
    assert last.count("pipefusion.write_band") == 2  # the text piece writes no model output


def test_flux_cut_right_after_a_joint_cat_equals_simulate_bit_for_bit(tmp_path):
    """The cut right after a single-stream block's cat([text, image]) (after the double-stream blocks, and
    between two single-stream blocks): the routes are built from the piece graphs' stage-output names, which
    the cat keeps after `select_group` replaced it by the piece's operand."""
    jobs = [("FluxTransformer2DModel", {}, {"num_patches": 2, "partition": p}) for p in ([2, 4], [3, 3])]
    results = run_ranks(generate, 2, jobs, 3, tmp_path=tmp_path, timeout=600)
    for j, (name, fkw, options) in enumerate(jobs):
        want = simulate(name, fkw, {**options, "num_stages": 2}, steps=3)
        for res in results:
            got = res["value"][j]
            assert_bit_identical(got, want)
            assert got["stats"]["bytes_sent"] == got["plan_bytes"]


def test_two_pipelines_of_two_in_a_world_of_four(tmp_path):
    job = ("PixArtTransformer2DModel", {}, {"num_patches": 4})
    results = run_ranks(generate_in_groups, 4, 2, job, 6, tmp_path=tmp_path)
    for group in (0, 1):
        want = simulate(job[0], job[1], {**job[2], "num_stages": 2}, steps=6, seed=100 + group)
        for res in results[2 * group:2 * group + 2]:
            assert_bit_identical(res["value"], want)
    assert not torch.equal(results[0]["value"]["final"], results[2]["value"]["final"])


def test_a_dead_rank_makes_the_others_fail_not_hang(tmp_path):
    t0 = time.time()
    results = run_ranks(die_mid_step, 3, 1, 3, 1, {"num_patches": 4, "timeout_s": 20}, tmp_path=tmp_path,
                        timeout=120, allow_errors=True)
    elapsed = time.time() - t0
    assert results[1]["error"] == "no result"  # the victim exited abruptly
    for res in (results[0], results[2]):
        assert "error" in res, res
        msg = res["error"]
        # rank 1 died in step 3; with patch-lazy outputs rank 0 may already be in step 4 (waiting there for a
        # band of step 3's output)
        assert "PipefusionCommError" in msg
        assert re.search(rf"rank {res['rank']} \(stage {res['rank']}\), step [34]", msg), msg
    assert elapsed < 100


def test_ranks_with_different_plans_fail_clearly(tmp_path):
    results = run_ranks(mismatched_options, 2, [{"num_patches": 2}, {"num_patches": 4}], tmp_path=tmp_path,
                        allow_errors=True)
    for res in results:
        assert "ranks built different pipeline plans" in res["error"]


def test_world_size_must_match_num_stages(tmp_path):
    results = run_ranks(mismatched_options, 2, [{"num_stages": 3}, {"num_stages": 3}], tmp_path=tmp_path,
                        allow_errors=True)
    for res in results:
        assert "the process group has 2 ranks but the plan has num_stages=3" in res["error"]


def test_timeline_records_merge_into_a_trace_and_a_gantt_chart(tmp_path):
    from pipefusion_compile.cli import main

    tdir = tmp_path / "timeline"
    jobs = [("DiTTransformer2DModel", {}, {"num_patches": 4, "timeline": str(tdir)})]
    run_ranks(generate, 3, jobs, 4, tmp_path=tmp_path / "ranks")
    png, trace = tmp_path / "gantt.png", tmp_path / "trace.json"
    assert main(["timeline", str(tdir), "--trace", str(trace), "--png", str(png), "--steps", "1:4"]) == 0
    import json

    events = json.loads(trace.read_text())["traceEvents"]
    compute = [e for e in events if e.get("cat") == "compute"]
    # 3 pipelined steps x 4 patches on each of the 3 stages
    assert len(compute) == 3 * 4 * 3
    assert {(e["tid"], e["args"]["patch"]) for e in compute} == {(r, p) for r in range(3) for p in range(4)}
    # stages receive patches from earlier ones, and every rank but the last the output bands from the last
    assert {e["tid"] for e in events if e.get("cat") == "recv"} == {0, 1, 2}
    assert {e["tid"] for e in events if e.get("cat") == "send"} == {0, 1, 2}
    # a patch is computed by stage 1 only after stage 0 computed it
    first = {(e["tid"], e["args"]["step"], e["args"]["patch"]): e for e in compute}
    for step in (1, 2, 3):
        for p in range(4):
            assert first[(1, step, p)]["ts"] >= first[(0, step, p)]["ts"] + first[(0, step, p)]["dur"] - 1
    assert png.stat().st_size > 10_000


def _events(directory):
    from pipefusion_compile.timeline import load_events

    return load_events(str(directory))


def test_no_fill_or_drain_between_pipelined_steps(tmp_path):
    """With patch-lazy outputs rank 0 starts step t+1 before it has the last band of step t's output (it takes
    band j just before its patch j of step t+1: no drain and fill between steps); with `lazy_outputs=False` it
    has every band of step t before it starts step t+1. Checked on the order of the recorded events, which
    does not depend on timing (the Gantt charts in the README show the timing)."""
    steps, m = 6, 4
    for lazy in (True, False):
        tdir = tmp_path / f"timeline_{lazy}"
        jobs = [("DiTTransformer2DModel", {"num_layers": 4}, {"num_patches": m, "timeline": str(tdir),
                                                              "lazy_outputs": lazy})]
        run_ranks(generate, 2, jobs, steps, tmp_path=tmp_path / f"ranks_{lazy}")
        events = _events(tdir)
        compute = {(e["rank"], e["step"], e["patch"]): e for e in events if e["kind"] == "compute"}
        assert {k for k in compute if k[1] > 0} == {(r, t, p) for r in (0, 1) for t in range(1, steps) for p in range(m)}
        # rank 0's waits for output bands from rank 1, by (step recorded in, band)
        bands = {(e["step"], e["patch"]): e for e in events if e["rank"] == 0 and e["kind"] == "recv" and e["peer"] == 1}
        for t in range(1, steps - 1):
            first = compute[(0, t + 1, 0)]
            if lazy:   # band j of step t's output is taken during step t+1, right before patch j
                for j in range(m):
                    got = bands[(t + 1, j)]
                    assert got["start"] >= (compute[(0, t + 1, j - 1)]["end"] if j else 0)
                    assert got["end"] <= compute[(0, t + 1, j)]["start"]
                assert bands[(t + 1, m - 1)]["start"] > first["end"]
            else:      # every band of step t arrives within call t, after its last patch, before step t+1 starts
                assert all(compute[(0, t, m - 1)]["end"] <= bands[(t, j)]["start"] and bands[(t, j)]["end"] <= first["start"]
                           for j in range(m))


def test_long_skips_go_straight_to_their_stage_packed_with_the_residual(tmp_path):
    jobs = [("toy:skips", {}, {"num_patches": 4, "partition": "uniform"})]
    results = run_ranks(generate, 3, jobs, 6, tmp_path=tmp_path)
    want = simulate("toy:skips", {}, {"num_patches": 4, "partition": "uniform", "num_stages": 3}, steps=6)
    routes = results[0]["value"][0]["routes"]
    # stage 0 -> 1 carries the residual stream and the skip in one packed buffer; the skip also goes 0 -> 2
    assert len(routes[(0, 1)]) == 2 and len(routes[(0, 2)]) == 1 and len(routes[(1, 2)]) == 1
    assert routes[(0, 2)][0] in routes[(0, 1)]
    for res in results:
        got = res["value"][0]
        assert_bit_identical(got, want)
        assert got["stats"]["bytes_sent"] == got["plan_bytes"]
    assert results[0]["value"][0]["stats"]["bytes_sent"] == 3 * 64 * 32 * 4  # 3 token activations per step
