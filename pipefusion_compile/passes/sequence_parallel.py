"""Sequence parallelism inside a stage: the pass that puts Ulysses' all-to-alls around each stale-K/V attention.

With `sequence_parallel = P` every stage runs on P ranks; rank r runs part r of every image band
(`pieces.sub_band`) and keeps heads [r*H/P, (r+1)*H/P) of every K/V cache (`sp_cache_specs`). The runtime ops are
in `ulysses.py`. The pass runs on a piece graph after `rewrite_stale_attention` (and the shape check):

A band part (`piece.split`: the rows of each rank's part of the band), P = 2, rank 1, 4 rows per part, 8 per row:

    Before:                                            After:
        %u = kv_cache_update(%ck, %cv, %k, %v,             %s = pipefusion.sp_scatter_heads(%q, %k, %v, [32, 32], g, 2)
                 %row_start, 2, 8, 0)                      %q2, %k2, %v2 = %s[0], %s[1], %s[2]     # whole band, H/2 heads
        %o = sdpa(%q, %ck, %cv)                            %u = kv_cache_update(%ck, %cv, %k2, %v2, %row_start, 2, 8, -32)
        %y = transpose(%o, 1, 2)                           %o = sdpa(%q2, %ck, %cv)
                                                           %g = pipefusion.sp_gather_heads(%o, [32, 32], g, 2)
                                                           %y = transpose(%g, 1, 2)
    (the band starts 32 elements before this rank's part: the write lands at the band's rows)

A piece every rank of the stage runs whole (HEAD / TAIL: the text of a joint sequence; FULL: its warmup):

        %u = kv_cache_update(%ck, %cv, %k, %v, ...)        %qh = narrow(%q, 1, 4, 4) ... %kh, %vh likewise
        %o = sdpa(%q, %ck, %cv)                            %u = kv_cache_update(%ck, %cv, %kh, %vh, ...)
                                                           %o = sdpa(%qh, %ck, %cv)
                                                           %a = pipefusion.sp_all_gather_heads(%o, g, 1)

Refused, naming the node: an attention with a mask (its query axis would have to follow the all-to-all),
heads that P does not divide, and token-mixing ops other than plain self-attention (halo convs, stale
reductions, attention between token groups, keys written operand by operand, a folded frames axis).
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import ulysses  # noqa: F401  (registers torch.ops.pipefusion.sp_*)
from ..errors import OptionsError, UnsupportedGraphError, describe_node
from .meta import MixingRule, cache_placeholders, node_meta
from .pieces import BAND, Piece
from .sdpa import is_sdpa, sdpa_qkv
from .stage_split import CacheSpec

_UPDATE = torch.ops.pipefusion.kv_cache_update.default


@dataclass(frozen=True)
class SequenceParallel:
    """What one rank lowers for: P ranks per stage, its index among them, and its group's key (`ulysses`)."""

    degree: int
    rank: int
    group_key: str


def _heads(node: fx.Node, axis: int) -> int | None:
    val = node.meta.get("example_value", node.meta.get("val"))
    return int(val.shape[axis - 1]) if isinstance(val, torch.Tensor) and val.dim() > axis - 1 >= 0 else None


def check_heads(gm: fx.GraphModule, degree: int) -> None:
    """Every self-attention of the dynamo graph has query and key heads that `degree` divides."""
    for n in gm.graph.nodes:
        if not is_sdpa(n) or node_meta(n).token is None or node_meta(n).token.attention != "self":
            continue
        for what, t in zip(("query", "key"), sdpa_qkv(n)[:2]):
            val = t.meta.get("example_value")
            if not isinstance(val, torch.Tensor) or val.dim() != 4:
                raise UnsupportedGraphError(
                    f"sequence_parallel={degree}: the {what} of this attention is not [batch, heads, tokens, dim] "
                    "(Ulysses splits the heads axis)", n)
            if val.shape[1] % degree:
                raise OptionsError(
                    f"option sequence_parallel={degree}: the attention {n.name} has {val.shape[1]} {what} heads, "
                    f"which {degree} ranks cannot share (Ulysses gives each rank heads / sequence_parallel); "
                    f"use a sequence_parallel that divides {val.shape[1]}\n  node: {describe_node(n)}")


def sp_cache_specs(caches: list[CacheSpec], degree: int, nodes_by_name: dict[str, fx.Node]) -> list[CacheSpec]:
    """Each rank's K/V caches: heads / degree of every self-attention's (the heads axis precedes the tokens').
    Any other mixing cache is refused: Ulysses here is built for self-attention."""
    out = []
    for spec in caches:
        node = nodes_by_name.get(spec.attention)
        if spec.rule is not MixingRule.STALE_KV:
            raise UnsupportedGraphError(
                f"sequence_parallel={degree}: this token-mixing op is handled by the rule {spec.rule.name}; "
                "sequence parallelism inside a stage (Ulysses) is built for self-attention only; use "
                "sequence_parallel=1 for this model", node)
        if spec.outer > 1:
            raise UnsupportedGraphError(
                f"sequence_parallel={degree}: this attention's token axis folds frames and rows (a band is the same "
                "rows of every frame); Ulysses over such bands is not built yet", node)
        shape = list(spec.shape)
        shape[spec.axis - 1] //= degree
        out.append(dataclasses.replace(spec, shape=tuple(shape)))
    return out


def rewrite_sequence_parallel(gm: fx.GraphModule, piece: Piece, sp: SequenceParallel) -> fx.GraphModule:
    """Ulysses around every self-attention over the caches (see the module docstring)."""
    caches, _ = cache_placeholders(gm)
    g = gm.graph
    for n in list(g.nodes):
        if not is_sdpa(n):
            continue
        q, k, v = sdpa_qkv(n)
        spec_node = next((ph for (att, which), ph in caches.items() if ph is k and which == "k"), None)
        if spec_node is None:
            continue   # cross-attention over the prompt: local to each rank's part
        spec: CacheSpec = node_meta(spec_node).extra["cache_of"]
        updates = [u for u in k.users if u.target is _UPDATE]
        if len(updates) != 1 or updates[0].args[0] is not k or updates[0].args[1] is not v:
            raise UnsupportedGraphError(
                f"sequence_parallel={sp.degree}: this attention's keys are written into its cache in "
                f"{len(updates)} parts (keys concatenated from K/V computed apart); Ulysses over them is not "
                "built yet", n)
        if _arg(n, 3, "attn_mask") is not None or _arg(n, 5, "is_causal", False):
            raise UnsupportedGraphError(
                f"sequence_parallel={sp.degree}: an attention with a mask (or causal): its query axis would have "
                "to follow the all-to-all; only unmasked attention is built", n)
        upd = updates[0]
        axis = spec.axis
        _, _, uk, uv, row_start, u_axis, per_row, *rest = upd.args
        offset = rest[0] if rest else 0
        if piece.kind is BAND and piece.split:
            sizes = [rows * spec.per_row for rows in piece.split]
            with g.inserting_before(upd):
                sc = g.call_function(torch.ops.pipefusion.sp_scatter_heads.default,
                                     (q, uk, uv, sizes, sp.group_key, axis, n.name))
                q2, k2, v2 = (g.call_function(operator.getitem, (sc, i)) for i in range(3))
            upd.args = (upd.args[0], upd.args[1], k2, v2, row_start, u_axis, per_row,
                        offset - sum(sizes[:sp.rank]), *rest[1:])
            _set_query(n, q2)
            with g.inserting_after(n):
                back = g.call_function(torch.ops.pipefusion.sp_gather_heads.default,
                                       (n, sizes, sp.group_key, axis, n.name))
        else:
            with g.inserting_before(upd):
                sliced = []
                for t in (q, uk, uv):
                    heads = _heads(t, axis)
                    if heads is None:
                        raise UnsupportedGraphError("internal: sequence_parallel: an attention operand without its "
                                                    "traced value (its heads are not known)", n)
                    share = heads // sp.degree
                    sliced.append(g.call_function(torch.narrow, (t, axis - 1, sp.rank * share, share)))
            upd.args = (upd.args[0], upd.args[1], sliced[1], sliced[2], *upd.args[4:])
            _set_query(n, sliced[0])
            with g.inserting_after(n):
                back = g.call_function(torch.ops.pipefusion.sp_all_gather_heads.default,
                                       (n, sp.group_key, axis - 1, n.name))
        back.meta["stack_trace"] = n.meta.get("stack_trace")
        n.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    g.lint()
    gm.recompile()
    return gm


def _arg(n: fx.Node, i: int, name: str, default=None):
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def _set_query(n: fx.Node, q: fx.Node) -> None:
    if n.args:
        n.args = (q, *n.args[1:])
    else:
        n.kwargs = {**n.kwargs, "query": q}
