"""Output fusion: the last stage returns a model output that ends in diffusers' unpatchify in token layout, and
the runtime writes it into the full output with `pipefusion.write_unpatchified` (`fuse_unpatchify_output`), so
the last stage never materializes the unpatchified patch.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .meta import example_value
from .side_effects import is_impure
from .stage_split import _set_output_values, output_names


_UNPATCHIFY_PERM = (0, 5, 1, 3, 2, 4)   # n h w p q c -> n c h p w q


def _is_reshape(n) -> bool:
    return isinstance(n, fx.Node) and n.op in ("call_method", "call_function") and n.target in (
        "reshape", "view", torch.reshape)


def _unpatchify_source(out: fx.Node):
    """(x, p) if `out` is diffusers' unpatchify of x: reshape(einsum("nhwpqc->nchpwq" | permute,
    reshape(x, (B, h, w, p, p, C))), (B, C, h * p, w * p)) with x [B, h * w, p * p * C]; else None."""
    if not _is_reshape(out) or len(out.users) > 1:
        return None
    mid = out.args[0]
    if not isinstance(mid, fx.Node) or len(mid.users) != 1:
        return None
    if mid.target is torch.functional.einsum or mid.target is torch.einsum:
        if mid.args[0].replace(" ", "") != "nhwpqc->nchpwq" or len(mid.args) != 2:
            return None
        six = mid.args[1]
    elif mid.target in ("permute", torch.permute):
        dims = mid.args[1:] if len(mid.args) > 2 else mid.args[1]
        if tuple(dims) != _UNPATCHIFY_PERM:
            return None
        six = mid.args[0]
    else:
        return None
    if not _is_reshape(six) or len(six.users) != 1:
        return None
    x = six.args[0]
    sv, xv, ov = example_value(six), example_value(x), example_value(out)
    if not all(isinstance(v, torch.Tensor) for v in (sv, xv, ov)) or sv.dim() != 6 or xv.dim() != 3 or ov.dim() != 4:
        return None
    b, h, w, p, q, c = sv.shape
    if p != q or tuple(xv.shape) != (b, h * w, p * q * c) or tuple(ov.shape) != (b, c, h * p, w * q):
        return None
    return x, int(p)


def fuse_unpatchify_output(gm: fx.GraphModule, model_outputs: set[str]) -> tuple[fx.GraphModule, dict[str, int]]:
    """Return model outputs in token layout and let the runtime write them with `write_unpatchified`, so the
    last stage never materializes the unpatchified patch.

    Before (last stage, a band of 4 token rows):           After:
        %r = reshape(%x, shape=(-1, 4, 8, 2, 2, 8))             return (%x,)   # [B, 32, 32], token layout
        %e = einsum("nhwpqc->nchpwq", %r)                   (unpatchified = {"output": 2}: the runtime
        %output = reshape(%e, shape=(-1, 8, 8, 16))          writes it into rows [8 r0, 8 r0 + 8) of the
        return (%output,)                                    full [B, 8, 16, 16] output in one kernel)
    Run after `propagate_patch_shapes`, on the piece's own (patch-sized) graph.
    """
    out = next(iter(gm.graph.find_nodes(op="output")))
    values = list(out.args[0])
    names = output_names(gm)
    fused: dict[str, int] = {}
    for i, (v, name) in enumerate(zip(values, names)):
        if name not in model_outputs:
            continue
        found = _unpatchify_source(v)
        if found is None:
            continue
        x, p = found
        fused[name] = p
        values[i] = x
    if fused:
        _set_output_values(gm, values, names)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        gm.graph.lint()
        gm.recompile()
    return gm, fused
