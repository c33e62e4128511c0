"""Unchanged diffusers pipelines on 2 real ranks (gloo) equal simulate mode bit for bit, with a change of
resolution (and batch) mid-run in the same processes."""
import pytest
import torch

from dist_utils import run_ranks
from dist_workers import pipeline_sequence, with_rank_threads

VARIANTS = ["first", "second_resolution", "batch2", "first"]


def _simulate(name, options):
    return with_rank_threads(pipeline_sequence, 0, 1, name, {**options, "simulate": True}, VARIANTS)


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


def test_new_resolution_keeps_each_rank_on_its_layers(tmp_path):
    """At 32 x 32 latents the FLOP-optimal 3-stage cut of this PixArt differs from the one at 16 x 16; ranks
    have already released the parameters of the other stages, so a new shape keeps the first shape's cuts."""
    from dist_workers import builtin_shapes

    options = {"num_stages": 3, "num_patches": 2}
    sizes = [16, 32, 16]
    results = run_ranks(builtin_shapes, 3, "PixArtTransformer2DModel", sizes, options, tmp_path=tmp_path, timeout=400)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = builtin_shapes(0, 1, "PixArtTransformer2DModel", sizes, {**options, "simulate": True})
    finally:
        torch.set_num_threads(threads)
    assert len(want["cuts"]) == 1  # one set of cuts for every shape
    for res in results:
        assert res["value"]["cuts"] == want["cuts"]
        for a, b in zip(res["value"]["finals"], want["finals"]):
            assert torch.equal(a, b)
