"""Keys concatenated from several sources, moved next to the attention that reads them.

Some models attend from the image tokens over keys that are the image's own K/V concatenated with K/V
computed from the prompt alone (NucleusMoE-Image: [image | text], PRX: [text | image]); the query holds the
image tokens only. Between the `cat` and the SDPA call there are often layout ops only (diffusers'
`dispatch_attention_fn` takes [B, S, H, D] and permutes to [B, H, S, D]). The K/V cache rule of such an
attention (`token_rules.rule_sdpa`, `piece_rewrites.rewrite_stale_attention`) needs the concatenation to be the
SDPA's key and value themselves, so that it can write each operand into its own slots of the cache. This pass
moves the `cat` below the layout ops, which is exact (it only moves data):

    Before:                                          After:
        %k = cat([%img_k, %txt_k], 1)   [B, 70, H, D]    %p0 = permute(%img_k, 0, 2, 1, 3)  [B, H, 64, D]
        %kt = permute(%k, 0, 2, 1, 3)   [B, H, 70, D]    %p1 = permute(%txt_k, 0, 2, 1, 3)  [B, H, 6, D]
        %o = sdpa(%q, %kt, %vt)         q [B, H, 64, D]  %kt = cat([%p0, %p1], 2)
                                                         %o = sdpa(%q, %kt, %vt)

It applies only where the keys are longer than the queries along the sequence axis (the queries cannot be
the same concatenation) and every op between the `cat` and the SDPA is a permute, transpose or contiguous
with no other user; anything else is left as it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .canonical_attention import _emit
from .meta import example_value
from .sdpa import is_sdpa, sdpa_qkv, set_sdpa_kv

_CAT = (torch.cat, torch.concat, torch.concatenate)
_PERMUTES = ("permute", torch.permute)
_TRANSPOSES = ("transpose", "swapaxes", torch.transpose, torch.swapaxes)


def _dims(n: fx.Node) -> tuple[int, ...] | None:
    """The dim order a layout op produces from its input (a permutation), or None for any other op."""
    if n.target not in (*_PERMUTES, *_TRANSPOSES, "contiguous") or not n.args or not isinstance(
            example_value(n.args[0]), torch.Tensor):
        return None
    nd = example_value(n.args[0]).dim()
    if n.kwargs:   # dims passed by keyword: not a form dynamo records; left alone
        return None
    if n.target in _PERMUTES:
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
        return tuple(d % nd for d in dims) if len(dims) == nd and all(isinstance(d, int) for d in dims) else None
    if n.target in _TRANSPOSES and len(n.args) == 3 and all(isinstance(d, int) for d in n.args[1:]):
        order = list(range(nd))
        a, b = n.args[1] % nd, n.args[2] % nd
        order[a], order[b] = order[b], order[a]
        return tuple(order)
    if n.target == "contiguous" and len(n.args) == 1:
        return tuple(range(nd))
    return None


def _layout_chain(x: fx.Node):
    """(cat node, [layout ops from it down to x]) if x is a `cat` followed by single-user layout ops."""
    chain = []
    while isinstance(x, fx.Node) and x.op in ("call_function", "call_method"):
        if x.target in _CAT:
            return x, chain[::-1]
        if _dims(x) is None or not isinstance(x.args[0], fx.Node) or len(x.args[0].users) != 1:
            return None
        chain.append(x)
        x = x.args[0]
    return None


def _push(gm: fx.GraphModule, sdpa: fx.Node, x: fx.Node):
    """(a `cat` equal to `x` placed right before `sdpa`, the nodes it replaces), or None if `x` is not such a
    chain."""
    found = _layout_chain(x) if len(x.users) == 1 else None
    if found is None or not found[1]:
        return None
    cat, chain = found
    tensors = list(cat.args[0] if cat.args else cat.kwargs["tensors"])
    nd = example_value(cat).dim()
    dim = (cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)) % nd
    if len(cat.users) != 1 or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    g = gm.graph
    with g.inserting_before(sdpa):
        parts = tensors
        for op in chain:
            order = _dims(op)
            parts = [_emit(g, op.op, op.target, (p, *op.args[1:]), dict(op.kwargs), op) for p in parts]
            dim = order.index(dim)
        new = _emit(g, "call_function", torch.cat, (parts,), {"dim": dim}, cat)
    return new, [cat, *chain]


def concat_keys_at_attention(gm: fx.GraphModule) -> list[str]:
    """Move a concatenation of the keys (and values) of an attention whose keys are longer than its queries
    below the layout ops to the SDPA call (see the module docstring); returns the SDPA nodes changed."""
    changed = []
    for n in list(gm.graph.nodes):
        if not is_sdpa(n):
            continue
        q, k, v = sdpa_qkv(n)
        qv, kv = example_value(q), example_value(k)
        if not all(isinstance(t, torch.Tensor) for t in (qv, kv)) or qv.dim() < 2 or kv.shape[-2] <= qv.shape[-2]:
            continue
        pushed_k = _push(gm, n, k)
        pushed_v = pushed_k if v is k else _push(gm, n, v)
        if pushed_k is None and pushed_v is None:
            continue
        set_sdpa_kv(n, pushed_k[0] if pushed_k else k, pushed_v[0] if pushed_v else v)
        for pushed in {id(p): p for p in (pushed_k, pushed_v) if p}.values():
            for old in reversed(pushed[1]):   # the old layout ops, then the old cat (now without users)
                gm.graph.erase_node(old)
        changed.append(n.name)
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed
