"""K/V cache update: write a patch's fresh K and V into the full-sequence caches at its token range."""
from __future__ import annotations

import torch


def kv_cache_update_reference(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start: int,
    axis: int,
) -> None:
    """Copy `k`/`v` into `cache_k`/`cache_v[..., start:start + k.shape[axis], ...]` along `axis`.

    Any layout works ([B, H, S, D], [B, S, H, D], strided views): the copy goes through `narrow`.
    """
    length = k.shape[axis]
    if k.shape[axis] != v.shape[axis]:
        raise ValueError(f"k and v disagree on the token axis: {tuple(k.shape)} vs {tuple(v.shape)}")
    if start < 0 or start + length > cache_k.shape[axis]:
        raise IndexError(
            f"patch range [{start}, {start + length}) outside the cache's {cache_k.shape[axis]} tokens"
        )
    cache_k.narrow(axis, start, length).copy_(k)
    cache_v.narrow(axis, start, length).copy_(v)
