"""The coverage harness feeds a model as its diffusers pipeline does (`helpers.Feed`): conditioning channels
concatenated to the latents every step, another name for the latent or timestep argument, a list of per-sample
latents, an output of which only a part is the noise prediction; the eager reference is fed the same way."""
from __future__ import annotations

import torch

from coverage_cases import Case
from coverage_runner import PASS, run_case
from helpers import Feed, call_model, channel_conditioned, sample_loop


class _Recorder:
    """A model_fn that records its inputs and returns a fixed function of them."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x, t, **kw):
        self.inputs.append((x, t, kw))
        return self.fn(x)


def test_default_feed_is_the_latents_and_the_whole_output():
    kwargs = dict(hidden_states=torch.zeros(2, 4, 8, 8), timestep=torch.zeros(2), prompt=torch.ones(2, 3))
    model = _Recorder(lambda x: torch.cat([x, x], dim=1) * 0.1)  # learned sigma: twice the channels
    final, outs = sample_loop(model, kwargs, steps=3)
    assert final.shape == (2, 4, 8, 8) and [o.shape for o in outs] == [(2, 8, 8, 8)] * 3
    x, t, kw = model.inputs[0]
    assert x.shape == (2, 4, 8, 8) and t.dtype == torch.float32 and set(kw) == {"prompt"}


def test_conditioning_channels_are_concatenated_to_the_latents_every_step():
    cond = torch.randn(2, 3, 8, 8)
    kwargs = dict(hidden_states=torch.cat([torch.zeros(2, 4, 8, 8), cond], dim=1), timestep=torch.zeros(2))
    model = _Recorder(lambda x: x[:, :4] * 0.5 + x[:, 4:5])
    final, outs = sample_loop(model, kwargs, steps=3, feed=channel_conditioned(4))
    assert final.shape == (2, 4, 8, 8) and all(o.shape == (2, 4, 8, 8) for o in outs)
    for x, _, _ in model.inputs:
        assert x.shape == (2, 7, 8, 8) and torch.equal(x[:, 4:], cond)
    # the latents the model sees change from step to step (they are the scheduler's, not the builder's)
    assert not torch.equal(model.inputs[0][0][:, :4], model.inputs[1][0][:, :4])


def test_names_lists_and_a_prediction_slice():
    # Z-Image style: forward(x, t) with a list of per-sample [C, 1, H, W] latents; the pipeline steps -stack(out)
    feed = Feed(latent_arg="x", timestep_arg="t", latents=lambda built: torch.stack(built).squeeze(2),
                model_input=lambda x, built: list(x.unsqueeze(2).unbind(0)),
                prediction=lambda out, x: -torch.stack(out).squeeze(2))

    class ListModel(torch.nn.Module):
        def forward(self, x, t, return_dict=True):
            return ([s * 0.5 for s in x],)

    kwargs = dict(x=[torch.zeros(4, 1, 8, 8)] * 2, t=torch.zeros(2))
    final, outs = sample_loop(call_model(ListModel(), feed), kwargs, steps=2, feed=feed)
    assert final.shape == (2, 4, 8, 8) and outs[0].shape == (2, 4, 8, 8)
    # QwenImage-2.1 style: the output is the whole joint sequence [prompt | image]; the prediction is its end
    feed = Feed(prediction=lambda out, x: out[:, -x.shape[1]:])
    kwargs = dict(hidden_states=torch.zeros(2, 16, 4), timestep=torch.zeros(2))
    model = _Recorder(lambda x: torch.cat([torch.ones(2, 3, 4), x * 0.5], dim=1))
    _, outs = sample_loop(model, kwargs, steps=2, feed=feed)
    assert outs[0].shape == (2, 16, 4) and torch.equal(outs[0], model.inputs[0][0] * 0.5)


def _conditioned_pixart():
    """A tiny PixArt whose input is [latents (4) | fixed conditioning (2)], as an inpainting-style pipeline feeds it."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=6, out_channels=4,
        cross_attention_dim=16, caption_channels=12, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000).eval()
    g = torch.Generator().manual_seed(1)
    return model, dict(hidden_states=torch.randn(2, 6, 16, 16, generator=g),
                       encoder_hidden_states=torch.randn(2, 6, 12, generator=g), timestep=torch.full((2,), 500.0),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def test_a_conditioned_case_is_pipelined_and_equal_to_the_reference_fed_the_same_way():
    row = run_case(Case("ConditionedPixArt", _conditioned_pixart, feed=channel_conditioned(4)), steps=2)
    assert (row.m1_equal_plain, row.m4_equal_reference) == (PASS, PASS), row.error


def test_without_its_feed_the_conditioned_case_fails_to_build():
    row = run_case(Case("ConditionedPixArt", _conditioned_pixart), steps=2)
    assert row.m4_equal_reference == "build failed" and row.error.startswith("build: RuntimeError")


def test_motif_video_reaches_the_backend_with_its_conditioning_and_is_equal():
    from coverage_cases import case_by_name

    row = run_case(case_by_name("MotifVideoTransformer3DModel"), steps=2)
    assert (row.m1_equal_plain, row.m4_equal_reference) == (PASS, PASS), row.error
