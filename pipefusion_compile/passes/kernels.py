"""Pass: choose the implementation of every data-movement op in a graph (the backend's `kernels` option).

The `pipefusion::` data-movement ops take a `kernels` string ("auto" | "triton" | "torch"); the lowering emits
them with the default, "auto". This pass writes the user's choice into each call, so the choice is part of
the graph (visible in `print(gm.graph)`, baked in by inductor) rather than global state.

    Before:                                              After (kernels="torch"):
        pipefusion.kv_cache_update(%ck, %cv, %k, %v,         pipefusion.kv_cache_update(%ck, %cv, %k, %v,
                                   %row_start, 2, 4)              %row_start, 2, 4, kernels='torch')
"""
from __future__ import annotations

import torch.fx as fx

from ..ops import DATA_MOVEMENT_OPS


def select_kernels(gm: fx.GraphModule, kernels: str) -> fx.GraphModule:
    """Set `kernels=` on every data-movement op of `gm` (in place; returns `gm`)."""
    changed = False
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in DATA_MOVEMENT_OPS and n.kwargs.get("kernels") != kernels:
            schema_args = n.target._schema.arguments
            position = next(i for i, a in enumerate(schema_args) if a.name == "kernels")
            if len(n.args) > position:  # passed positionally: replace in place
                n.args = (*n.args[:position], kernels, *n.args[position + 1:])
            else:
                n.kwargs = {**n.kwargs, "kernels": kernels}
            changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm
