"""One executor: simulate runs every stage's schedule graph (the one a rank runs) over the in-process transport,
so one process exercises routes, pack and unpack; multi-rank runs equal it bit for bit (tests/test_multiprocess*)."""
from __future__ import annotations

import pytest
import torch

import pipefusion_compile
from dist_workers import run_job
from pipefusion_compile.comm import LocalComm, PipefusionCommError
from pipefusion_compile.models import BUILTIN, BUILTIN_OPTIONS
from pipefusion_compile.runtime_dist import DistributedProgram


def _simulated(name, steps=2, **options):
    torch._dynamo.reset()
    model, kwargs = BUILTIN[name]()
    opts = {"stage_backend": "eager", **BUILTIN_OPTIONS.get(name, {}), "simulate": True, **options}
    compiled = torch.compile(model, backend="pipefusion", options=opts)
    from helpers import call_model, sample_loop

    sample_loop(call_model(compiled), kwargs, steps=steps)
    (program,) = pipefusion_compile.programs(compiled)
    return program


def test_simulate_runs_each_stages_schedule_graph_with_its_comm_ops():
    """The same checks as tests/test_multiprocess.py::test_schedule_graph_shows_the_comm_ops, in one process."""
    program = _simulated("DiTTransformer2DModel", num_stages=3, num_patches=2)
    assert not isinstance(program, DistributedProgram)
    first, middle, last = (str(program.schedule_graph(pipelined=True, stage=k).graph) for k in range(3))
    assert "pipefusion.irecv" not in first and first.count("pipefusion.isend") == 2
    assert middle.count("pipefusion.irecv") == 2 and middle.count("pipefusion.isend") == 2
    assert middle.count("pipefusion.unpack") == 2 and middle.index("pipefusion.irecv") < middle.index(
        "pipefusion.wait.default")
    assert last.count("pipefusion.write_unpatchified") == 2 and "pipefusion.isend" not in last  # outputs shared
    for text in (first, middle, last):
        assert "outbuf_" not in text and "pipefusion.wait_sends" in text
    # what ran is those graphs: one per (stage, pieces) was built and used
    assert {key[0] for key in program._schedules} == {0, 1, 2}


@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "FluxTransformer2DModel"])
def test_simulate_moves_the_bytes_the_plan_predicts_and_leaves_no_message_behind(name):
    program = _simulated(name, num_stages=2, num_patches=2)
    plan = program.plan
    assert program.stats["pipelined_calls"] == 1
    assert program.stats["bytes_sent"] == sum(plan.p2p_bytes_per_step(k) for k in range(plan.num_stages))
    comms = list(program.comms.values())
    assert all(isinstance(c, LocalComm) for c in comms) and len({id(c.mailbox) for c in comms}) == 1
    assert not comms[0].mailbox and not any(c._pending for c in comms)


def test_a_stage_waiting_for_a_message_never_sent_fails_naming_it():
    comm = LocalComm(name="t-local", stage=1, stage_ranks=[0, 1], timeout_s=1.0)
    buf = torch.empty(8, dtype=torch.uint8)
    comm.irecv(buf, 0, 3)
    with pytest.raises(PipefusionCommError, match=r"stage 1, step 0, patch 3: waits for patch 3 from stage 0"):
        comm.wait_recv(buf)
    sender = LocalComm(name="t-local-0", stage=0, stage_ranks=[0, 1], timeout_s=1.0, mailbox=comm.mailbox)
    sender.isend(torch.zeros(4, dtype=torch.uint8), 1, 3)
    comm.irecv(buf, 0, 3)
    with pytest.raises(PipefusionCommError, match="4 bytes, 8 expected"):
        comm.wait_recv(buf)


def test_simulate_equals_the_plain_model_at_one_patch_through_pack_and_unpack():
    """M = 1: every value crossing a cut is packed, left in the mailbox and unpacked in its traced layout;
    the result is still the plain model's, bit for bit."""
    from helpers import call_model, sample_loop

    for name in ("DiTTransformer2DModel", "PixArtTransformer2DModel"):
        got = run_job(name, {}, {"num_stages": 2, "num_patches": 1, "simulate": True}, steps=2)
        model, kwargs = BUILTIN[name]()
        final, per_step = sample_loop(call_model(model), kwargs, steps=2)
        assert got["stats"]["bytes_sent"] > 0
        assert torch.equal(got["final"], final), name
