"""K/V cache update: write a patch's fresh K and V into the full-sequence caches at its token range."""
from __future__ import annotations

import torch

from .strided_copy import multi_copy
from .triton_support import KernelError


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
    length = _check(cache_k, cache_v, k, v, axis)
    if start < 0 or start + length > cache_k.shape[axis]:
        raise KernelError(
            f"patch range [{start}, {start + length}) outside the cache's {cache_k.shape[axis]} tokens"
        )
    cache_k.narrow(axis, start, length).copy_(k)
    cache_v.narrow(axis, start, length).copy_(v)


def kv_cache_update_triton(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_start: torch.Tensor,
    axis: int,
    per_row: int,
    offset: int = 0,
) -> None:
    """Both copies of `kv_cache_update_reference` in one launch, at token `offset + row_start * per_row`.

    `row_start` (a 0-d int64 tensor, usually on the host) is read by the kernel on the device, so the
    update needs no host sync and one compiled graph serves every patch. Its range is not checked (that
    would need its value on the host); the runtime only produces patches inside the sequence.
    """
    length = _check(cache_k, cache_v, k, v, axis)
    if row_start.dim() != 0 or row_start.dtype != torch.int64:
        raise KernelError(f"row_start must be a 0-d int64 tensor, got {row_start.dtype} {tuple(row_start.shape)}")
    if length > cache_k.shape[axis]:
        raise KernelError(f"a patch of {length} tokens does not fit the cache's {cache_k.shape[axis]}")
    multi_copy([(k, cache_k, cache_k.stride(axis)), (v, cache_v, cache_v.stride(axis))],
               shift=(row_start, offset, per_row))


def _check(cache_k, cache_v, k, v, axis: int) -> int:
    if k.shape[axis] != v.shape[axis]:
        raise KernelError(f"k and v disagree on the token axis: {tuple(k.shape)} vs {tuple(v.shape)}")
    for name, patch, cache in (("k", k, cache_k), ("v", v, cache_v)):
        if patch.dim() != cache.dim() or any(
            p != c for d, (p, c) in enumerate(zip(patch.shape, cache.shape)) if d != axis
        ):
            raise KernelError(f"{name} patch {tuple(patch.shape)} does not match its cache {tuple(cache.shape)} "
                             f"outside the token axis {axis}")
    return k.shape[axis]
