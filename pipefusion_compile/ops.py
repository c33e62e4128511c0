"""The `pipefusion::` data-movement ops the lowering and the runtimes emit.

Each is a `torch.library.triton_op`: it shows in `print(stage.graph)`, survives DCE (it mutates its inputs or
is used), and when inductor compiles a graph on CUDA it traces into the op and sees the Triton kernel
itself (`wrap_triton`), so there is no graph break and no opaque call. Every op takes `kernels`
("auto" | "triton" | "torch", see `kernels.triton_support`): the backend's `kernels` option, written into
the graphs by `passes.kernels.select_kernels`. On CPU the torch reference runs (through an opaque custom op
where the reference needs a host value, as `kv_cache_update` needs `row_start`).

Passes emit `torch.ops.pipefusion.*` and never import triton.
"""
from __future__ import annotations

import weakref

import torch

from .kernels import (
    cache_rows_reference,
    halo_rows_reference,
    kv_cache_update_reference,
    kv_cache_update_triton,
    pack_reference,
    pack_triton,
    unpack_into_reference,
    unpack_into_triton,
    write_band_reference,
    write_band_triton,
    write_unpatchified_reference,
    write_unpatchified_triton,
)
from .kernels.pack import DTYPES, kernel_handles
from .kernels.patch_output import band_kernel_handles
from .kernels.strided_copy import _copy_kernel, _multi_copy_kernel
from .kernels.triton_support import is_interpreted, is_traced, use_triton


_HOST_VALUES: dict[int, tuple] = {}   # id(row offset tensor) -> (weak ref to it, its value)


def row_offset(value: int, device: torch.device | str) -> torch.Tensor:
    """A patch's first token row as a 0-d int64 tensor on `device`, made once by the runtime. Kernels read it
    on the device (no copy per patch); the ops that need it on the host read the value recorded here
    (`host_int`), so neither side syncs the device per patch."""
    t = torch.tensor(value, dtype=torch.int64, device=device)
    key = id(t)
    _HOST_VALUES[key] = (weakref.ref(t, lambda _, key=key: _HOST_VALUES.pop(key, None)), int(value))
    return t


def host_int(t: torch.Tensor) -> int:
    """The value of a 0-d int tensor on the host: recorded by `row_offset` (no device read), else read."""
    found = _HOST_VALUES.get(id(t))
    if found is not None and found[0]() is t:
        return found[1]
    return int(t)


def _kernel_runs(mode: str, kernel, *tensors: torch.Tensor) -> bool:
    """Triton for these tensors under `mode` (an interpreted kernel cannot be traced: the trace gets the
    reference, which gives the same bytes)."""
    return use_triton(mode, kernel, *tensors) and not (is_interpreted(kernel) and is_traced(*tensors))


# ---------------------------------------------------------------------------------------------------------
# K/V cache


@torch.library.triton_op("pipefusion::kv_cache_update", mutates_args=("cache_k", "cache_v"))
def kv_cache_update(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_start: torch.Tensor,
    axis: int,
    per_row: int,
    offset: int = 0,
    kernels: str = "auto",
) -> None:
    """Write fresh K/V of one patch into the caches at token range starting `offset + row_start * per_row`.

    `offset` is where the patch's token group starts in a joint sequence (e.g. after the text tokens in
    Flux); 0 for image-only sequences and for a text piece placed first.

    `row_start` is a 0-d int64 tensor (not an int) so that one compiled stage graph serves every patch of the
    same size: inductor would otherwise bake the patch offset into the code. The runtime makes it once, on
    the device (`row_offset`): the Triton kernel reads it there (both caches in one launch); the reference
    reads its recorded host value (`host_int`), inside the opaque `kv_cache_update_host`.
    """
    if use_triton(kernels, _multi_copy_kernel, cache_k, cache_v, k, v) and not is_interpreted(_multi_copy_kernel):
        kv_cache_update_triton(cache_k, cache_v, k, v, row_start, axis, per_row, offset)
    else:
        torch.ops.pipefusion.kv_cache_update_host(cache_k, cache_v, k, v, row_start, axis, per_row, offset, kernels)


@torch.library.custom_op("pipefusion::kv_cache_update_host", mutates_args=("cache_k", "cache_v"))
def kv_cache_update_host(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_start: torch.Tensor,
    axis: int,
    per_row: int,
    offset: int = 0,
    kernels: str = "auto",
) -> None:
    """`kv_cache_update` where `row_start` is read on the host: the torch reference, or the Triton kernel
    under TRITON_INTERPRET=1 (which cannot be traced). Opaque to compilers, so traceable anywhere."""
    if use_triton(kernels, _multi_copy_kernel, cache_k, cache_v, k, v):
        kv_cache_update_triton(cache_k, cache_v, k, v, row_start, axis, per_row, offset)
    else:
        kv_cache_update_reference(cache_k, cache_v, k, v, offset + host_int(row_start) * per_row, axis)


@kv_cache_update_host.register_fake
def _(cache_k, cache_v, k, v, row_start, axis, per_row, offset=0, kernels="auto"):
    return None


# ---------------------------------------------------------------------------------------------------------
# Halo rows (a conv over token rows)


@torch.library.custom_op("pipefusion::halo_rows", mutates_args=("cache",))
def halo_rows(cache: torch.Tensor, x: torch.Tensor, row_start: torch.Tensor, axis: int, per_row: int,
              before: int, after: int) -> torch.Tensor:
    """Write one patch's rows `x` of a conv input into the full-size `cache` at `row_start * per_row` along
    `axis`, and return the cache's rows from `before` elements ahead of the patch to `after` past it (zeros
    beyond the image border, as the conv's zero padding): the conv, run without padding along `axis`, then
    gives exactly the patch's output rows. `row_start` is a 0-d int64 tensor (as for `kv_cache_update`),
    read on the host (`host_int`): the op is opaque to compilers."""
    return halo_rows_reference(cache, x, host_int(row_start) * per_row, axis, before, after)


@halo_rows.register_fake
def _(cache, x, row_start, axis, per_row, before, after):
    shape = list(x.shape)
    shape[axis] += before + after
    return x.new_empty(shape, dtype=cache.dtype)


@torch.library.custom_op("pipefusion::cache_rows", mutates_args=("cache",))
def cache_rows(cache: torch.Tensor, x: torch.Tensor, row_start: torch.Tensor, axis: int, per_row: int) -> None:
    """Write one patch's rows `x` of a reduction's operand into its full-size `cache` at `row_start * per_row`
    along `axis` (the reduction then runs over the whole cache). `row_start` is read on the host, as in
    `halo_rows`."""
    cache_rows_reference(cache, x, host_int(row_start) * per_row, axis)


@cache_rows.register_fake
def _(cache, x, row_start, axis, per_row):
    return None


# ---------------------------------------------------------------------------------------------------------
# Pack / unpack (one message per patch and stage cut)


def stride_order(shape, stride) -> list[int]:
    """The dims of a tensor from the outermost in memory to the innermost (the `physical_layout` of
    `torch.empty_permuted`); dims of size 1 keep their logical place, as their stride says nothing."""
    ranked = [d for d in range(len(shape)) if shape[d] != 1]
    ranked.sort(key=lambda d: -stride[d])  # stable: equal strides keep logical order
    it = iter(ranked)
    return [d if shape[d] == 1 else next(it) for d in range(len(shape))]



@torch.library.triton_op("pipefusion::pack", mutates_args=())
def pack(tensors: list[torch.Tensor], kernels: str = "auto") -> torch.Tensor:
    """The tensors crossing one cut for one patch, as one contiguous byte buffer (one message)."""
    if tensors and _kernel_runs(kernels, _multi_copy_kernel, *tensors) and kernel_handles(tensors):
        return pack_triton(tensors)
    return pack_reference(tensors)


@torch.library.triton_op("pipefusion::unpack", mutates_args=())
def unpack(buf: torch.Tensor, shapes: list[int], ranks: list[int], dtypes: list[int],
           orders: list[int] | None = None, kernels: str = "auto") -> list[torch.Tensor]:
    """Inverse of `pack`, into fresh tensors: shapes are flattened (`ranks[i]` dims each), dtypes are codes
    into `kernels.DTYPES`, `orders` (flattened like `shapes`; default row-major) the memory order of each
    tensor's dims, outermost first (`stride_order`): the consumer then gets the producer's layout, as it does
    in one process, and the ops it runs (a matmul over a transposed operand) give the same bits."""
    outs, i = [], 0
    for r, code in zip(ranks, dtypes):
        shape = shapes[i:i + r]
        order = orders[i:i + r] if orders is not None else list(range(r))
        outs.append(torch.empty_permuted(shape, order, dtype=DTYPES[code], device=buf.device))
        i += r
    _unpack_into(buf, outs, kernels)
    return outs


@torch.library.triton_op("pipefusion::unpack_into", mutates_args=("outs",))
def unpack_into(buf: torch.Tensor, outs: list[torch.Tensor], kernels: str = "auto") -> None:
    """Inverse of `pack`, scattered into existing tensors or strided views (e.g. the next stage's inputs)."""
    _unpack_into(buf, outs, kernels)


def _unpack_into(buf, outs, kernels) -> None:
    if outs and _kernel_runs(kernels, _multi_copy_kernel, buf, *outs) and kernel_handles(outs):
        unpack_into_triton(buf, outs)
    else:
        unpack_into_reference(buf, outs)


# ---------------------------------------------------------------------------------------------------------
# Patch output -> full output


@torch.library.triton_op("pipefusion::write_band", mutates_args=("out",))
def write_band(out: torch.Tensor, band: torch.Tensor, axis: int, start: int, kernels: str = "auto") -> None:
    """Write one patch's output rows into the full output tensor: `out.narrow(axis, start, rows) = band`."""
    if _kernel_runs(kernels, _copy_kernel, out, band) and band_kernel_handles(out, band, axis):
        write_band_triton(out, band, axis, start)
    else:
        write_band_reference(out, band, axis, start)


@torch.library.triton_op("pipefusion::write_unpatchified", mutates_args=("out",))
def write_unpatchified(out: torch.Tensor, patch: torch.Tensor, row_start: int, patch_size: int,
                       kernels: str = "auto") -> None:
    """Write a patch still in token layout, [B, rows*w, p*p*C], into its rows of the image [B, C, h*p, w*p]
    (diffusers' unpatchify, fused with the band write); `row_start` counts token rows."""
    if _kernel_runs(kernels, _copy_kernel, out, patch):
        write_unpatchified_triton(out, patch, row_start, patch_size)
    else:
        write_unpatchified_reference(out, patch, row_start, patch_size)


DATA_MOVEMENT_OPS = (
    torch.ops.pipefusion.kv_cache_update.default,
    torch.ops.pipefusion.pack.default,
    torch.ops.pipefusion.unpack.default,
    torch.ops.pipefusion.unpack_into.default,
    torch.ops.pipefusion.write_band.default,
    torch.ops.pipefusion.write_unpatchified.default,
)
"""The ops that take `kernels` (what `passes.kernels.select_kernels` sets)."""
