"""Patch gather: write one patch's model output straight into its place in the full output tensor.

Two shapes of output:
  band         the output keeps the token rows on an axis (e.g. [B, S, C] or [B, C, H, W]): the patch is the
               band `out.narrow(axis, start, rows)`.
  unpatchify   the model ends with diffusers' unpatchify, [B, h*w, p*p*C] -> [B, C, h*p, w*p]
               (`reshape(B, h, w, p, p, C)`, `einsum("nhwpqc->nchpwq")`, `reshape`): the patch, still in
               token layout, goes straight into its band of image rows as one 6-d strided copy, so no
               [B, C, rows*p, w*p] intermediate is materialized.
"""
from __future__ import annotations

import torch

from .strided_copy import coalesce, copy
from .triton_support import KernelError


def write_band_reference(out: torch.Tensor, band: torch.Tensor, axis: int, start: int) -> None:
    _band(out, axis, start, band.shape[axis]).copy_(band)


def write_band_triton(out: torch.Tensor, band: torch.Tensor, axis: int, start: int) -> None:
    copy(band, _band(out, axis, start, band.shape[axis]))


def band_kernel_handles(out: torch.Tensor, band: torch.Tensor, axis: int) -> bool:
    """Whether the kernel takes this band (its strides coalesce to <= 6 dims); else the reference."""
    dst = out.narrow(axis, 0, band.shape[axis])
    return band.shape == dst.shape and len(coalesce(band.shape, band.stride(), dst.stride())[0]) <= 6


def _band(out: torch.Tensor, axis: int, start: int, rows: int) -> torch.Tensor:
    if start < 0 or start + rows > out.shape[axis]:
        raise KernelError(f"band [{start}, {start + rows}) outside the output's {out.shape[axis]} rows on axis {axis}")
    return out.narrow(axis, start, rows)


def unpatchify_views(out: torch.Tensor, patch: torch.Tensor, row_start: int, patch_size: int):
    """(source, destination) 6-d views [B, C, rows, p, w, p] of a token-layout patch and its image band.

    `out` is [B, C, h*p, w*p]; `patch` is [B, rows*w, p*p*C] with its last dim ordered (p, q, C), as diffusers'
    unpatchify reads it; `row_start` counts token rows (of p image rows each).
    """
    p = patch_size
    if out.dim() != 4 or patch.dim() != 3:
        raise KernelError(f"unpatchify: expected out [B, C, H, W] and patch [B, tokens, p*p*C], "
                          f"got {tuple(out.shape)} and {tuple(patch.shape)}")
    b, c, height, width = out.shape
    if height % p or width % p:
        raise KernelError(f"unpatchify: output {tuple(out.shape)} is not a multiple of patch size {p}")
    w = width // p
    if patch.shape[0] != b or patch.shape[2] != p * p * c or patch.shape[1] % w:
        raise KernelError(f"unpatchify: patch {tuple(patch.shape)} does not fit output {tuple(out.shape)} "
                          f"with patch size {p}")
    rows = patch.shape[1] // w
    src = patch.unflatten(1, (rows, w)).unflatten(3, (p, p, c)).permute(0, 5, 1, 3, 2, 4)
    dst = _band(out, 2, row_start * p, rows * p).unflatten(2, (rows, p)).unflatten(4, (w, p))
    return src, dst


def write_unpatchified_reference(out: torch.Tensor, patch: torch.Tensor, row_start: int, patch_size: int) -> None:
    src, dst = unpatchify_views(out, patch, row_start, patch_size)
    dst.copy_(src)


def write_unpatchified_triton(out: torch.Tensor, patch: torch.Tensor, row_start: int, patch_size: int) -> None:
    src, dst = unpatchify_views(out, patch, row_start, patch_size)
    copy(src, dst)
