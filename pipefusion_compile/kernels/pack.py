"""Pack several tensors (any shapes, dtypes, strides) into one contiguous byte buffer, and back.

Layout (shared by the reference and the kernel, so either side of a message may use either): the tensors'
elements in row-major order, one tensor after another, no padding. The Triton path moves each tensor with its
own dtype through a typed view of the buffer (`buf[offset:offset + nbytes].view(dtype)`), so a tensor must
start at a byte offset that is a multiple of its item size; for a layout where one does not (an odd number of
bytes before a wider dtype), or a tensor whose strides do not coalesce to <= 4 dims, the call uses the
reference. Up to four tensors move per launch (`strided_copy.MAX_JOBS`): one launch for what crosses a cut.
"""
from __future__ import annotations

import torch

from .strided_copy import MAX_JOBS, coalesce, multi_copy
from .triton_support import KernelError

# dtype <-> small int, so the pack layout fits a torch.library schema (int[])
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.bool,
          torch.uint8, torch.int8, torch.int16)
DTYPE_CODE = {d: i for i, d in enumerate(DTYPES)}


def packed_nbytes(shapes, dtypes) -> int:
    total = 0
    for shape, dtype in zip(shapes, dtypes):
        n = 1
        for s in shape:
            n *= s
        total += n * dtype.itemsize
    return total


def pack_reference(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous uint8 buffer holding the tensors' bytes one after another."""
    if not tensors:
        raise KernelError("nothing to pack")
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unpack_reference(buf: torch.Tensor, shapes: list[list[int]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Inverse of `pack_reference`: fresh tensors of the given shapes and dtypes."""
    _check_buffer(buf, shapes, dtypes)
    return [view.clone() for view in _buffer_views(buf, shapes, dtypes)]


def unpack_into_reference(buf: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """Scatter a packed buffer into existing tensors (any strides), e.g. views of the next stage's inputs."""
    shapes, dtypes = [list(o.shape) for o in outs], [o.dtype for o in outs]
    for out, view in zip(outs, _buffer_views(buf, shapes, dtypes)):
        out.copy_(view)


def kernel_handles(tensors: list[torch.Tensor]) -> bool:
    """Whether `pack_triton`/`unpack_into_triton` can move these tensors (else: the reference)."""
    offset = 0
    for t in tensors:
        if offset % t.element_size():
            return False
        contiguous = _contiguous_strides(t.shape)
        if len(coalesce(t.shape, t.stride(), contiguous)[0]) > 4:
            return False
        offset += t.numel() * t.element_size()
    return True


def pack_triton(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`pack_reference` with one launch per `MAX_JOBS` tensors, gathering strided views directly."""
    if not tensors:
        raise KernelError("nothing to pack")
    shapes, dtypes = [list(t.shape) for t in tensors], [t.dtype for t in tensors]
    buf = torch.empty(packed_nbytes(shapes, dtypes), dtype=torch.uint8, device=tensors[0].device)
    multi_copy([(_bytes_if_bool(t), _bytes_if_bool(view), 0)
                for t, view in zip(tensors, _buffer_views(buf, shapes, dtypes))])
    return buf


def unpack_into_triton(buf: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """`unpack_into_reference` in one launch per `MAX_JOBS` tensors, scattering into strided views directly."""
    shapes, dtypes = [list(o.shape) for o in outs], [o.dtype for o in outs]
    multi_copy([(_bytes_if_bool(view), _bytes_if_bool(out), 0)
                for out, view in zip(outs, _buffer_views(buf, shapes, dtypes))])


def _buffer_views(buf: torch.Tensor, shapes, dtypes) -> list[torch.Tensor]:
    """The typed, shaped views of `buf` where each packed tensor lives (a copy of its bytes where the tensor
    does not start at a multiple of its item size: a dtype view needs that alignment)."""
    _check_buffer(buf, shapes, dtypes)
    views, offset = [], 0
    for shape, dtype in zip(shapes, dtypes):
        n = packed_nbytes([shape], [dtype])
        chunk = buf[offset:offset + n]
        views.append((chunk if offset % dtype.itemsize == 0 else chunk.clone()).view(dtype).view(shape))
        offset += n
    return views


def _check_buffer(buf: torch.Tensor, shapes, dtypes) -> None:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise KernelError(f"expected a 1-d uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
    expected = packed_nbytes(shapes, dtypes)
    if buf.numel() != expected:
        raise KernelError(f"buffer has {buf.numel()} bytes, the layout needs {expected}")


def _bytes_if_bool(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.bool else t  # Triton has no 1-byte bool pointer


def _contiguous_strides(shape) -> list[int]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= max(s, 1)
    return strides[::-1]


__all__ = [
    "DTYPES",
    "DTYPE_CODE",
    "MAX_JOBS",
    "kernel_handles",
    "pack_reference",
    "pack_triton",
    "packed_nbytes",
    "unpack_into_reference",
    "unpack_into_triton",
    "unpack_reference",
]
