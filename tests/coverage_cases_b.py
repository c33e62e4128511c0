"""Tiny builders for the diffusers transformer classes whose names start with L..Z (see `coverage_cases.Case`).

Each builder seeds, builds the class from a tiny config with random weights (fp32, eval) and returns the forward
kwargs as the class's diffusers pipeline passes them: CFG as a batch of 2, random prompt embeddings of the width
the text projection reads (no text encoder), masks, rotary ids and guidance as the pipeline makes them. Image
latents have >= 8 token rows (per frame); videos have 2-4 frames (and a second case with 1-2 frames, `[2f]`).
"""
from __future__ import annotations

import functools

import torch

from coverage_cases import Case
from helpers import Feed, channel_conditioned
from reference_pipefusion import ImageLayout

B = 2  # CFG batch
L = 6  # prompt tokens


def _g(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_g(seed))


def _mask(tokens: int = L, valid: tuple[int, ...] = (L, L - 2), dtype=torch.long) -> torch.Tensor:
    """A prompt mask per batch element: the first `valid[i]` tokens are real, the rest padding."""
    m = torch.zeros(len(valid), tokens, dtype=dtype)
    for i, n in enumerate(valid):
        m[i, :n] = 1
    return m


def _t(value: float = 500.0, dtype=torch.float32) -> torch.Tensor:
    return torch.full((B,), value, dtype=dtype)


def _build(cls_name: str, config: dict):
    import diffusers.models.transformers as t

    torch.manual_seed(0)
    return getattr(t, cls_name)(**config).eval()


def _video_layout(frames: int, height: int, width: int, ph: int = 2, pw: int = 2) -> ImageLayout:
    """Packed or 5-D video whose tokens run (frame, row, column): bands of whole frames."""
    return ImageLayout(frames, (height // ph) * (width // pw), 2, 1)


# ----------------------------------------------------------------------------------------------- image, 2-D latents
def pixart():
    model = _build("PixArtTransformer2DModel", dict(
        sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
        cross_attention_dim=16, caption_channels=12, patch_size=2, norm_type="ada_norm_single",
        num_embeds_ada_norm=1000))
    return model, dict(hidden_states=_randn(B, 4, 16, 16), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       encoder_attention_mask=_mask(), timestep=_t(), added_cond_kwargs={"resolution": None,
                                                                                         "aspect_ratio": None})


def sd3():
    model = _build("SD3Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16))
    return model, dict(hidden_states=_randn(B, 4, 16, 16), encoder_hidden_states=_randn(B, L, 32, seed=2),
                       pooled_projections=_randn(B, 16, seed=3), timestep=_t())


def transformer_2d():
    """The legacy patched Transformer2DModel (DiT-style: ada_norm_zero, class labels)."""
    model = _build("Transformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, sample_size=16,
        patch_size=2, norm_type="ada_norm_zero", num_embeds_ada_norm=1000, activation_fn="gelu-approximate",
        norm_elementwise_affine=False))
    return model, dict(hidden_states=_randn(B, 4, 16, 16), timestep=_t(500, torch.long),
                       class_labels=torch.tensor([1, 1000]))


def sana():
    model = _build("SanaTransformer2DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=16, patch_size=1))
    return model, dict(hidden_states=_randn(B, 4, 16, 16), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       encoder_attention_mask=_mask(), timestep=_t())


def _unzero(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Give the parameters a model initialises to zero (adaLN-Zero modulation) random values: at zero every
    block is the identity, attention does not matter, and stale K/V could not change the result."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def prx():
    model = _unzero(_build("PRXTransformer2DModel", dict(
        in_channels=4, patch_size=2, context_in_dim=12, hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2,
        axes_dim=[8, 8])))
    return model, dict(hidden_states=_randn(B, 4, 16, 16), timestep=_t(0.5), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       attention_mask=_mask(dtype=torch.bool))


def lumina2():
    model = _build("Lumina2Transformer2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=1,
        num_attention_heads=2, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32),
        cap_feat_dim=12))
    return model, dict(hidden_states=_randn(B, 4, 16, 16), timestep=_t(0.5),
                       encoder_hidden_states=_randn(B, L, 12, seed=2), encoder_attention_mask=_mask(valid=(L, L)))


def lumina_next():
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    model = _build("LuminaNextDiT2DModel", dict(
        sample_size=16, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=2,
        num_kv_heads=2, multiple_of=16, cross_attention_dim=12, learn_sigma=True))
    rotary = get_2d_rotary_pos_embed_lumina(model.head_dim, 384, 384, linear_factor=1.0, ntk_factor=1.0)
    return model, dict(hidden_states=_randn(B, 4, 16, 16), timestep=_t(0.5),
                       encoder_hidden_states=_randn(B, L, 12, seed=2), encoder_mask=_mask(),
                       image_rotary_emb=rotary, cross_attention_kwargs={})


def omnigen():
    model = _build("OmniGenTransformer2DModel", dict(
        in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=64, num_layers=2, pad_token_id=0, vocab_size=64, max_position_embeddings=512,
        original_max_position_embeddings=512, pos_embed_max_size=16, time_step_dim=16,
        rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.0] * 8}))
    # the processor's layout for a text-only prompt: [text tokens | time token | image tokens], causal over the text
    image_tokens = 8 * 8
    total = L + 1 + image_tokens
    mask = torch.tril(torch.ones(total, total))
    mask[:, L:] = 0
    mask[L:, L:] = 1
    return model, dict(hidden_states=_randn(B, 4, 16, 16), timestep=_t(0.5),
                       input_ids=torch.randint(1, 64, (B, L), generator=_g(2)), input_img_latents=[],
                       input_image_sizes={}, attention_mask=mask.expand(B, total, total).clone(),
                       position_ids=torch.arange(total).expand(B, total).clone())


def _packed_ids(h: int, w: int) -> torch.Tensor:
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def ovis_image():
    model = _build("OvisImageTransformer2DModel", dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))
    return model, dict(hidden_states=_randn(B, 64, 16), timestep=_t(0.5), encoder_hidden_states=_randn(B, L, 32, seed=2),
                       txt_ids=torch.zeros(L, 3), img_ids=_packed_ids(8, 8), joint_attention_kwargs=None)


def longcat_image():
    model = _build("LongCatImageTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]))
    txt_ids = torch.zeros(L, 3)
    txt_ids[:, 1] = txt_ids[:, 2] = torch.arange(L)
    img_ids = _packed_ids(8, 8)
    img_ids[:, 0] = 1
    img_ids[:, 1:] += L
    return model, dict(hidden_states=_randn(B, 64, 16), timestep=_t(0.5), guidance=None,
                       encoder_hidden_states=_randn(B, L, 32, seed=2), txt_ids=txt_ids, img_ids=img_ids)


def qwen_image():
    model = _build("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))
    return model, dict(hidden_states=_randn(B, 64, 16), timestep=_t(0.5), guidance=None,
                       encoder_hidden_states_mask=_mask(valid=(L, L)), encoder_hidden_states=_randn(B, L, 32, seed=2),
                       img_shapes=[[(1, 8, 8)]] * B, attention_kwargs=None)


def qwen_image21():
    model = _build("QwenImage21Transformer2DModel", dict(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=32, mlp_ratio=2, axes_dims_rope=(4, 6, 6)))
    # the vision-language sequence: the prompt, then one slot per 2x2 latent tokens of the target image
    img_mask = torch.zeros(B, L + 16, dtype=torch.bool)
    img_mask[:, L:] = True
    return model, dict(hidden_states=_randn(B, 64, 16), timestep=_t(0.5), encoder_hidden_states=_randn(B, L, 32, seed=2),
                       encoder_hidden_states_mask=_mask(valid=(L, L)), img_shapes=[[(1, 8, 8)]] * B,
                       img_mask=img_mask, attention_kwargs=None, kv_cache=None,
                       kv_cache_mode=None)


def nucleus_moe():
    model = _build("NucleusMoEImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6), mlp_ratio=2.0, num_experts=4, moe_intermediate_dim=16,
        dense_moe_strategy="leave_first_three_and_last_block_dense"))
    return model, dict(hidden_states=_randn(B, 64, 16), timestep=_t(0.5), encoder_hidden_states=_randn(B, L, 32, seed=2),
                       encoder_hidden_states_mask=_mask(valid=(L, L)), img_shapes=[(1, 8, 8)] * B,
                       attention_kwargs=None)


def z_image():
    model = _build("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, cap_feat_dim=12, axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]))
    x = _randn(B, 4, 1, 16, 16)
    cap = _randn(B, L, 12, seed=2)
    return model, dict(x=list(x.unbind(0)), t=_t(0.5), cap_feats=list(cap.unbind(0)), joint_attention_kwargs=None)


# ----------------------------------------------------------------------------------------------- video
def wan(frames: int = 4, cls: str = "WanTransformer3DModel", **extra):
    model = _build(cls, dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, **extra))
    return model, dict(hidden_states=_randn(B, 4, frames, 16, 16), timestep=_t(500, torch.long),
                       encoder_hidden_states=_randn(B, L, 16, seed=2), attention_kwargs=None)


def skyreels(frames: int = 4):
    return wan(frames, "SkyReelsV2Transformer3DModel")


def wan_vace(frames: int = 4):
    model, kw = wan(frames, "WanVACETransformer3DModel", vace_layers=[0, 1], vace_in_channels=8)
    kw.update(control_hidden_states=_randn(B, 8, frames, 16, 16, seed=3),
              control_hidden_states_scale=torch.ones(2))
    return model, kw


def wan_animate(frames: int = 4):
    model = _build("WanAnimateTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=12, latent_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, image_dim=16, rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16, "32": 16, "64": 16, "128": 16, "256": 16,
                                      "512": 16},
        motion_encoder_size=16, motion_style_dim=16, motion_dim=4, motion_encoder_dim=16,
        face_encoder_hidden_dim=32, face_encoder_num_heads=2, inject_face_latents_blocks=1,
        motion_encoder_batch_size=4))
    # the pipeline: latents + reference/mask conditioning on channels, one more (reference) latent frame,
    # pose latents for the generated frames, face crops (one per pixel frame: 4 per latent frame after the first)
    pixel_frames = (frames - 1) * 4 + 1
    return model, dict(hidden_states=_randn(B, 12, frames + 1, 16, 16), timestep=_t(500, torch.long),
                       encoder_hidden_states=_randn(B, L, 16, seed=2),
                       encoder_hidden_states_image=_randn(B, 5, 16, seed=3),
                       pose_hidden_states=_randn(B, 4, frames, 16, 16, seed=4),
                       face_pixel_values=_randn(B, 3, pixel_frames, 16, 16, seed=5), motion_encode_batch_size=None,
                       attention_kwargs=None)


def sana_video(frames: int = 4):
    model = _build("SanaVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=12,
        sample_size=16, patch_size=(1, 2, 2), rope_max_seq_len=64))
    return model, dict(hidden_states=_randn(B, 4, frames, 16, 16), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       encoder_attention_mask=_mask(), timestep=_t(), attention_kwargs=None)


def ltx(frames: int = 2):
    model = _build("LTXVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=12))
    return model, dict(hidden_states=_randn(B, frames * 8 * 8, 4), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       timestep=_t(), encoder_attention_mask=_mask(), num_frames=frames, height=8, width=8,
                       rope_interpolation_scale=(8 / 25, 32, 32), attention_kwargs=None)


_LTX2_AUDIO_FRAMES = 8


def ltx2(frames: int = 2):
    model = _build("LTX2VideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16, pos_embed_max_pos=20))
    audio_frames = _LTX2_AUDIO_FRAMES
    return model, dict(hidden_states=_randn(B, frames * 8 * 8, 4), audio_hidden_states=_randn(B, audio_frames, 4, seed=3),
                       encoder_hidden_states=_randn(B, L, 16, seed=2), audio_encoder_hidden_states=_randn(B, L, 16, seed=4),
                       timestep=_t(), sigma=_t(), encoder_attention_mask=_mask(), audio_encoder_attention_mask=_mask(),
                       num_frames=frames, height=8, width=8, fps=24.0, audio_num_frames=audio_frames,
                       video_coords=None, audio_coords=None, isolate_modalities=False,
                       spatio_temporal_guidance_blocks=None, perturbation_mask=None, use_cross_timestep=False,
                       attention_kwargs=None)


def latte(frames: int = 4):
    model = _build("LatteTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=16, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=12, video_length=frames))
    return model, dict(hidden_states=_randn(B, 4, frames, 16, 16), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       timestep=_t(500, torch.long), enable_temporal_attentions=True)


def mochi(frames: int = 4):
    model = _build("MochiTransformer3DModel", dict(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=4, max_sequence_length=L))
    return model, dict(hidden_states=_randn(B, 4, frames, 16, 16), encoder_hidden_states=_randn(B, L, 16, seed=2),
                       timestep=_t(), encoder_attention_mask=_mask(valid=(L, L)), attention_kwargs=None)


def motif_video(frames: int = 4):
    model = _build("MotifVideoTransformer3DModel", dict(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=16,
        rope_axes_dim=(4, 6, 6)))
    return model, dict(hidden_states=_randn(B, 9, frames, 16, 16), timestep=_t(),
                       encoder_hidden_states=_randn(B, L, 16, seed=2), encoder_attention_mask=_mask(valid=(L, L)),
                       attention_kwargs=None)


# ----------------------------------------------------------------------------------------------- audio
def stable_audio():
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    model = _build("StableAudioDiTModel", dict(
        sample_size=16, in_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=16, time_proj_dim=16,
        global_states_input_dim=16, cross_attention_input_dim=12))
    # the pipeline: rotary over the latent frames plus the one prepended global token, half the head dim
    rotary = get_1d_rotary_pos_embed(16 // 2, 16 + 1, use_real=True, repeat_interleave_real=False)
    return model, dict(hidden_states=_randn(B, 4, 16), timestep=_t(0.5), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       global_hidden_states=_randn(B, 1, 16, seed=3), rotary_embedding=rotary)


def stable_audio3():
    model = _build("StableAudio3DiTModel", dict(
        io_channels=4, patch_size=1, embed_dim=32, depth=2, num_heads=2, cond_token_dim=12, global_cond_dim=16,
        local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2.0, num_memory_tokens=4))
    return model, dict(hidden_states=_randn(B, 4, 16), timestep=_t(0.5), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       global_hidden_states=_randn(B, 16, seed=3), encoder_attention_mask=_mask())


def longcat_audio():
    model = _build("LongCatAudioDiTTransformer", dict(
        dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=12, latent_dim=4, ff_mult=2.0))
    return model, dict(hidden_states=_randn(B, 16, 4), encoder_hidden_states=_randn(B, L, 12, seed=2),
                       encoder_attention_mask=_mask(dtype=torch.bool), timestep=_t(0.5),
                       attention_mask=torch.ones(B, 16, dtype=torch.bool), latent_cond=torch.zeros(B, 16, 4))


def minimax_music3():
    model = _build("MiniMaxMusic3Transformer1DModel", dict(
        in_channels=4, condition_dim=12, num_layers=2, num_attention_heads=2, attention_head_dim=16,
        ff_inner_dim=64, rotary_dim=8, fourier_embedding_dim=16))
    # frame-aligned conditioning: one condition vector per latent frame
    return model, dict(hidden_states=_randn(B, 4, 16), timestep=_t(0.5), encoder_hidden_states=_randn(B, 16, 12, seed=2))


def minimax_h3(frames: int = 2):
    """One packed sequence [text | video | audio]: per-row modality tags, timestep indices and (t, h, w) positions."""
    model = _build("MiniMaxH3Transformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=24, hidden_size=48, num_layers=2, num_refiner_layers=1,
        ffn_dim=64, in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=16,
        time_embed_hidden_dim=32, time_embed_dim=32, rope_freq_dim=4))
    video, audio = frames * 8 * 8, 4
    total = L + video + audio
    tags = torch.cat([torch.ones(L), torch.zeros(video), torch.full((audio,), 2.0)]).long()
    pos = torch.zeros(total, 3, dtype=torch.long)
    pos[:L, 0] = torch.arange(L)
    grid = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(8), torch.arange(8), indexing="ij"), -1)
    pos[L:L + video] = grid.reshape(-1, 3) + torch.tensor([L, 0, 0])
    pos[L + video:, 0] = L + torch.arange(audio)
    return model, dict(hidden_states=_randn(B, video, 16), audio_hidden_states=_randn(B, audio, 4, seed=3),
                       encoder_hidden_states=_randn(B, L, 16, seed=2), timestep=torch.tensor([0.5]),
                       timestep_indices=torch.zeros(total, dtype=torch.long), token_tags=tags, position_ids=pos,
                       video_indices=torch.arange(L, L + video), audio_indices=torch.arange(L + video, total),
                       text_indices=torch.arange(L), attention_kwargs=None)


def sana_wm_refiner(frames: int = 2):
    """Bidirectional (no sliding-window KV cache); per-token timesteps and the model's own video RoPE."""
    model = _build("SanaWMLTX2RefinerTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_cross_attention_dim=16, num_layers=2, caption_channels=16))
    rotary = model.build_rotary_emb_for_absolute_positions(
        batch_size=B, frame_positions=list(range(frames)), height=8, width=8, device=torch.device("cpu"), fps=24.0)
    return model, dict(hidden_states=_randn(B, frames * 8 * 8, 4), encoder_hidden_states=_randn(B, L, 16, seed=2),
                       timestep=torch.full((B, frames * 8 * 8), 500.0), video_rotary_emb=rotary,
                       encoder_attention_mask=_mask(), kv_cache=None, kv_cache_mode=None)


class FirstFrameAnchor(torch.nn.Module):
    """SANA-WM's pipeline passes a per-frame timestep [B, 1, T] with the first latent frame (the encoded input
    image, held clean as the conditioning anchor) at t = 0: `min(t, (1 - condition_mask) * 1000)[:, :1, :, 0, 0]`.
    The shared DDIM loop (tests/helpers.py) passes [B]; this makes the pipeline's timestep from it and nothing else."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def forward(self, hidden_states, timestep, encoder_hidden_states, **kwargs):
        frames = hidden_states.shape[2]
        not_anchor = (torch.arange(frames, device=hidden_states.device) > 0).float() * 1000.0
        timestep = torch.minimum(timestep.float()[:, None, None].expand(-1, 1, frames), not_anchor)
        return self.model(hidden_states, timestep, encoder_hidden_states, **kwargs)


def sana_wm(frames: int = 4):
    """The camera-controlled world model: GDN linear attention over the frames in every block but the last (softmax
    SDPA), each with its UCPE camera branch, a GLUMBConvTemp FFN (3x3 depthwise conv over rows, temporal conv over
    frames), per-frame adaLN. The camera inputs are what the pipeline's `_build_camera_kwargs` makes: a WASD action
    rolled out to (F - 1) * 8 + 1 poses (the LTX-2 VAE's temporal stride 8, spatial 32) and pinhole intrinsics, packed
    by `prepare_camera` into the raymap [B, T, 20] (relative pose + latent intrinsics per latent frame) and the
    chunked Plucker rays [B, 6 * 8, T, H, W]; both repeated over the CFG batch."""
    import numpy as np
    from diffusers.pipelines.sana_wm.cam_utils import action_string_to_c2w, prepare_camera

    # the short convolutions and the Plucker embedder start at zero: random weights so they matter
    model = _unzero(_build("SanaWMTransformer3DModel", dict(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, patch_size=(1, 1, 1), softmax_every_n=2,
        linear_head_dim=16, mlp_ratio=2.0, caption_channels=12, chunk_plucker_channels=6 * 8,
        chunk_plucker_post_attn_blocks=2)))
    h = w = 8
    pixel_frames = (frames - 1) * 8 + 1
    half = (pixel_frames - 1) // 2
    c2w = action_string_to_c2w(f"w-{half},jw-{pixel_frames - 1 - half}")
    intrinsics = np.broadcast_to(np.array([200.0, 200.0, 128.0, 128.0], dtype=np.float32), (pixel_frames, 4)).copy()
    cam = prepare_camera(c2w, intrinsics, target_size=(h * 32, w * 32), vae_stride=(8, 32, 32))
    # the first latent frame is the encoded input image; the pipeline keeps it as it is every step (the feed)
    return FirstFrameAnchor(model).eval(), dict(
        hidden_states=_randn(B, 4, frames, h, w), timestep=_t(), encoder_hidden_states=_randn(B, 1, L, 12, seed=2),
        mask=_mask(), data_info={"img_hw": torch.tensor([[h * 32.0, w * 32.0]])},
        camera_conditions=cam["raymap"].unsqueeze(0).expand(B, -1, -1).clone(),
        chunk_plucker=cam["chunk_plucker"].unsqueeze(0).expand(B, -1, -1, -1, -1).clone())


# ----------------------------------------------------------------------------------------------- how the pipelines feed them
# Motif-Video: cat([latents (4) | first-frame condition (4) | its mask (1)], dim=1) every step
_MOTIF_FEED = channel_conditioned(4)
# Wan-Animate: cat([latents (4) | reference latents and masks (8)], dim=1); the latents have the reference frame too
_WAN_ANIMATE_FEED = channel_conditioned(4)
# QwenImage-2.1 returns its whole joint sequence; the pipeline keeps `noise_pred[:, -latents.size(1):]`
_QWEN21_FEED = Feed(prediction=lambda out, x: out[:, -x.shape[1]:])
# Z-Image: forward(x, t, cap_feats) with a list of per-sample [C, 1, H, W] latents; the pipeline steps
# -stack(outputs).squeeze(2) on [B, C, H, W] latents
_Z_IMAGE_FEED = Feed(latent_arg="x", timestep_arg="t", latents=lambda built: torch.stack(built).squeeze(2),
                     model_input=lambda x, built: list(x.unsqueeze(2).unbind(0)),
                     prediction=lambda out, x: -torch.stack(list(out)).squeeze(2))

# SANA-WM: the first latent frame is the clean image anchor (`where(keep_clean, denoised, latents)` leaves it as it
# is); every call gets the scheduler's latents with that frame in place
_SANA_WM_FEED = Feed(model_input=lambda x, built: torch.cat([built[:, :, :1], x[:, :, 1:]], dim=2))

CASES: list[Case] = [
    # the audio stream (8 tokens in its own tensor) attends over the video and the video over it
    Case("LTX2VideoTransformer3DModel", ltx2, stream_tokens=_LTX2_AUDIO_FRAMES),
    Case("LTX2VideoTransformer3DModel[1f]", functools.partial(ltx2, 1), stream_tokens=_LTX2_AUDIO_FRAMES),
    Case("LTXVideoTransformer3DModel", ltx),
    Case("LTXVideoTransformer3DModel[1f]", functools.partial(ltx, 1)),
    Case("LatteTransformer3DModel", latte, layout=ImageLayout(8, 8, 3, 2)),
    Case("LatteTransformer3DModel[2f]", functools.partial(latte, 2), layout=ImageLayout(8, 8, 3, 2)),
    Case("Lumina2Transformer2DModel", lumina2, text_tokens=L, text_first=True),
    Case("LuminaNextDiT2DModel", lumina_next),
    Case("LongCatAudioDiTTransformer", longcat_audio),
    Case("MiniMaxH3Transformer3DModel", minimax_h3, text_tokens=L, text_first=True),
    Case("MiniMaxH3Transformer3DModel[1f]", functools.partial(minimax_h3, 1), text_tokens=L, text_first=True),
    Case("MiniMaxMusic3Transformer1DModel", minimax_music3, text_tokens=1, text_first=True,
         layout=ImageLayout(16, 1, 2, 1)),
    Case("MochiTransformer3DModel", mochi, text_tokens=L, layout=_video_layout(4, 16, 16)),
    Case("MochiTransformer3DModel[1f]", functools.partial(mochi, 1), text_tokens=L, layout=_video_layout(1, 16, 16)),
    Case("MotifVideoTransformer3DModel", motif_video, text_tokens=L, layout=_video_layout(4, 16, 16),
         feed=_MOTIF_FEED),
    # one latent frame: the backend splits its 8 H rows (of 8 tokens each), so must the reference
    Case("MotifVideoTransformer3DModel[1f]", functools.partial(motif_video, 1), text_tokens=L,
         layout=ImageLayout(8, 8, 3, 2), feed=_MOTIF_FEED),
    Case("NucleusMoEImageTransformer2DModel", nucleus_moe, key_text_tokens=L),
    Case("OmniGenTransformer2DModel", omnigen, text_tokens=L + 1, text_first=True),
    Case("OvisImageTransformer2DModel", ovis_image, text_tokens=L, text_first=True),
    Case("LongCatImageTransformer2DModel", longcat_image, text_tokens=L, text_first=True),
    Case("PRXTransformer2DModel", prx, key_text_tokens=L, text_first=True),
    Case("PixArtTransformer2DModel", pixart),
    Case("QwenImage21Transformer2DModel", qwen_image21, text_tokens=L, text_first=True, feed=_QWEN21_FEED),
    Case("QwenImageTransformer2DModel", qwen_image, text_tokens=L, text_first=True),
    Case("SD3Transformer2DModel", sd3, text_tokens=L),
    Case("SanaTransformer2DModel", sana, reductions=True),
    Case("SanaVideoTransformer3DModel", sana_video, reductions=True),
    Case("SanaVideoTransformer3DModel[2f]", functools.partial(sana_video, 2), reductions=True),
    Case("SkyReelsV2Transformer3DModel", skyreels),
    Case("SkyReelsV2Transformer3DModel[2f]", functools.partial(skyreels, 2)),
    Case("SanaWMLTX2RefinerTransformer3DModel", sana_wm_refiner),
    Case("SanaWMLTX2RefinerTransformer3DModel[1f]", functools.partial(sana_wm_refiner, 1)),
    Case("StableAudio3DiTModel", stable_audio3, text_tokens=4, text_first=True, layout=ImageLayout(16, 1, 2, 1)),
    Case("StableAudioDiTModel", stable_audio, text_tokens=1, text_first=True, layout=ImageLayout(16, 1, 2, 1)),
    Case("Transformer2DModel", transformer_2d),
    # its pose latent is added to frames 1: (a slice of the frame axis), so the frames cannot be the token rows:
    # the backend splits the 8 rows of every one of the 5 frames, and so must the reference
    Case("WanAnimateTransformer3DModel", wan_animate, feed=_WAN_ANIMATE_FEED, layout=ImageLayout(8, 8, 3, 2, 5)),
    Case("WanTransformer3DModel", wan),
    Case("WanTransformer3DModel[2f]", functools.partial(wan, 2)),
    Case("WanVACETransformer3DModel", wan_vace),
    Case("WanVACETransformer3DModel[2f]", functools.partial(wan_vace, 2)),
    # a list latent of per-sample [C, 1, H, W]; its joint sequence is [image | caption], the caption padded to a
    # multiple of 32 tokens (6 -> 32); the prediction is stacked to [B, C, H, W]: rows on axis 2, 2 per token row
    Case("ZImageTransformer2DModel", z_image, feed=_Z_IMAGE_FEED, text_tokens=32, layout=ImageLayout(8, 8, 2, 2)),
    # the GDN scan's state is a matmul contracting each frame's tokens: a reduction over them when the bands are rows
    Case("SanaWMTransformer3DModel", sana_wm, reductions=True, feed=_SANA_WM_FEED),
    Case("SanaWMTransformer3DModel[2f]", functools.partial(sana_wm, 2), reductions=True, feed=_SANA_WM_FEED),
    Case("WanAnimate2Transformer3DModel", None, skip="not built yet: a step needs a WanAnimate2KVCache filled by a "
                                                     "separate reference pass (kv_cache_mode extract, then cached)"),
    Case("PriorTransformer", None, skip="denoises a CLIP image embedding (unCLIP prior), not image/video/audio latents"),
    Case("RFD4ProteinaTransformer", None, skip="denoises protein backbone coordinates, not image/video/audio latents"),
    Case("TransformerTemporalModel", None, skip="a temporal block inside a video UNet (no timestep input), not a "
                                                "denoiser on its own"),
]
