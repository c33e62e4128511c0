"""The one Triton primitive behind every pipefusion data-movement op: a tiled strided copy.

A *job* copies a source view into a destination view of the same shape, each with its own strides (any
layout: [B, H, S, D], [B, S, H, D], transposed, narrowed, permuted). The host first coalesces the job's
dimensions (drops size-1 dims, merges neighbours that are contiguous in both views), so the usual
activation or K/V patch becomes 1-3 dims; the kernel then walks the last dim with `BLOCK_C` lanes and the
others (flattened to "rows") with `BLOCK_R`, so the index arithmetic (div/mod) is paid once per row, not per
element. Loads and stores are masked; values are moved with their own dtype, never converted.

Two kernels use it:
  `_multi_copy_kernel`  up to `MAX_JOBS` jobs of rank <= 4 in one launch (grid axis 1 = job); optionally every
                        destination is shifted by `(shift_offset + *shift_ptr * shift_scale) * dst_shift_stride`
                        read on the device, so a K/V cache update needs no host sync for its token offset.
  `_copy_kernel`        one job of rank <= 6 (the unpatchify gather: a 6-d permuted view into the image).
"""
from __future__ import annotations

import math

import torch

from .triton_support import KernelError, jit, launch, tl

MAX_JOBS = 4        # tensors per `_multi_copy_kernel` launch; longer lists take ceil(n / 4) launches
TILE = 4096         # elements per program
NUM_WARPS = 8


@jit
def _tile_copy(
    src, dst,                    # pointers to the first element of each view (same dtype)
    dst_shift,                   # extra element offset added to every destination address
    tile,                        # which BLOCK_R x BLOCK_C tile of this job this program copies
    s0, s1, s2, s3, s4, s5,      # sizes, outermost first (leading 1s for lower ranks)
    a0, a1, a2, a3, a4, a5,      # source strides (elements)
    b0, b1, b2, b3, b4, b5,      # destination strides (elements)
    BLOCK_R: tl.constexpr,       # rows (all dims but the last, flattened) per tile
    BLOCK_C: tl.constexpr,       # elements of the last dim per tile
):
    n_col_blocks = tl.cdiv(s5, BLOCK_C)
    rb = tile // n_col_blocks
    cb = tile % n_col_blocks
    rows = rb.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = cb.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    i4 = rows % s4
    r = rows // s4
    i3 = r % s3
    r = r // s3
    i2 = r % s2
    r = r // s2
    i1 = r % s1
    i0 = r // s1
    src_row = i0 * a0 + i1 * a1 + i2 * a2 + i3 * a3 + i4 * a4
    dst_row = i0 * b0 + i1 * b1 + i2 * b2 + i3 * b3 + i4 * b4
    mask = (i0 < s0)[:, None] & (cols < s5)[None, :]      # rows past the last one have i0 >= s0
    x = tl.load(src + src_row[:, None] + (cols * a5)[None, :], mask=mask)
    tl.store(dst + dst_shift + dst_row[:, None] + (cols * b5)[None, :], x, mask=mask)


@jit
def _copy_kernel(
    src, dst, dst_shift,
    s0, s1, s2, s3, s4, s5,
    a0, a1, a2, a3, a4, a5,
    b0, b1, b2, b3, b4, b5,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    _tile_copy(src, dst, dst_shift, tl.program_id(0), s0, s1, s2, s3, s4, s5, a0, a1, a2, a3, a4, a5,
               b0, b1, b2, b3, b4, b5, BLOCK_R, BLOCK_C)


@jit
def _multi_copy_kernel(
    shift_ptr,                   # int64 scalar tensor on the device (the patch's row_start), if HAS_SHIFT
    shift_offset, shift_scale,   # destination token offset = shift_offset + *shift_ptr * shift_scale
    src0, dst0, p00, p01, p02, p03, a00, a01, a02, a03, b00, b01, b02, b03, d0,   # job 0: views, sizes,
    src1, dst1, p10, p11, p12, p13, a10, a11, a12, a13, b10, b11, b12, b13, d1,   # strides, and the dst
    src2, dst2, p20, p21, p22, p23, a20, a21, a22, a23, b20, b21, b22, b23, d2,   # stride of the shifted
    src3, dst3, p30, p31, p32, p33, a30, a31, a32, a33, b30, b31, b32, b33, d3,   # (token) axis
    N_JOBS: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    job = tl.program_id(1)
    start = shift_offset * 0
    if HAS_SHIFT:
        start = shift_offset + tl.load(shift_ptr) * shift_scale
    if job == 0:
        _tile_copy(src0, dst0, start * d0, tile, 1, 1, p00, p01, p02, p03, 0, 0, a00, a01, a02, a03,
                   0, 0, b00, b01, b02, b03, BLOCK_R, BLOCK_C)
    if N_JOBS > 1:  # noqa: SIM102 - a compile-time (constexpr) test around a run-time one
        if job == 1:
            _tile_copy(src1, dst1, start * d1, tile, 1, 1, p10, p11, p12, p13, 0, 0, a10, a11, a12, a13,
                       0, 0, b10, b11, b12, b13, BLOCK_R, BLOCK_C)
    if N_JOBS > 2:  # noqa: SIM102 - a compile-time (constexpr) test around a run-time one
        if job == 2:
            _tile_copy(src2, dst2, start * d2, tile, 1, 1, p20, p21, p22, p23, 0, 0, a20, a21, a22, a23,
                       0, 0, b20, b21, b22, b23, BLOCK_R, BLOCK_C)
    if N_JOBS > 3:  # noqa: SIM102 - a compile-time (constexpr) test around a run-time one
        if job == 3:
            _tile_copy(src3, dst3, start * d3, tile, 1, 1, p30, p31, p32, p33, 0, 0, a30, a31, a32, a33,
                       0, 0, b30, b31, b32, b33, BLOCK_R, BLOCK_C)


# ---------------------------------------------------------------------------------------------------------
# Host side


def coalesce(shape, *strides) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 dims and merge neighbours that are contiguous in every view; same element order.

    `coalesce((2, 3, 4), (12, 4, 1), (24, 8, 1))` -> `([6, 4], [[4, 1], [8, 1]])` (rows of 4 of a wider buffer).
    """
    dims = [(size, [st[d] for st in strides]) for d, size in enumerate(shape) if size != 1]
    if not dims:
        return [1], [[0] for _ in strides]
    merged = [dims[0]]
    for size, st in dims[1:]:
        outer, outer_st = merged[-1]
        if all(o == size * s for o, s in zip(outer_st, st)):
            merged[-1] = (outer * size, st)
        else:
            merged.append((size, st))
    return [m[0] for m in merged], [[m[1][i] for m in merged] for i in range(len(strides))]


def _pad(values: list[int], rank: int, fill: int) -> list[int]:
    return [fill] * (rank - len(values)) + list(values)


def _blocks(inner: int) -> tuple[int, int]:
    block_c = min(TILE, 1 << max(0, math.ceil(math.log2(max(inner, 1)))))
    return TILE // block_c, block_c


def _check_pair(src: torch.Tensor, dst: torch.Tensor) -> None:
    if src.shape != dst.shape:
        raise KernelError(f"copy between different shapes {tuple(src.shape)} -> {tuple(dst.shape)}")
    if src.dtype != dst.dtype:
        raise KernelError(f"copy between dtypes {src.dtype} -> {dst.dtype} (kernels move data, never convert)")
    if src.device != dst.device:
        raise KernelError(f"copy between devices {src.device} -> {dst.device}")


def copy(src: torch.Tensor, dst: torch.Tensor, dst_shift: int = 0) -> None:
    """`dst.view_at(dst_shift).copy_(src)` for views of rank <= 6 (after coalescing), in one launch."""
    _check_pair(src, dst)
    if src.numel() == 0:
        return
    sizes, (a, b) = coalesce(src.shape, src.stride(), dst.stride())
    if len(sizes) > 6:
        raise KernelError(f"strided copy of rank {len(sizes)} after coalescing (at most 6): {tuple(src.shape)}")
    sizes, a, b = _pad(sizes, 6, 1), _pad(a, 6, 0), _pad(b, 6, 0)
    block_r, block_c = _blocks(sizes[-1])
    tiles = math.ceil(math.prod(sizes[:-1]) / block_r) * math.ceil(sizes[-1] / block_c)
    launch(_copy_kernel, (tiles,), src, dst, dst_shift, *sizes, *a, *b, BLOCK_R=block_r, BLOCK_C=block_c,
           **_warps(_copy_kernel))


def job_rank(src: torch.Tensor, dst: torch.Tensor) -> int:
    """The rank a job has after coalescing (`multi_copy` takes jobs of rank <= 4)."""
    return len(coalesce(src.shape, src.stride(), dst.stride())[0])


def multi_copy(jobs: list[tuple[torch.Tensor, torch.Tensor, int]],
               shift: tuple[torch.Tensor, int, int] | None = None) -> None:
    """Copy every `(src, dst, dst_shift_stride)` job, `MAX_JOBS` per launch.

    With `shift=(row_start, offset, per_row)` each destination starts
    `(offset + row_start * per_row) * dst_shift_stride` elements further, `row_start` read on the device;
    `dst` is then the whole tensor written into (e.g. a K/V cache, larger than `src` on the token axis), never
    a view of the part written: under functionalization a kernel argument stands for exactly the memory it
    may write.
    """
    if not jobs:
        return
    for chunk_start in range(0, len(jobs), MAX_JOBS):
        _multi_copy_launch(jobs[chunk_start:chunk_start + MAX_JOBS], shift)


def _multi_copy_launch(jobs, shift) -> None:
    args, tiles, block_c_of = [], [], []
    geometry = []
    for src, dst, shift_stride in jobs:
        if shift is None:
            _check_pair(src, dst)
        elif src.dim() != dst.dim() or src.dtype != dst.dtype:
            raise KernelError(f"copy {src.dtype} {tuple(src.shape)} into {dst.dtype} {tuple(dst.shape)}")
        sizes, (a, b) = coalesce(src.shape, src.stride(), dst.stride())
        if len(sizes) > 4:
            raise KernelError(f"multi-copy job of rank {len(sizes)} after coalescing (at most 4): "
                              f"{tuple(src.shape)} strides {src.stride()} -> {dst.stride()}")
        if src.numel() == 0:
            sizes = [0]
        geometry.append((src, dst, _pad(sizes, 4, 1), _pad(a, 4, 0), _pad(b, 4, 0), shift_stride))
        block_c_of.append(sizes[-1])
    block_r, block_c = _blocks(max(block_c_of))
    for src, dst, sizes, a, b, d in geometry:
        tiles.append(math.ceil(math.prod(sizes[:-1]) / block_r) * math.ceil(sizes[-1] / block_c))
        args += [src, dst, *sizes, *a, *b, d]
    n_jobs = len(geometry)
    src0 = geometry[0][0]                            # unused slots: never touched (N_JOBS is a constexpr);
    args += [src0, src0, *[1] * 12, 0] * (MAX_JOBS - n_jobs)   # a read-only tensor, so no one sees a write
    if max(tiles) == 0:
        return
    if shift is None:
        shift_args = (jobs[0][0], 0, 0)
    else:
        row_start, offset, per_row = shift
        device = jobs[0][1].device
        if row_start.device != device:               # a caller's host row_start (the runtime's is on the device)
            row_start = row_start.to(device)
        shift_args = (row_start, offset, per_row)
    launch(_multi_copy_kernel, (max(tiles), n_jobs), *shift_args, *args, N_JOBS=n_jobs,
           HAS_SHIFT=shift is not None, BLOCK_R=block_r, BLOCK_C=block_c, **_warps(_multi_copy_kernel))


def _warps(kernel) -> dict:
    from .triton_support import is_interpreted

    return {} if is_interpreted(kernel) else {"num_warps": NUM_WARPS}
