"""Halo rows: write a patch's rows of a conv input into the full-size cache, read them back with the halo.

The conv then runs without padding along the rows and gives exactly the patch's output rows: rows of
the other patches come from the cache (this step's for patches already done, the previous step's for the
rest), rows beyond the image are zeros, as the plain conv's zero padding.
"""
from __future__ import annotations

import torch

from .triton_support import KernelError


def cache_rows_reference(cache: torch.Tensor, x: torch.Tensor, start: int, axis: int) -> None:
    """`cache.narrow(axis, start, n) = x` (n = x's extent along `axis`): a patch's rows into a full-size cache."""
    if x.dim() != cache.dim() or any(a != b for d, (a, b) in enumerate(zip(x.shape, cache.shape)) if d != axis):
        raise KernelError(f"patch {tuple(x.shape)} does not match the cache {tuple(cache.shape)} off axis {axis}")
    n, total = x.shape[axis], cache.shape[axis]
    if start < 0 or start + n > total:
        raise KernelError(f"patch range [{start}, {start + n}) outside the cache's {total} rows")
    cache.narrow(axis, start, n).copy_(x)


def halo_rows_reference(cache: torch.Tensor, x: torch.Tensor, start: int, axis: int, before: int,
                        after: int) -> torch.Tensor:
    """`cache.narrow(axis, start, n) = x` (n = x's extent along `axis`), then return the cache's elements
    [start - before, start + n + after) along `axis`, zero outside [0, cache extent)."""
    cache_rows_reference(cache, x, start, axis)
    n, total = x.shape[axis], cache.shape[axis]
    shape = list(x.shape)
    shape[axis] = n + before + after
    out = torch.zeros(shape, dtype=cache.dtype, device=cache.device)
    lo, hi = max(start - before, 0), min(start + n + after, total)
    out.narrow(axis, lo - (start - before), hi - lo).copy_(cache.narrow(axis, lo, hi - lo))
    return out
