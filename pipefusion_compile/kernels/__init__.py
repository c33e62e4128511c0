"""Data-movement kernels behind the `pipefusion::` ops.

Each has a Triton kernel (`strided_copy.py`: one tiled strided-copy primitive, launched per op with the
views it needs) and an exact torch reference; `triton_support.use_triton` picks one by device and the
`kernels` mode. This package never imports `torch.fx`.
"""
from .halo import cache_rows_reference, halo_rows_reference
from .kv_cache import kv_cache_update_reference, kv_cache_update_triton
from .pack import (
    DTYPE_CODE,
    DTYPES,
    pack_reference,
    pack_triton,
    packed_nbytes,
    unpack_into_reference,
    unpack_into_triton,
    unpack_reference,
)
from .patch_output import (
    write_band_reference,
    write_band_triton,
    write_unpatchified_reference,
    write_unpatchified_triton,
)
from .triton_support import HAS_TRITON, MODES, KernelError

__all__ = [
    "DTYPES",
    "DTYPE_CODE",
    "HAS_TRITON",
    "MODES",
    "KernelError",
    "cache_rows_reference",
    "halo_rows_reference",
    "kv_cache_update_reference",
    "kv_cache_update_triton",
    "pack_reference",
    "pack_triton",
    "packed_nbytes",
    "unpack_into_reference",
    "unpack_into_triton",
    "unpack_reference",
    "write_band_reference",
    "write_band_triton",
    "write_unpatchified_reference",
    "write_unpatchified_triton",
]
