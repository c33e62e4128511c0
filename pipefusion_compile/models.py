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


BUILTIN: dict[str, Callable] = {
    "PixArtTransformer2DModel": pixart,
    "DiTTransformer2DModel": dit,
    "LTXVideoTransformer3DModel": ltx_video,
}


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
        module, fn = spec.split(":", 1)
        return getattr(importlib.import_module(module), fn)(**config)
    raise ValueError(f"unknown model {spec!r}: use one of {sorted(BUILTIN)} or 'module:function'")
