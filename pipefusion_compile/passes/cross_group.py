"""Attention between two token groups kept in separate tensors.

A model may carry a second token stream in its own tensor next to the image tokens: LTX-2's audio, register
tokens. It starts GLOBAL (it does not depend on the image tokens) and becomes a token group of its own as soon
as its queries attend over the image keys. From then on it is one more piece of the step, like the text of a
joint [image | text] attention (`pieces.TAIL`): it runs once per step, after the image bands, so its queries
read the image K/V of this step, all fresh. Image queries over that stream's keys read the K/V its piece
wrote, which in a band is last step's (stale), as image queries read the text K/V of a joint attention.

Two forms, one mixing rule (`MixingRule.STALE_KV_CROSS_GROUP`), one K/V cache per attention, sized like its
keys:
    stream queries (GLOBAL, or of the TAIL group) over image keys -> output of the TAIL group;
        bands write their image rows of K/V, the TAIL piece reads the whole cache;
    image queries over keys of one extra group (HEAD or TAIL only) -> image output;
        the group's piece writes the K/V, the bands read the whole cache.
In a FULL piece (warmup, or M = 1) the node writes the whole K/V and reads it back: the plain attention.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .meta import Kind, MixingRule, TokenInfo, TokenRule, cache_placeholders, example_value, node_meta
from .pieces import PieceKind, group_offset
from .sdpa import is_sdpa, sdpa_qkv, set_sdpa_kv

CROSS_GROUP = "cross-group"   # `TokenInfo.attention` of such a node


def _extra_group_only(info: TokenInfo) -> bool:
    """A token-carrying value that holds one extra token group and no image part."""
    return info.carries_tokens and info.epr == 0 and bool(info.prefix or info.suffix) and info.outer == 1


def _image_only(info: TokenInfo) -> bool:
    return info.carries_tokens and info.epr > 0 and not info.joint and info.outer == 1


def cross_group_kind(iq: TokenInfo, ik: TokenInfo, iv: TokenInfo) -> str | None:
    """"stream-queries" / "image-queries" when the attention's query and keys lie in different token groups
    in the forms above, None otherwise (the caller's other rules decide)."""
    if ik.carries_tokens and iv.carries_tokens and (ik.epr, ik.prefix, ik.suffix) == (iv.epr, iv.prefix, iv.suffix):
        if _image_only(ik) and (not iq.carries_tokens and iq.kind is not Kind.REDUCED or _extra_group_only(iq)):
            return "stream-queries"
        if _extra_group_only(ik) and _image_only(iq):
            return "image-queries"
    return None


def rule_cross_group_attention(ctx, q: fx.Node, k: fx.Node, v: fx.Node, iq: TokenInfo, ik: TokenInfo,
                               mask, form: str) -> TokenInfo:
    """The token info of an attention between two token groups (`cross_group_kind` gave `form`)."""
    nq = len(ctx.out_shape())
    for t, it in ((k, ik), (v, ik)):
        if it.axis != len(example_value(t).shape) - 2:
            raise ctx.fail("attention between two token groups whose keys carry tokens off the sequence axis")
    if mask is not None:
        raise ctx.fail("attention between two token groups with a mask (the mask's query or key axis would "
                       "have to follow the pieces); only unmasked attention is supported")
    if ctx.arg(5, "is_causal", False):
        raise ctx.fail("causal attention between two token groups")
    if form == "stream-queries":
        if iq.carries_tokens and iq.prefix:
            raise ctx.fail("queries of the token group before the image over image keys: that group's piece runs "
                           "before the bands and would read only stale image K/V; only a stream after the image "
                           "is supported")
        if iq.carries_tokens and iq.axis != nq - 2:
            raise ctx.fail("attention query carries tokens off the sequence axis")
        length = ctx.out_shape()[nq - 2]
        return ctx.analysis.make_info(ctx.node, nq - 2, TokenRule.ATTENTION_STREAM_QUERIES, kind=Kind.MIXING,
                                      attention=CROSS_GROUP, suffix=length, mixing=MixingRule.STALE_KV_CROSS_GROUP)
    if iq.axis != nq - 2:
        raise ctx.fail("attention query carries tokens off the sequence axis")
    return ctx.patched(iq.axis, TokenRule.ATTENTION_IMAGE_QUERIES, attention=CROSS_GROUP, kind=Kind.MIXING,
                       mixing=MixingRule.STALE_KV_CROSS_GROUP)


def is_cross_group(n: fx.Node) -> bool:
    info = node_meta(n).token
    return is_sdpa(n) and info is not None and info.mixing is MixingRule.STALE_KV_CROSS_GROUP


def query_side(n: fx.Node) -> tuple[int, int]:
    """(prefix, suffix) of the extra group a cross-group attention reads or writes (the one that is not the
    image): which extra piece a step needs for it."""
    q, k, _ = sdpa_qkv(n)
    info = node_meta(n).token
    if info.epr == 0:       # stream queries: the output is the stream's group
        return info.prefix, info.suffix
    kinfo = node_meta(k).token
    return kinfo.prefix, kinfo.suffix


def rewrite_cross_group_attention(gm: fx.GraphModule, kind: PieceKind) -> fx.GraphModule:
    """Point every cross-group attention at its K/V cache, written where its keys are computed. Runs before
    `select_group`, which then keeps the write in the piece that holds the keys and the attention in the
    piece that holds the queries (a FULL piece keeps both, the write first).

    Before (register queries over image keys):     After:
        %k = linear(%img, ...)        image            %k = linear(%img, ...)
        %v = linear(%img, ...)        image            %v = linear(%img, ...)
        %o = sdpa(%q_reg, %k, %v)     TAIL group       %u = pipefusion.kv_cache_update(%o_cache_k, %o_cache_v,
                                                                %k, %v, %row_start, 2, 4, 0)      image
                                                       %o = sdpa(%q_reg, %o_cache_k, %o_cache_v)  TAIL group
    The band piece keeps `%k, %v, %u`, the TAIL piece `%o` over the caches. Image queries over the stream's
    keys are the mirror image: the TAIL piece writes (per_row 0: the whole group at 0), the bands read.
    """
    caches, row_start = cache_placeholders(gm)
    for n in list(gm.graph.nodes):
        if not is_cross_group(n):
            continue
        ck, cv = caches[(n.name, "k")], caches[(n.name, "v")]
        spec = node_meta(ck).extra["cache_of"]
        _, k, v = sdpa_qkv(n)
        offset = group_offset(spec.prefix, spec.suffix, spec.shape[spec.axis], kind)
        with gm.graph.inserting_before(n):
            upd = gm.graph.call_function(torch.ops.pipefusion.kv_cache_update.default,
                                         (ck, cv, k, v, row_start, spec.axis, spec.per_row, offset))
        upd.meta["stack_trace"] = n.meta.get("stack_trace")
        node_meta(upd).token = node_meta(k).token   # held by the piece that holds the keys
        node_meta(upd).extra["cache_write_of"] = n.name
        set_sdpa_kv(n, ck, cv)
    gm.graph.lint()
    gm.recompile()
    return gm
