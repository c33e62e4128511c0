"""Every non-skipped L..Z coverage case builds and runs eagerly once, and its pipeline's prediction (the case's
`Feed`) has the shape of the latents the scheduler steps."""
from __future__ import annotations

import pytest
import torch

from coverage_cases_b import CASES


def _check(name, prediction, latents):
    """The latents' shape, or twice their channels (learned sigma: the loop steps with the first half)."""
    shape, expected = list(prediction.shape), list(latents.shape)
    if shape != expected:
        expected[1] *= 2
    assert shape == expected, (name, tuple(prediction.shape), tuple(latents.shape))


@pytest.mark.parametrize("case", [c for c in CASES if c.skip is None], ids=lambda c: c.name)
def test_case_runs_eagerly(case):
    model, kwargs = case.build()
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    feed = case.feed
    built = kwargs[feed.latent_arg]
    latents = feed.initial(built)
    # the feed rebuilds the builder's latent argument from its latents (the builder is the pipeline's first call)
    rebuilt = feed.input(latents, built)
    for a, b in zip(*(x if isinstance(x, list) else [x] for x in (rebuilt, built))):
        assert torch.equal(a, b), case.name
    with torch.no_grad():
        out = model(**kwargs, return_dict=False)[0]
    assert all(torch.isfinite(o).all() for o in (out if isinstance(out, list) else [out]))
    _check(case.name, feed.predicted(out, built), latents)


def test_skips_say_why():
    for case in CASES:
        assert (case.skip is None) == (case.build is not None), case.name
        assert case.skip is None or len(case.skip) > 20, case.name
