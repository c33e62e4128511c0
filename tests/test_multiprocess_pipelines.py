"""Unchanged diffusers pipelines on 2 real ranks (gloo) equal simulate mode bit for bit, with a change of
resolution (and batch) mid-run in the same processes."""
import pytest
import torch

from dist_utils import run_ranks
from dist_workers import pipeline_sequence

VARIANTS = ["first", "second_resolution", "batch2", "first"]


def _simulate(name, options):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' thread count (see test_multiprocess.simulate)
    try:
        return pipeline_sequence(0, 1, name, {**options, "simulate": True}, VARIANTS)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["pixart_sigma", "flux"])
def test_pipeline_on_two_ranks_equals_simulate_across_shapes(name, tmp_path):
    options = {"num_stages": 2, "num_patches": 2}
    results = run_ranks(pipeline_sequence, 2, name, options, VARIANTS, tmp_path=tmp_path, timeout=400)
    want = _simulate(name, options)
    assert len(want["shapes"]) == 3 and want["stages"] == [2]
    for res in results:
        got = res["value"]
        assert got["distributed"] and got["shapes"] == want["shapes"]
        for variant, a, b in zip(VARIANTS, got["outputs"], want["outputs"]):
            assert torch.equal(a, b), (name, variant, res["rank"])
