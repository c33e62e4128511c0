"""Tiny built-in configs of real diffusers DiT classes (random weights), for the CLI, tests and benchmarks.

Each entry returns `(model, example_kwargs)`; the model is in eval mode, fp32, on CPU.
"""
from __future__ import annotations

from typing import Callable

import torch


def pixart(sample_size: int = 16, num_layers: int = 4, heads: int = 2, head_dim: int = 8,
           batch: int = 1, prompt_tokens: int = 6, seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=sample_size, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, in_channels=4, out_channels=8, cross_attention_dim=heads * head_dim,
        caption_channels=12, patch_size=2, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
    ).eval()
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, sample_size, sample_size),
        encoder_hidden_states=torch.randn(batch, prompt_tokens, 12),
        timestep=torch.full((batch,), 500, dtype=torch.int64),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )
    return model, kwargs


def dit(sample_size: int = 16, num_layers: int = 4, heads: int = 2, head_dim: int = 8, batch: int = 1,
        seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        sample_size=sample_size, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, in_channels=4, out_channels=8, patch_size=2, num_embeds_ada_norm=10,
    ).eval()
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, sample_size, sample_size),
        timestep=torch.full((batch,), 500, dtype=torch.int64),
        class_labels=torch.arange(batch) % 10,
    )
    return model, kwargs


def ltx_video(frames: int = 2, height: int = 8, width: int = 8, num_layers: int = 4, heads: int = 2,
              head_dim: int = 8, batch: int = 1, prompt_tokens: int = 5, seed: int = 0):
    """LTX-Video takes packed video tokens [B, frames * height * width, C] (frame-major)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(seed)
    model = LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=heads,
        attention_head_dim=head_dim, cross_attention_dim=heads * head_dim, num_layers=num_layers,
        caption_channels=12,
    ).eval()
    kwargs = dict(
        hidden_states=torch.randn(batch, frames * height * width, 4),
        encoder_hidden_states=torch.randn(batch, prompt_tokens, 12),
        timestep=torch.full((batch,), 500, dtype=torch.int64),
        encoder_attention_mask=torch.ones(batch, prompt_tokens),
        num_frames=frames, height=height, width=width,
    )
    return model, kwargs


def hunyuan_dit(sample_size: int = 16, num_layers: int = 6, heads: int = 2, head_dim: int = 16, batch: int = 1,
                seed: int = 0):
    """HunyuanDiT: long skip connections (block i feeds block L-1-i), two text encoders, 2-D RoPE given by
    the pipeline as (cos, sin) inputs. `text_len + text_len_t5` is the concatenated prompt length."""
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    torch.manual_seed(seed)
    hidden = heads * head_dim
    model = HunyuanDiT2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, patch_size=2,
        sample_size=sample_size, hidden_size=hidden, num_layers=num_layers, mlp_ratio=2.0, learn_sigma=True,
        cross_attention_dim=hidden, cross_attention_dim_t5=hidden, pooled_projection_dim=16, text_len=5,
        text_len_t5=6, use_style_cond_and_image_meta_size=True,
    ).eval()
    grid = sample_size // 2
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, sample_size, sample_size),
        timestep=torch.full((batch,), 500.0),
        encoder_hidden_states=torch.randn(batch, 5, hidden),
        text_embedding_mask=torch.ones(batch, 5, dtype=torch.long),
        encoder_hidden_states_t5=torch.randn(batch, 6, hidden),
        text_embedding_mask_t5=torch.ones(batch, 6, dtype=torch.long),
        image_meta_size=torch.tensor([[128.0, 128.0, 128.0, 128.0, 0.0, 0.0]] * batch),
        style=torch.zeros(batch, dtype=torch.long),
        image_rotary_emb=get_2d_rotary_pos_embed(head_dim, ((0, 0), (grid, grid)), (grid, grid), output_type="pt"),
    )
    return model, kwargs


def wan(frames: int = 4, height: int = 8, width: int = 8, num_layers: int = 4, heads: int = 2, head_dim: int = 16,
        batch: int = 1, prompt_tokens: int = 6, seed: int = 0):
    """Wan 2.x: video latents [B, C, F, H, W], 3-D RoPE written in place, cross-attention to the prompt."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=num_layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, frames, height, width),
        timestep=torch.full((batch,), 500, dtype=torch.int64),
        encoder_hidden_states=torch.randn(batch, prompt_tokens, 16),
    )
    return model, kwargs


def sd3(sample_size: int = 16, num_layers: int = 4, heads: int = 2, head_dim: int = 16, batch: int = 1,
        prompt_tokens: int = 6, seed: int = 0):
    """SD3 MM-DiT: joint attention over [image | text] (image first), a context_pre_only last block."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=32, caption_projection_dim=heads * head_dim,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=sample_size,
    ).eval()
    kwargs = dict(
        hidden_states=torch.randn(batch, 4, sample_size, sample_size),
        encoder_hidden_states=torch.randn(batch, prompt_tokens, 32),
        pooled_projections=torch.randn(batch, 16),
        timestep=torch.full((batch,), 500, dtype=torch.int64),
    )
    return model, kwargs


def flux(height: int = 8, width: int = 8, num_layers: int = 2, num_single_layers: int = 4, heads: int = 2,
         head_dim: int = 16, batch: int = 1, prompt_tokens: int = 6, seed: int = 0):
    """Flux: packed tokens [B, h * w, C]; double-stream blocks over [text | image] (text first), then
    single-stream blocks over the concatenated sequence; RoPE tables over text + image."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=False, axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    ).eval()
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    kwargs = dict(
        hidden_states=torch.randn(batch, height * width, 16),
        encoder_hidden_states=torch.randn(batch, prompt_tokens, 32),
        pooled_projections=torch.randn(batch, 16),
        timestep=torch.full((batch,), 0.5),
        img_ids=img_ids.reshape(height * width, 3),
        txt_ids=torch.zeros(prompt_tokens, 3),
    )
    return model, kwargs


def cogvideox(frames: int = 4, height: int = 8, width: int = 8, num_layers: int = 4, heads: int = 2,
              head_dim: int = 16, batch: int = 1, prompt_tokens: int = 6, rope: bool = False,
              patch_size_t: int | None = None, seed: int = 0):
    """CogVideoX: video latents [B, F, C, H, W] (frames before channels: token axis 1, found by the analysis), text and video
    concatenated [text | video] before every block's joint attention; sin-cos 3-D positional embeddings, or
    with `rope` (CogVideoX-5B) 3-D RoPE over the video tokens, given by the pipeline as (cos, sin);
    `patch_size_t` (CogVideoX 1.5, with `rope`): frames patched in pairs, a token row is `patch_size_t` frames."""
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    torch.manual_seed(seed)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        time_embed_dim=32, text_embed_dim=32, num_layers=num_layers, sample_width=width, sample_height=height,
        sample_frames=(frames - 1) * 4 + 1, patch_size=2, max_text_seq_length=prompt_tokens,
        use_rotary_positional_embeddings=rope, patch_size_t=patch_size_t,
    ).eval()
    kwargs = dict(
        hidden_states=torch.randn(batch, frames, 4, height, width),
        encoder_hidden_states=torch.randn(batch, prompt_tokens, 32),
        timestep=torch.full((batch,), 500, dtype=torch.int64),
    )
    if rope:  # as CogVideoXPipeline prepares it (sample size = latent size: no crop)
        grid = (height // 2, width // 2)
        if patch_size_t is None:
            kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(head_dim, ((0, 0), grid), grid, frames)
        else:
            kwargs["image_rotary_emb"] = get_3d_rotary_pos_embed(
                head_dim, None, grid, frames // patch_size_t, grid_type="slice", max_size=grid)
    return model, kwargs


BUILTIN: dict[str, Callable] = {
    "PixArtTransformer2DModel": pixart,
    "DiTTransformer2DModel": dit,
    "LTXVideoTransformer3DModel": ltx_video,
    "HunyuanDiT2DModel": hunyuan_dit,
    "WanTransformer3DModel": wan,
    "SD3Transformer2DModel": sd3,
    "FluxTransformer2DModel": flux,
    "CogVideoXTransformer3DModel": cogvideox,
}


# Options a built-in model needs (the CLI uses them unless told otherwise). None today: the token analysis
# finds the image input and its token axis, e.g. axis 1 (frames) of CogVideoX's [B, F, C, H, W] latents.
BUILTIN_OPTIONS: dict[str, dict] = {}


def load_model(spec: str, **config):
    """`spec` is a built-in diffusers class name or `module:function` returning (model, example kwargs)."""
    if spec in BUILTIN:
        return BUILTIN[spec](**config)
    if ":" in spec:
        import importlib
        import os
        import sys

        if os.getcwd() not in sys.path:  # like `python -m`: modules in the working directory are found
            sys.path.insert(0, os.getcwd())
        from .errors import ModelSpecError

        module, fn = spec.split(":", 1)
        try:
            factory = getattr(importlib.import_module(module), fn)
        except (ImportError, AttributeError) as e:
            raise ModelSpecError(f"model {spec!r}: cannot load {fn} from module {module} "
                                 f"({type(e).__name__}: {e})") from e
        return factory(**config)
    from .errors import ModelSpecError

    raise ModelSpecError(f"unknown model {spec!r}: use one of {sorted(BUILTIN)} or 'module:function'")
