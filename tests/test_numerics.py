"""End-to-end numerics against the plain model and against the eager reference (fp32)."""
import pytest
import torch

import pipefusion_compile
from helpers import call_model, compile_pf, sample_loop
from pipefusion_compile.models import cogvideox, dit, flux, hunyuan_dit, ltx_video, pixart, sd3, wan
from reference_pipefusion import ImageLayout, ReferencePipeFusion, bands

MODELS = {"pixart": pixart, "dit": dit, "ltx_video": ltx_video, "hunyuan_dit": hunyuan_dit, "wan": wan,
          "sd3": sd3, "flux": flux, "cogvideox": cogvideox,
          "cogvideox_rope": lambda **kw: cogvideox(rope=True, **kw),
          # CogVideoX 1.5: frames patched in pairs (a token row = 2 latent frames), 8 frames
          "cogvideox_1_5": lambda **kw: cogvideox(frames=8, rope=True, patch_size_t=2, **kw)}
COGVIDEOX = ("cogvideox", "cogvideox_rope", "cogvideox_1_5")
# joint attention: [image | text] (SD3) or [text | image] (Flux, CogVideoX)
TEXT_FIRST = {"sd3": False, "flux": True, **{name: True for name in COGVIDEOX}}
# options a model needs: none (CogVideoX's [B, F, C, H, W] latents get token axis 1, the frames, from the analysis)
OPTIONS: dict[str, dict] = {}


def layout(name, model, kwargs):
    """The reference's image layout where `ImageLayout.of` cannot tell it from the input's shape."""
    if name in COGVIDEOX:  # [B, F, C, H, W]: bands of whole frames (of patch_size_t frames per token row)
        _, frames, _, height, width = kwargs["hidden_states"].shape
        p, pt = model.config.patch_size, model.config.patch_size_t or 1
        return ImageLayout(frames // pt, (height // p) * (width // p), 1, pt)
    return None


def make_reference(name, model, kwargs, patches, warmup_steps=1):
    text = kwargs["encoder_hidden_states"].shape[1] if name in TEXT_FIRST else 0
    return ReferencePipeFusion(model, num_patches=patches, warmup_steps=warmup_steps, text_tokens=text,
                               text_first=TEXT_FIRST.get(name, False), layout=layout(name, model, kwargs))


@pytest.mark.parametrize(("name", "stages"), [
    (name, stages) for name in sorted(MODELS) for stages in (1, 2, 3, 4)
    if name not in ("cogvideox_rope", "cogvideox_1_5") or stages in (2, 4)  # variants of a model: N = 2, 4
])
def test_one_patch_equals_plain_model_every_step(name, stages):
    model, kwargs = MODELS[name]()
    _, ref_steps = sample_loop(call_model(model), kwargs, steps=5)
    compiled, _ = compile_pf(model, num_stages=stages, num_patches=1, stage_backend="eager",
                             **OPTIONS.get(name, {}))
    _, steps = sample_loop(call_model(compiled), kwargs, steps=5)
    for got, want in zip(steps, ref_steps):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_warmup_covering_all_steps_equals_plain_model(name):
    model, kwargs = MODELS[name]()
    ref, _ = sample_loop(call_model(model), kwargs, steps=4)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=4, stage_backend="eager",
                                    **OPTIONS.get(name, {}))
    got, _ = sample_loop(call_model(compiled), kwargs, steps=4)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert programs[0].stats["pipelined_calls"] == 0


def test_warmup_zero_attends_to_zero_caches_first():
    """warmup_steps=0: step 0 is already pipelined; K/V not computed yet are the zero-initialised caches.
    A second generation starts from zero caches again (not from the last generation's K/V)."""
    model, kwargs = MODELS["pixart"]()
    reference = ReferencePipeFusion(model, num_patches=4, warmup_steps=0)

    def ref_fn(latents, t, **kw):
        return reference(latents, timestep=t, **kw)

    want_final, want_steps = sample_loop(ref_fn, kwargs, steps=4)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, warmup_steps=0, stage_backend="eager")
    for _ in range(2):  # the second loop is a new generation (timestep goes up): caches zeroed again
        got_final, got_steps = sample_loop(call_model(compiled), kwargs, steps=4)
        for got, want in zip(got_steps, want_steps):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_final, want_final, rtol=1e-4, atol=1e-5)
    assert (programs[0].stats["warmup_calls"], programs[0].stats["pipelined_calls"]) == (0, 8)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("patches", [2, 4])
def test_stale_kv_equals_eager_reference(name, patches):
    model, kwargs = MODELS[name]()
    reference = make_reference(name, model, kwargs, patches)

    def ref_fn(latents, t, **kw):
        return reference(latents, timestep=t, **kw)

    want_final, want_steps = sample_loop(ref_fn, kwargs, steps=10)
    stages = patches  # N = M = 2 and N = M = 4: every model at both pipeline depths
    compiled, programs = compile_pf(model, num_stages=stages, num_patches=patches, stage_backend="eager",
                                    **OPTIONS.get(name, {}))
    got_final, got_steps = sample_loop(call_model(compiled), kwargs, steps=10)
    assert programs[0].plan.patches == tuple(bands(programs[0].plan.token_rows, patches))
    assert (programs[0].stats["warmup_calls"], programs[0].stats["pipelined_calls"]) == (1, 9)
    for got, want in zip(got_steps, want_steps):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_final, want_final, rtol=1e-4, atol=1e-5)
    # and stale mode really differs from the plain model (the test could fail)
    plain_final, _ = sample_loop(call_model(model), kwargs, steps=10)
    assert (got_final - plain_final).abs().max() > 1e-4


def test_uneven_bands_any_resolution():
    model, kwargs = pixart(sample_size=14)  # 7 token rows, M=3 -> bands of 3, 2, 2
    reference = ReferencePipeFusion(model, num_patches=3)
    want, _ = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=4)
    compiled, programs = compile_pf(model, num_stages=2, num_patches=3, stage_backend="eager")
    got, _ = sample_loop(call_model(compiled), kwargs, steps=4)
    assert programs[0].plan.patches == ((0, 3), (3, 2), (5, 2))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_same_seed_twice_gives_identical_results_new_generation_detected():
    model, kwargs = pixart()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=4, stage_backend="eager")
    first, _ = sample_loop(call_model(compiled), kwargs, steps=6)
    second, _ = sample_loop(call_model(compiled), kwargs, steps=6)
    assert torch.equal(first, second)
    assert programs[0].state.generation == 1
    assert programs[0].stats["warmup_calls"] == 2


def test_explicit_reset_restarts_warmup():
    model, kwargs = dit()
    compiled, programs = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    f = call_model(compiled)
    x = kwargs["hidden_states"]
    rest = {"class_labels": kwargs["class_labels"]}
    with torch.no_grad():
        f(x, torch.tensor([500]), **rest)
        f(x, torch.tensor([400]), **rest)
        assert programs[0].state.step == 2
        assert pipefusion_compile.programs(compiled) == programs
        assert pipefusion_compile.reset(compiled) == 1
        assert programs[0].state.step == 0
        # a lower timestep would not have been detected: reset() is what starts warmup again
        f(x, torch.tensor([300]), **rest)
    assert programs[0].stats["warmup_calls"] == 2


def test_batch_of_two():
    model, kwargs = pixart(batch=2)
    reference = ReferencePipeFusion(model, num_patches=2)
    want, _ = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=3)
    compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    got, _ = sample_loop(call_model(compiled), kwargs, steps=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_long_skips_stale_kv_equals_eager_reference():
    from toy_models import make_skips

    model, kwargs = make_skips()
    reference = ReferencePipeFusion(model, num_patches=4)
    want, _ = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=5)
    compiled, _ = compile_pf(model, num_stages=3, num_patches=4, partition="uniform", stage_backend="eager")
    got, _ = sample_loop(call_model(compiled), kwargs, steps=5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_cogvideox_batch_of_two_folds_batch_with_frames():
    """Classifier-free guidance's batch of 2: CogVideoX's patch embedding reshapes [B, F, C, H, W] to
    [B * F, C, H, W] for a per-frame conv and back; each patch's frames go through it for both samples."""
    model, kwargs = cogvideox(batch=2)
    plain, plain_steps = sample_loop(call_model(model), kwargs, steps=5)
    compiled, _ = compile_pf(model, num_stages=2, num_patches=1, stage_backend="eager")
    _, steps = sample_loop(call_model(compiled), kwargs, steps=5)
    for got, want in zip(steps, plain_steps):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    reference = make_reference("cogvideox", model, kwargs, 2)
    want, _ = sample_loop(lambda x, t, **kw: reference(x, timestep=t, **kw), kwargs, steps=5)
    compiled, _ = compile_pf(model, num_stages=2, num_patches=2, stage_backend="eager")
    got, _ = sample_loop(call_model(compiled), kwargs, steps=5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4
