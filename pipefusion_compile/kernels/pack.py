"""Pack several tensors (any shapes, dtypes, strides) into one contiguous byte buffer, and back."""
from __future__ import annotations

import torch

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
        raise ValueError("nothing to pack")
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])


def unpack_reference(buf: torch.Tensor, shapes: list[list[int]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """Inverse of `pack_reference`: fresh tensors of the given shapes and dtypes."""
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise ValueError(f"expected a 1-d uint8 buffer, got {buf.dtype} {tuple(buf.shape)}")
    expected = packed_nbytes(shapes, dtypes)
    if buf.numel() != expected:
        raise ValueError(f"buffer has {buf.numel()} bytes, the layout needs {expected}")
    out, offset = [], 0
    for shape, dtype in zip(shapes, dtypes):
        n = packed_nbytes([shape], [dtype])
        out.append(buf[offset:offset + n].view(dtype).view(shape).clone())
        offset += n
    return out
