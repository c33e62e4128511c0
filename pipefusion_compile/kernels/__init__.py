"""Data-movement kernels behind the `pipefusion::` ops.

Each kernel has a torch reference (exact, any device); the Triton versions land with the kernels issue and
are selected by device. This package never imports `torch.fx`.
"""
from .kv_cache import kv_cache_update_reference
from .pack import DTYPE_CODE, DTYPES, pack_reference, packed_nbytes, unpack_reference

__all__ = [
    "kv_cache_update_reference", "pack_reference", "unpack_reference", "packed_nbytes", "DTYPES", "DTYPE_CODE",
]
