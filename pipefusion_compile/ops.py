"""The `pipefusion::` graph ops the lowering emits.

They are registered `torch.library` custom ops with fake implementations, so they show in
`print(stage.graph)`, survive DCE (they mutate their inputs) and compile under inductor without graph
breaks. Passes emit `torch.ops.pipefusion.*` and never import triton.
"""
from __future__ import annotations

import torch

from .kernels import kv_cache_update_reference


@torch.library.custom_op("pipefusion::kv_cache_update", mutates_args=("cache_k", "cache_v"))
def kv_cache_update(
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    row_start: torch.Tensor,
    axis: int,
    per_row: int,
    offset: int = 0,
) -> None:
    """Write fresh K/V of one patch into the caches at token range starting `offset + row_start * per_row`.

    `offset` is where the patch's token group starts in a joint sequence (e.g. after the text tokens in
    Flux); 0 for image-only sequences and for a text piece placed first.

    `row_start` is a 0-d int64 CPU tensor (not an int) so that one compiled stage graph serves every
    patch of the same size: inductor would otherwise bake the patch offset into the code.
    """
    start = offset + int(row_start) * per_row
    kv_cache_update_reference(cache_k, cache_v, k, v, start, axis)


@kv_cache_update.register_fake
def _(cache_k, cache_v, k, v, row_start, axis, per_row, offset=0):  # noqa: ANN001 - fake impl mirrors the op
    return None
