"""Coverage cases for the diffusers transformer classes A..K (see coverage_cases.py for the interface).

Every builder: tiny config (2-4 blocks, hidden 32, 2 heads), random weights seeded by the caller, fp32, CFG
batch 2, and the forward kwargs as the class's diffusers pipeline passes them (random prompt embeddings of
the right width instead of text encoders).
"""
from __future__ import annotations

import torch

from coverage_cases import UNBACKED_SIZES, Case
from helpers import Feed
from reference_pipefusion import ImageLayout

B = 2      # CFG batch
L = 6      # prompt tokens
H = W = 16  # latent height and width (patch 2: 8 x 8 tokens)


def _ids(frames, height, width, axes=3, batch=None, t_axis=0):
    """Flux-style position ids [height * width, axes] (frame, row, col) for packed tokens."""
    ids = torch.zeros(frames, height, width, axes)
    if axes == 4:  # Flux 2: (t, h, w, l)
        ids[..., 0] = torch.arange(frames)[:, None, None]
        ids[..., 1] = torch.arange(height)[None, :, None]
        ids[..., 2] = torch.arange(width)[None, None, :]
    else:
        ids[..., 0] = torch.arange(frames)[:, None, None] if frames > 1 else 0
        ids[..., 1] = torch.arange(height)[None, :, None]
        ids[..., 2] = torch.arange(width)[None, None, :]
    ids = ids.reshape(frames * height * width, axes)
    return ids if batch is None else ids.expand(batch, -1, -1).clone()


def _t(value=500, dtype=torch.int64):
    return torch.full((B,), value, dtype=dtype)


# ---------------------------------------------------------------------------------------------------- audio
def ace_step():
    from diffusers import AceStepTransformer1DModel

    model = AceStepTransformer1DModel(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16, in_channels=24, audio_acoustic_hidden_dim=8, patch_size=2, sliding_window=8,
        encoder_hidden_size=32,
    ).eval()
    frames = 32  # audio latent frames: 16 tokens after the patch-2 conv
    kwargs = dict(hidden_states=torch.randn(B, frames, 8), timestep=_t(0.5, torch.float32),
                  timestep_r=_t(0.5, torch.float32), encoder_hidden_states=torch.randn(B, L, 32),
                  context_latents=torch.randn(B, frames, 16))
    return model, kwargs


# ---------------------------------------------------------------------------------------------------- video
def allegro(frames=4):
    from diffusers import AllegroTransformer3DModel

    model = AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=32, sample_height=H, sample_width=W, sample_frames=frames,
        caption_channels=16,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), encoder_hidden_states=torch.randn(B, L, 16),
                  encoder_attention_mask=torch.ones(B, L), timestep=_t())
    return model, kwargs


def _wan_like(cls, frames, extra_init=(), **extra_kwargs):
    import diffusers

    model = getattr(diffusers, cls)(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, **{"rope_max_seq_len": 32, **dict(extra_init)},
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), timestep=_t(),
                  encoder_hidden_states=torch.randn(B, L, 16), **extra_kwargs)
    return model, kwargs


class TupleOutput(torch.nn.Module):
    """Kandinsky 5's forward returns a bare tensor for return_dict=False (its pipelines use return_dict=True);
    the shared loop takes `[0]` of the return_dict=False result, as for every other class."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, *args, return_dict=False, **kwargs):
        return (self.model(*args, return_dict=False, **kwargs),)


class PerFrameTimestep(torch.nn.Module):
    """AnyFlow's pipeline passes a per-frame timestep [B, F] (the same t for every frame); the shared DDIM loop
    (tests/helpers.py) passes [B]: this repeats it over the frames, as the pipeline does, and nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, hidden_states, timestep, **kwargs):
        timestep = timestep.unsqueeze(-1).repeat(1, hidden_states.shape[1])
        return self.model(hidden_states, timestep=timestep, **kwargs)


def anyflow(frames=4):
    """Latents [B, F, C, H, W] (the model permutes to [B, C, F, H, W]); r_timestep [B, F] like the pipeline's."""
    model, kwargs = _wan_like("AnyFlowTransformer3DModel", frames, extra_init={}.items())
    kwargs["hidden_states"] = kwargs["hidden_states"].transpose(1, 2).contiguous()
    kwargs["r_timestep"] = torch.full((B, frames), 500, dtype=torch.int64)
    return PerFrameTimestep(model).eval(), kwargs


def chronoedit(frames=4):
    return _wan_like("ChronoEditTransformer3DModel", frames)


def helios(frames=4):
    from diffusers import HeliosTransformer3DModel

    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6),
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), timestep=_t(),
                  encoder_hidden_states=torch.randn(B, L, 16))
    return model, kwargs


def cogvideox(frames=4):
    from pipefusion_compile.models import cogvideox as build

    return build(frames=frames, height=H, width=W, num_layers=2, batch=B, prompt_tokens=L)


def _cog_layout(frames, patch_t=1):
    return ImageLayout(frames // patch_t, (H // 2) * (W // 2), 1, patch_t)


def consisid(frames=4):
    from diffusers import ConsisIDTransformer3DModel

    model = ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=32, num_layers=2, sample_width=W, sample_height=H, sample_frames=(frames - 1) * 4 + 1,
        patch_size=2, max_text_seq_length=L, is_train_face=False,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, frames, 4, H, W), encoder_hidden_states=torch.randn(B, L, 32),
                  timestep=_t())
    return model, kwargs


def cosmos(frames=4):
    """concat_padding_mask=False: with True the model resizes the mask with torchvision, not installed here."""
    from diffusers import CosmosTransformer3DModel

    model = CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2.0,
        text_embed_dim=32, adaln_lora_dim=8, max_size=(8, H, W), patch_size=(1, 2, 2), concat_padding_mask=False,
        extra_pos_embed_type="learnable",
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), timestep=_t(0.5, torch.float32),
                  encoder_hidden_states=torch.randn(B, L, 32), fps=24)
    return model, kwargs


def easyanimate(frames=4):
    from diffusers import EasyAnimateTransformer3DModel

    model = EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=W,
        sample_height=H, num_layers=2, mmdit_layers=2, time_embed_dim=32, text_embed_dim=32,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), timestep=_t(),
                  encoder_hidden_states=torch.randn(B, L, 32))
    return model, kwargs


def hunyuan_video(frames=4):
    from diffusers import HunyuanVideoTransformer3DModel

    model = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), timestep=_t(),
                  encoder_hidden_states=torch.randn(B, L, 32), encoder_attention_mask=torch.ones(B, L),
                  pooled_projections=torch.randn(B, 16), guidance=torch.full((B,), 6000.0))
    return model, kwargs


def hunyuan_video15(frames=4):
    from diffusers import HunyuanVideo15Transformer3DModel

    model = HunyuanVideo15Transformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=32, text_embed_2_dim=16,
        image_embed_dim=16, rope_axes_dim=(4, 6, 6), target_size=H, task_type="t2v",
    ).eval()
    # in_channels=4: the pipeline concatenates [noise | condition | mask] along channels before each call (65 in
    # the released config); the shared DDIM loop steps the model's input, so here the input is the latent alone
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, 8, 8), timestep=_t(500.0, torch.float32),
                  encoder_hidden_states=torch.randn(B, L, 32), encoder_attention_mask=torch.ones(B, L),
                  encoder_hidden_states_2=torch.randn(B, 4, 16), encoder_attention_mask_2=torch.ones(B, 4),
                  image_embeds=torch.zeros(B, 4, 16))
    return model, kwargs


def hunyuan_framepack(frames=4):
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    model = HunyuanVideoFramepackTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
        text_embed_dim=32, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
        image_condition_type=None, has_image_proj=True, image_proj_dim=16, has_clean_x_embedder=True,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), timestep=_t(),
                  encoder_hidden_states=torch.randn(B, L, 32), encoder_attention_mask=torch.ones(B, L),
                  pooled_projections=torch.randn(B, 16), image_embeds=torch.randn(B, 4, 16),
                  indices_latents=torch.arange(frames), guidance=torch.full((B,), 6000.0),
                  # the clean context frames the pipeline always passes (1 clean, 2 at 2x, 4 at 4x downsampling)
                  latents_clean=torch.randn(B, 4, 1, H, W), indices_latents_clean=torch.arange(frames, frames + 1),
                  latents_history_2x=torch.randn(B, 4, 2, H, W),
                  indices_latents_history_2x=torch.arange(frames + 1, frames + 3),
                  latents_history_4x=torch.randn(B, 4, 4, H, W),
                  indices_latents_history_4x=torch.arange(frames + 3, frames + 7))
    return model, kwargs


# ---------------------------------------------------------------------------------------------------- image
def auraflow():
    from diffusers import AuraFlowTransformer2DModel

    model = AuraFlowTransformer2DModel(
        sample_size=H, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
        out_channels=4, pos_embed_max_size=64,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, H, W), encoder_hidden_states=torch.randn(B, L, 32),
                  timestep=_t(0.5, torch.float32))
    return model, kwargs


def _flux_like(cls, text_ids_axes=3, batched_ids=False, init=(), **extra):
    import diffusers

    model = getattr(diffusers, cls)(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, **dict(init),
    ).eval()
    h = w = 8
    kwargs = dict(hidden_states=torch.randn(B, h * w, 16), encoder_hidden_states=torch.randn(B, L, 32),
                  timestep=_t(0.5, torch.float32),
                  img_ids=_ids(1, h, w, text_ids_axes, B if batched_ids else None),
                  txt_ids=torch.zeros((B, L, text_ids_axes) if batched_ids else (L, text_ids_axes)), **extra)
    return model, kwargs


def bria():
    return _flux_like("BriaTransformer2DModel", init={"axes_dims_rope": [4, 6, 6]}.items())


def bria_fibo():
    model, kwargs = _flux_like("BriaFiboTransformer2DModel",
                               init={"axes_dims_rope": [4, 6, 6], "text_encoder_dim": 16}.items())
    kwargs["text_encoder_layers"] = [torch.randn(B, L, 16) for _ in range(3)]
    return model, kwargs


def bria_fibo2():
    """Z-Image-style single stream [gist | image]: a Perceiver squeezes the first text bundle into gist tokens (as
    many as the prompt length maps to), a noise refiner runs on the image tokens first, and an injection block
    cross-attends to its own bundle. The pipeline runs the negative prompt as a second call of batch 1, and its
    `encode_prompt` drops the mask when nothing is padded (always, for one prompt per call): no mask, so the gist
    goes first; the batch of 2 here is two prompts of one length. Text-to-image: no `context_latents` (they are
    the latents of images to edit)."""
    from diffusers import BriaFibo2Transformer2DModel
    from coverage_cases_b import _unzero

    torch.manual_seed(0)
    # the injection block's cross-attention gate starts at zero: random, so the bundle it reads matters
    model = _unzero(BriaFibo2Transformer2DModel(
        in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
        injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=4, max_num_gist_tokens=8,
        gist_step=4, gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(16, 16, 16),
    ).eval())
    # the noise level in [0, 1] (the pipeline passes t / 1000); bundles [B, 1 + injection blocks, L, cap_feat_dim]
    kwargs = dict(hidden_states=torch.randn(B, 4, H, W), timestep=_t(0.5, torch.float32),
                  encoder_hidden_states=torch.randn(B, 2, L, 16), encoder_attention_mask=None,
                  context_latents=None)
    return model, kwargs


def chroma():
    model, kwargs = _flux_like("ChromaTransformer2DModel", init=dict(
        axes_dims_rope=(4, 6, 6), approximator_num_channels=8, approximator_hidden_dim=32,
        approximator_layers=1).items())
    kwargs["attention_mask"] = torch.ones(B, L + 64, dtype=torch.bool)
    return model, kwargs


def flux():
    from pipefusion_compile.models import flux as build

    return build(height=8, width=8, num_layers=1, num_single_layers=2, batch=B, prompt_tokens=L)


def flux2():
    return _flux_like("Flux2Transformer2DModel", text_ids_axes=4, batched_ids=True, init=dict(
        timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False, mlp_ratio=2.0).items())


def flux3():
    import diffusers

    model = diffusers.Flux3Transformer2DModel(
        in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_channels=16, mlp_ratio=2.0,
        axes_dims_rope=(4, 4, 4, 4),
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 64, 16), encoder_hidden_states=torch.randn(B, L, 32),
                  timestep=_t(0.5, torch.float32), img_ids=_ids(1, 8, 8, 4), txt_ids=torch.zeros(L, 4))
    return model, kwargs


def _cogview_kwargs(extra=()):
    return dict(hidden_states=torch.randn(B, 4, H, W), encoder_hidden_states=torch.randn(B, L, 32), timestep=_t(),
                original_size=torch.tensor([[128.0, 128.0]] * B), target_size=torch.tensor([[128.0, 128.0]] * B),
                crop_coords=torch.zeros(B, 2), **dict(extra))


def cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    model = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2, out_channels=4,
        text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=H,
    ).eval()
    return model, _cogview_kwargs()


def cogview4():
    from diffusers import CogView4Transformer2DModel

    model = CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=32, condition_dim=8, pos_embed_max_size=16, sample_size=H,
        rope_axes_dim=(8, 8),
    ).eval()
    return model, _cogview_kwargs()


def glm_image():
    from diffusers import GlmImageTransformer2DModel

    model = GlmImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=32, time_embed_dim=32, condition_dim=8, prior_vq_quantizer_codebook_size=16,
    ).eval()
    kwargs = _cogview_kwargs()
    del kwargs["original_size"]
    kwargs.update(prior_token_id=torch.randint(0, 16, (B, 64)), prior_token_drop=torch.zeros(B, dtype=torch.bool))
    return model, kwargs


def dit():
    from pipefusion_compile.models import dit as build

    return build(sample_size=H, num_layers=2, batch=B)


def ernie_image():
    from diffusers import ErnieImageTransformer2DModel

    model = ErnieImageTransformer2DModel(
        hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=8, out_channels=8,
        patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6),
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 8, 8, 8), timestep=_t(500.0, torch.float32),
                  text_bth=torch.randn(B, L, 16), text_lens=torch.full((B,), L, dtype=torch.int64))
    return model, kwargs


def hidream_image():
    """T5 states and a stack of per-layer Llama states ([layers, B, L, D]; block i reads `llama_layers[i]`), MoE
    feed-forwards; the pipeline calls it with `timesteps` and steps with the negated output."""
    from diffusers import HiDreamImageTransformer2DModel

    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, caption_channels=[12, 16], text_emb_dim=16, num_routed_experts=2,
        num_activated_experts=1, axes_dims_rope=(4, 6, 6), max_resolution=(H, W), llama_layers=[0, 1],
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, H, W), timesteps=_t(500.0, torch.float32),
                  encoder_hidden_states_t5=torch.randn(B, L, 12), encoder_hidden_states_llama3=torch.randn(2, B, L, 16),
                  pooled_embeds=torch.randn(B, 16), attention_kwargs=None)
    return model, kwargs


def hunyuan_dit():
    from pipefusion_compile.models import hunyuan_dit as build

    return build(sample_size=H, num_layers=4, batch=B)


def hunyuan_image():
    from diffusers import HunyuanImageTransformer2DModel

    model = HunyuanImageTransformer2DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=(1, 1), text_embed_dim=32,
        rope_axes_dim=(8, 8),
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 16, 8, 8), timestep=_t(500.0, torch.float32),
                  encoder_hidden_states=torch.randn(B, L, 32),
                  encoder_attention_mask=torch.ones(B, L))
    return model, kwargs


class ModelTime(torch.nn.Module):
    """Ideogram 4's pipeline passes the model time `1 - t / num_train_timesteps` (in [0, 1], 0 is noise) where the
    shared DDIM loop (tests/helpers.py) passes the scheduler's t: this maps it, as the pipeline does, and nothing
    else."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, hidden_states, timestep, **kwargs):
        return self.model(hidden_states, timestep=1.0 - timestep.float() / 1000, **kwargs)


_IDEOGRAM_TEXT = 8  # max_sequence_length: the text slots before the image tokens


def ideogram4():
    """What Ideogram4Pipeline passes to its (conditional) transformer on each call: one packed sequence
    [left padding | prompt | image tokens] per sample, max_sequence_length text slots then the 8 x 8 patchified
    latents; `hidden_states` is `cat([zeros for the text slots, latents])`, `encoder_hidden_states` the text
    features (zero at the padding) followed by zeros for the image tokens, and position_ids / segment_ids /
    indicator built by the pipeline's own `_prepare_ids` for two prompts of different lengths (so their padding
    differs). The asymmetric CFG runs a second, unconditional transformer on the image tokens alone: another
    model, not this call."""
    from diffusers import Ideogram4Transformer2DModel
    from diffusers.pipelines.ideogram4.pipeline_ideogram4 import Ideogram4Pipeline

    model = Ideogram4Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=64,
        adaln_dim=16, llm_features_dim=24, mrope_section=(4, 2, 2),
    ).eval()
    text, (h, w), lengths = _IDEOGRAM_TEXT, (8, 8), [6, 4]
    position_ids, segment_ids, indicator = Ideogram4Pipeline._prepare_ids(lengths, h, w, text, torch.device("cpu"))
    features = torch.randn(B, text, 24)
    for b, n in enumerate(lengths):
        features[b, :text - n] = 0  # the left padding, zeroed by the tokenizer's attention mask
    kwargs = dict(hidden_states=torch.cat([torch.zeros(B, text, 16), torch.randn(B, h * w, 16)], dim=1),
                  timestep=_t(500.0, torch.float32),
                  encoder_hidden_states=torch.cat([features, torch.zeros(B, h * w, 24)], dim=1),
                  position_ids=position_ids, segment_ids=segment_ids, indicator=indicator, attention_kwargs=None)
    return ModelTime(model).eval(), kwargs


# the pipeline keeps its latents apart and packs `cat([zeros, latents])` before each call, then steps with
# -output[:, text:]: here the scheduler steps the whole packed sequence and the text slots are zeroed again
# before every call, so each call gets what the pipeline's would
IDEOGRAM4_FEED = Feed(model_input=lambda x, built: torch.cat([built[:, :_IDEOGRAM_TEXT], x[:, _IDEOGRAM_TEXT:]], 1),
                      prediction=lambda out, x: -out)


def joyimage_edit(frames=1):
    from diffusers import JoyImageEditTransformer3DModel

    model = JoyImageEditTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
        mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6],
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, 4, frames, H, W), timestep=_t(500.0, torch.float32),
                  encoder_hidden_states=torch.randn(B, L, 16))
    return model, kwargs


# the target and two reference images of the edit-plus pipeline, in latent (t, h, w) before the patchify
_JOY_ITEMS = ((1, H, W), (1, 12, W), (1, 8, 8))
_JOY_TARGET = (H // 2) * (W // 2)                                      # the target's patches come first
_JOY_PATCHES = sum(t * (h // 2) * (w // 2) for t, h, w in _JOY_ITEMS)  # 64 + 48 + 16


def joyimage_edit_plus():
    """What JoyImageEditPlusPipeline passes on each call: every item (the target noise, then the VAE latents of
    the reference images) patchified by the pipeline and concatenated into one patch sequence
    [B, patches, C, pt, ph, pw] (all samples of a CFG batch the same length, so no padding), the per-sample
    (t, h, w) of every item in patches (`shape_list`, repeated for the CFG batch), the text states
    [negative, positive] padded with zeros to one length and their mask (the negative prompt is the shorter).
    The pipeline steps the whole sequence and writes the clean references back before every call (`feed`)."""
    from diffusers import JoyImageEditPlusTransformer3DModel

    model = JoyImageEditPlusTransformer3DModel(
        patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
        mlp_width_ratio=2.0, num_layers=2, rope_dim_list=[4, 6, 6],
    ).eval()
    pt, ph, pw = 1, 2, 2
    patches, shapes = [], []
    for t, h, w in _JOY_ITEMS:  # prepare_latents' patchify of one item [C, t, h, w]
        item = torch.randn(4, t, h, w)
        patches.append(item.reshape(4, t // pt, pt, h // ph, ph, w // pw, pw).permute(1, 3, 5, 0, 2, 4, 6)
                       .reshape(-1, 4, pt, ph, pw))
        shapes.append((t // pt, h // ph, w // pw))
    sample = torch.cat(patches)
    text = torch.randn(B, L, 16)
    mask = torch.ones(B, L, dtype=torch.int64)
    text[0, L - 2:] = 0  # _pad_sequence of the shorter negative prompt
    mask[0, L - 2:] = 0
    kwargs = dict(hidden_states=torch.stack([sample] * B), timestep=_t(500.0, torch.float32),
                  encoder_hidden_states=text, encoder_hidden_states_mask=mask, shape_list=[shapes] * B)
    return model, kwargs


def _joy_references(latents, built):
    """`latents[~target_mask] = clean_reference_backup[~target_mask]`: the target patches stepped, the
    references as encoded."""
    return torch.cat([latents[:, :_JOY_TARGET], built[:, _JOY_TARGET:]], dim=1)


def kandinsky5(frames=4):
    """Latents [B, F, H, W, C] (channels last); RoPE positions per axis as the pipeline builds them."""
    from diffusers import Kandinsky5Transformer3DModel

    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=32, out_visual_dim=4, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=False,
    ).eval()
    kwargs = dict(hidden_states=torch.randn(B, frames, H, W, 4), encoder_hidden_states=torch.randn(B, L, 16),
                  pooled_projections=torch.randn(B, 8), timestep=_t(500.0, torch.float32),
                  visual_rope_pos=[torch.arange(frames), torch.arange(H // 2), torch.arange(W // 2)],
                  text_rope_pos=torch.arange(L), scale_factor=(1.0, 1.0, 1.0))
    return TupleOutput(model).eval(), kwargs


def _kandinsky6_audio(frames):
    """The pipeline's audio latent length for `frames` latent frames (24 fps, 44.1 kHz, hop 1024)."""
    import math

    return math.ceil(((frames - 1) * 4 + 1) / 24.0 * 44_100 / 1024)


def kandinsky6(frames=4):
    """What Kandinsky6TI2VAPipeline passes for text-to-video-and-audio (its default, sample_audio=True): the video
    latents [B, F, H, W, C] with the conditioning channels of visual_cond (an unused conditioning latent and a
    mask, both zero without a reference image) concatenated last, the audio latents [B, A, C_a] of the length the
    pipeline derives from the frames (24 fps, 44.1 kHz, hop 1024), the Qwen states padded to max_length with
    their bool mask, the CLIP pooled state. The flags the released checkpoints set (text_token_padding, ca_rope,
    cross_gates, fix_modulation) are on. The pipeline runs CFG as two calls and steps both outputs; the shared
    loop steps the video (the model's first output), and the audio latents stay as built."""
    from diffusers import Kandinsky6Transformer3DModel

    model = Kandinsky6Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=32, patch_size=(1, 2, 2),
        model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
        in_audio_dim=8, out_audio_dim=8, text_token_padding=True, ca_rope=True, cross_gates=True,
        fix_modulation=True,
    ).eval()
    latents = torch.randn(B, frames, H, W, 4)
    cond = torch.cat([torch.zeros_like(latents), torch.zeros(B, frames, H, W, 1)], dim=-1)
    audio = _kandinsky6_audio(frames)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[:, L - 2:] = False  # padding="max_length"
    kwargs = dict(hidden_states=torch.cat([latents, cond], dim=-1), audio_hidden_states=torch.randn(B, audio, 8),
                  encoder_hidden_states=torch.randn(B, L, 16), pooled_projections=torch.randn(B, 8),
                  timestep=_t(500.0, torch.float32), encoder_attention_mask=mask)
    return model, kwargs


# Kandinsky 6's latents are channels last: the pipeline concatenates [latent | conditioning latent | mask] on -1
KANDINSKY6_FEED = Feed(latents=lambda built: built[..., :4],
                       model_input=lambda x, built: torch.cat([x, built[..., 4:]], dim=-1))


def _video(name, fn, frames=4, short=2, **case):
    """A video class at `frames` latent frames, and a second case `name[<short>f]` at `short` frames."""
    layout = case.pop("layout", None)
    stream = case.pop("stream_tokens", 0)  # or a function of the frames (an audio stream as long as the video)
    out = []
    for f, suffix in ((frames, ""), (short, f"[{short}f]")):
        out.append(Case(name + suffix, lambda f=f: fn(f), layout=layout(f) if callable(layout) else layout,
                        stream_tokens=stream(f) if callable(stream) else stream, **case))
    return out


def _frames_layout(tokens_per_frame, out_axis=2, p=2, patches=4):
    """Bands of whole frames, or, with fewer frames than the table's `patches`, bands of the rows of every frame
    (the backend's choice there): H / p rows of W / p tokens, on the output axis after the frames."""
    rows = H // p
    return lambda f: (ImageLayout(f, tokens_per_frame, out_axis, 1) if f >= patches
                      else ImageLayout(rows, tokens_per_frame // rows, out_axis + 1, p, frames=f))


CASES: list[Case] = [
    Case("AceStepTransformer1DModel", ace_step, layout=ImageLayout(16, 1, 1, 2)),
    *_video("AllegroTransformer3DModel", allegro, layout=_frames_layout(64)),
    Case("AnyFlowFARTransformer3DModel", None, skip=(
        "not a whole-latent denoiser call: autoregressive frame chunks, each call conditioned on a K/V cache "
        "of earlier chunks that the pipeline threads through (kv_cache, kv_cache_flag, flex-attention BlockMask)")),
    *_video("AnyFlowTransformer3DModel", anyflow, layout=lambda f: ImageLayout(f, 64, 1, 1),
            options=(("token_axis", 1),)),
    # joint attention [text | image]; the text is the 8 learned register tokens followed by the prompt
    Case("AuraFlowTransformer2DModel", auraflow, text_tokens=8 + L, text_first=True),
    # [gist | image]: 8 gist tokens for a 6-token prompt (min 4, max 8 in steps of 4 over text lengths 4..16)
    Case("BriaFibo2Transformer2DModel", bria_fibo2, text_tokens=8, text_first=True),
    Case("BriaFiboTransformer2DModel", bria_fibo, text_tokens=L, text_first=True),
    Case("BriaTransformer2DModel", bria, text_tokens=L, text_first=True),
    Case("ChromaTransformer2DModel", chroma, text_tokens=L, text_first=True),
    *_video("ChronoEditTransformer3DModel", chronoedit),
    *_video("CogVideoXTransformer3DModel", cogvideox, text_tokens=L, text_first=True, layout=_cog_layout,
            options=(("token_axis", 1),)),
    Case("CogView3PlusTransformer2DModel", cogview3plus, text_tokens=L, text_first=True),
    Case("CogView4Transformer2DModel", cogview4, text_tokens=L, text_first=True),
    *_video("ConsisIDTransformer3DModel", consisid, text_tokens=L, text_first=True, layout=_cog_layout,
            options=(("token_axis", 1),)),
    Case("Cosmos3OmniTransformer", None, skip=(
        "builder not written yet: a unified multimodal LLM forward (token ids, per-modality sequence indexes and "
        "token lists), not a latent-in/latent-out call")),
    *_video("CosmosTransformer3DModel", cosmos),
    Case("DiTTransformer2DModel", dit),
    Case("DreamLiteTransformer2DModel", None, skip=(
        "not a denoiser on its own: a transformer block inside the DreamLite UNet (unet_dreamlite.py)")),
    Case("DualTransformer2DModel", None, skip="not a denoiser: two Transformer2DModel blocks mixed over two "
                                              "prompts, used inside the Versatile Diffusion UNet"),
    *_video("EasyAnimateTransformer3DModel", easyanimate, text_tokens=L, text_first=True, layout=_frames_layout(64)),
    Case("ErnieImageTransformer2DModel", ernie_image),
    Case("Flux2Transformer2DModel", flux2, text_tokens=L, text_first=True),
    Case("Flux3Transformer2DModel", flux3, text_tokens=L, text_first=True),
    Case("FluxTransformer2DModel", flux, text_tokens=L, text_first=True),
    Case("GlmImageTransformer2DModel", glm_image, text_tokens=L, text_first=True),
    *_video("HeliosTransformer3DModel", helios),
    # joint attention over [image | T5 + Llama + this block's Llama states]
    Case("HiDreamImageTransformer2DModel", hidream_image, text_tokens=3 * L,
         feed=Feed(timestep_arg="timesteps", prediction=lambda out, x: -out)),
    Case("HunyuanDiT2DModel", hunyuan_dit),
    # patch_size is a tuple (1, 1), which ImageLayout.of does not read: 8 rows of 8 tokens, 1 output row each
    Case("HunyuanImageTransformer2DModel", hunyuan_image, text_tokens=L, layout=ImageLayout(8, 8, 2, 1)),
    *_video("HunyuanVideo15Transformer3DModel", hunyuan_video15, text_tokens=L, layout=_frames_layout(64)),
    # the prompt's attention mask is built from `int(mask.sum())` per sample: one graph with unbacked sizes, whose
    # joint sequence is [clean + 2x + 4x history latents (64 + 16 + 4) | image | image embeds + prompt (4 + L)]
    *_video("HunyuanVideoFramepackTransformer3DModel", hunyuan_framepack, text_tokens=84, text_first=True,
            after_tokens=4 + L, layout=_frames_layout(64), dynamo_config=UNBACKED_SIZES),
    # the Hunyuan video classes take an int patch_size, which ImageLayout.of does not read: frames of 8 x 8 tokens
    *_video("HunyuanVideoTransformer3DModel", hunyuan_video, text_tokens=L, layout=_frames_layout(64)),
    # the packed [text slots | image] sequence is the latent argument: one token a row, text slots included
    Case("Ideogram4Transformer2DModel", ideogram4, layout=ImageLayout(_IDEOGRAM_TEXT + 64, 1, 1, 1),
         feed=IDEOGRAM4_FEED),
    # joint attention [image | text]; the "image" is the whole patch sequence (target, then the references), one
    # patch a row
    Case("JoyImageEditPlusTransformer3DModel", joyimage_edit_plus, text_tokens=L,
         layout=ImageLayout(_JOY_PATCHES, 1, 1, 1), feed=Feed(model_input=_joy_references)),
    Case("JoyImageEditTransformer3DModel", joyimage_edit, text_tokens=L),
    *_video("Kandinsky5Transformer3DModel", kandinsky5, layout=_frames_layout(64, out_axis=1)),
    Case("Kandinsky6SRTransformer3DModel", None, skip=(
        "builder not written yet: super-resolution model with tiled NABLA sparse attention")),
    # the audio stream (its own tensor) attends over the video and the video over it
    *_video("Kandinsky6Transformer3DModel", kandinsky6, layout=_frames_layout(64, out_axis=1), feed=KANDINSKY6_FEED,
            stream_tokens=_kandinsky6_audio),
]
