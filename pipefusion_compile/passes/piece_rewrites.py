"""Piece rewrites: the passes that turn a stage's full-sequence graph (`stage_split.extract_stage`) into the
graph of one kind of piece (`pieces.py`), each a function over a GraphModule:

    select_group              keep, of every value, the token group the piece holds (image band or text):
                              `cat` of text and image along the token axis -> the piece's operand, slices that
                              select a group -> their input, values without the group -> removed
    rewrite_stale_attention   sdpa(q, k, v)  ->  pipefusion.kv_cache_update(ck, cv, k, v, row_start)
                                                 sdpa(q, ck, cv)
    rewrite_halo_convs        conv(x, w, pad=1) ->  h = pipefusion.halo_rows(cx, x, row_start, ...)
                                                    conv(h, w, pad=0 along the rows)
    rewrite_stale_reductions  matmul(v, k) over the tokens -> pipefusion.cache_rows(cv, v, row_start, ...)
                                                 pipefusion.cache_rows(ck, k, ...); matmul(cv, ck)
    rewrite_token_sizes       sizes dynamo baked into reshape/view/expand/unflatten, at the axis the token
                              analysis says carries tokens, become the piece's extent (`rows * per_row`)
    propagate_patch_shapes    runs the piece graph on fake tensors and checks every token-carrying value has
                              the piece's shape (a constant that measures tokens and was missed fails here, at
                              compile time); the graph is returned unchanged
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import ops  # noqa: F401  (registers torch.ops.pipefusion.*)
from ..errors import UnsupportedGraphError
from .meta import Kind, MixingRule, TokenInfo, TokenRule, cache_placeholders, example_value, node_meta
from .pieces import BAND, FULL, HEAD, Piece, PieceKind, extent, group_offset, holds
from .sdpa import is_sdpa, sdpa_qkv, set_sdpa_kv
from .side_effects import alias_root, mutated_operand
from .stage_split import CacheSpec, _reduced_operands, _set_output_values, output_names
from .tokens import TokenAnalysis


# ----------------------------------------------------------------------------------------------------------
# The piece's token group


def _image_operand(info: TokenInfo) -> bool:
    return info is not None and info.carries_tokens and info.epr > 0


def _group_extent(info: TokenInfo, kind: PieceKind) -> tuple[int, ...]:
    """What of a value's token axis belongs to pieces of `kind`, to compare a selection with its input."""
    return (info.epr,) if kind == BAND else (info.prefix if kind == HEAD else info.suffix,)


def _cat_tensors(n: fx.Node) -> list[fx.Node]:
    return list(n.args[0] if n.args else n.kwargs["tensors"])


def _global_kv_users(n: fx.Node) -> bool:
    """`n` is the key or value concatenation of an attention whose keys hold tokens computed without the
    image besides the image's own (`token_rules._global_key_groups`)."""
    return bool(n.users) and all(is_sdpa(u) and "global_kv" in node_meta(u).extra and n in sdpa_qkv(u)[1:]
                                 for u in n.users)


def select_group(gm: fx.GraphModule, kind: PieceKind) -> fx.GraphModule:
    """Keep, of every value, the part that pieces of `kind` (BAND: image rows, HEAD / TAIL: the tokens before /
    after the image, e.g. the text) hold.

    Before (Flux, text first):                     After, BAND:                  After, HEAD:
        %q = cat([%txt_q, %img_q], 1)  [txt|img]       (uses of %q -> %img_q)        (uses of %q -> %txt_q)
        %o = sdpa(%q, %k, %v)          [txt|img]       %o = sdpa(%img_q, ...)        %o = sdpa(%txt_q, ...)
        %s = split_with_sizes(%o', [6, 64], 1)         (removed)                     (removed)
        %t = getitem(%s, 0)            text            (removed)                     (uses of %t -> %o')
        %i = getitem(%s, 1)            image           (uses of %i -> %o')           (removed)
        %x = gelu(%t)                  text            (removed)                     %x = gelu(%o')
    Several operands on one side (`cat([%time_tok, %cls_tok, %img, %registers], 1)`, U-ViT with registers):
    the HEAD piece keeps `cat([%time_tok, %cls_tok], 1)`, the band `%img`, the TAIL piece `%registers`.
    A cat written in place (EasyAnimate's RoPE on the image part, `q = cat([txt_q, img_q], 2)` then
    `q[:, :, 6:] = rope(q[:, :, 6:])`) becomes a copy of the operand (`%img_q.clone()`), so the write never
    lands in the operand; the group slice `q[:, :, 6:]` of it is then the piece's whole value.
    A FULL piece keeps everything. The key and value concatenations of image queries over [image | text] keys
    (text K/V computed without the image tokens) stay as they are in a band: `rewrite_stale_attention` writes
    their operands into the cache (a HEAD or TAIL piece runs no such query: they go). Sizes are rewritten
    afterwards (`rewrite_token_sizes`); the outputs the piece does not hold are dropped from the graph output. An output that is replaced keeps its stage-output
    name (`output_names`): the next stage reads `%q` (its placeholder is named so), whatever node computes
    the piece's part of it here. Which outputs a piece holds is decided on the stage output's own token info,
    the same info the consuming stage's placeholder has, so producer and consumer agree on the values.
    """
    if kind == FULL:
        return gm
    g = gm.graph
    out = next(iter(g.find_nodes(op="output")))
    names = output_names(gm)
    held = [holds(node_meta(o).token, kind) for o in out.args[0]]

    def replace(n: fx.Node, by: fx.Node) -> None:
        n.replace_all_uses_with(by)
        g.erase_node(n)

    # the input each group selection reads in the whole graph: a `cat-joint` input is replaced by its operand on
    # the piece's side below, and the selection is judged on what it selected from, not on that operand
    selected_from = {n: n.args[0] for n in g.nodes if n.op in ("call_function", "call_method")
                     and node_meta(n).token is not None and node_meta(n).token.rule is TokenRule.GETITEM_GROUP}
    written = {alias_root(m) for m in map(mutated_operand, g.nodes) if m is not None}
    # each joint concatenation's operands as the whole graph has them: an operand that is itself a joint
    # concatenation (`cat([a, cat([b, img])])`, Framepack's history latents before the image) is replaced by its
    # own part first, and is judged by what it was
    operands = {n: [node_meta(t).token if isinstance(t, fx.Node) else None
                    for t in (n.args[0] if n.args else n.kwargs["tensors"])]
                for n in g.nodes if n.op in ("call_function", "call_method")
                and node_meta(n).token is not None and node_meta(n).token.rule is TokenRule.CAT_JOINT}
    for n in list(g.nodes):
        if n.op not in ("call_function", "call_method"):
            continue
        info = node_meta(n).token
        if info is None or not holds(info, kind):
            continue
        if info.rule is TokenRule.CAT_JOINT and kind == BAND and _global_kv_users(n):
            continue  # keys of image queries: the whole key sequence, written into the cache operand by operand
        if info.rule is TokenRule.CAT_JOINT:
            tensors = list(n.args[0] if n.args else n.kwargs["tensors"])
            image = next((i for i, t in enumerate(operands[n]) if t is not None and _image_operand(t)), None)
            if image is None:
                raise UnsupportedGraphError("internal: a concatenation of token groups without the image's", n)
            if kind == BAND:
                keep = [tensors[image]]
            else:  # the operands on the piece's side of the image operand, and that operand's own part there
                side = tensors[:image] if kind == HEAD else tensors[image + 1:]
                keep = [*side, tensors[image]] if kind == HEAD else [tensors[image], *side]
                keep = [t for t in keep if t is not tensors[image] or holds(operands[n][image], kind)]
            if len(keep) > 1:
                # several operands on one side (U-ViT: a time token and a class token before the image): the
                # piece concatenates them; the node's token info already measures that group
                if n.args:
                    n.args = (keep, *n.args[1:])
                else:
                    n.kwargs = {**n.kwargs, "tensors": keep}
                continue
            if len(keep) != 1 or not isinstance(keep[0], fx.Node):
                raise UnsupportedGraphError(
                    f"concatenation along the token axis with {len(keep)} operands holding the {kind} group", n)
            by = keep[0]
            if n in written:
                # `q = cat([txt_q, img_q]); q[:, :, 6:] = rope(...)` writes into the cat's own new tensor: the
                # piece writes into a copy of the operand, never into the operand (a stage input, say)
                with g.inserting_before(n):
                    by = g.call_method("clone", (by,))
                by.meta = dict(n.meta)
            replace(n, by)
        elif info.rule is TokenRule.GETITEM_GROUP:
            src = n.args[0]
            src_info = node_meta(selected_from[n]).token
            if src_info.joint and src_info.epr > 0:  # selects the piece's group out of a joint value
                if _group_extent(info, kind) != _group_extent(src_info, kind):
                    raise UnsupportedGraphError("selecting part of the text group of a joint sequence", n)
                replace(n, src)
        elif info.rule is TokenRule.SETITEM_GROUP:  # `x[:, :, text_len:] = f(...)`: a write into one token group
            part, pos = node_meta(n).extra["group_write"]
            if part != ("image" if kind == BAND else kind):
                g.erase_node(n)                 # the piece does not hold that group
                continue
            index = n.args[1]
            items = list(index) if isinstance(index, tuple) else [index]
            items[pos] = slice(None)            # the piece holds only that group: the whole axis
            n.args = (n.args[0], tuple(items) if isinstance(index, tuple) else items[0], n.args[2])
        elif n.target is operator.getitem and node_meta(n.args[0]).token.rule is TokenRule.SPLIT_GROUPS:
            split = n.args[0]
            src = split.args[0] if split.args else split.kwargs["input"]
            if _group_extent(info, kind) != _group_extent(node_meta(src).token, kind):
                raise UnsupportedGraphError("selecting part of the text group of a joint sequence", n)
            replace(n, src)
    _set_output_values(gm, [o for o, h in zip(out.args[0], held) if h], [m for m, h in zip(names, held) if h])
    for n in reversed(list(g.nodes)):
        if n.op not in ("call_function", "call_method"):
            continue
        info = node_meta(n).token
        # a split of token groups whose getitems were all replaced
        spent_split = info is not None and info.rule is TokenRule.SPLIT_GROUPS and not n.users
        if not holds(info, kind) or spent_split:
            if n.users:
                raise UnsupportedGraphError(
                    f"internal: {n.name} has no part in the {kind} piece but {next(iter(n.users)).name} reads it", n)
            g.erase_node(n)
    for ph in list(g.find_nodes(op="placeholder")):
        extra = node_meta(ph).extra
        if not ph.users and not extra.get("row_start") and "cache_of" not in extra:
            g.erase_node(ph)
    g.lint()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------------------------------------
# Stale-K/V attention, halo convs, stale reductions


def rewrite_stale_attention(gm: fx.GraphModule, kind: PieceKind = BAND) -> fx.GraphModule:
    """Every self-attention writes its fresh K/V into the caches, then attends over the whole caches.

    Before:                                        After:
        %attn = sdpa(%q, %k, %v)                       %u = pipefusion.kv_cache_update(%a_cache_k, %a_cache_v,
                                                                %k, %v, %row_start, 2, 4, 0)
                                                       %attn = sdpa(%q, %a_cache_k, %a_cache_v)
    The write lands at `offset + row_start * per_row`: an image band after the text that precedes it (Flux:
    offset = text length), the text piece at the text's place, the full sequence at 0.
    Cross-attention (GLOBAL K/V over the prompt) is left as it is.

    Image queries over keys concatenated from the image's K/V and K/V computed without the image (the
    prompt's text K/V: `"global_kv"` on the node; the cache covers the whole key sequence):

        %k = cat([%img_k, %txt_k], 2)                  %u = pipefusion.kv_cache_update(%a_cache_k, %a_cache_v,
        %v = cat([%img_v, %txt_v], 2)                           %img_k, %img_v, %row_start, 2, 4, 0)
        %attn = sdpa(%q, %k, %v)                        %w = pipefusion.kv_cache_update(%a_cache_k, %a_cache_v,
                                                                %txt_k, %txt_v, %row_start, 2, 0, 64)
                                                        %attn = sdpa(%q, %a_cache_k, %a_cache_v)
    The image band lands at its rows, each GLOBAL operand at its fixed place (per_row 0): every patch writes
    the text K/V of this step, so the text part of the keys is always fresh.

    A token axis of `outer` blocks (rows within frames, [B, heads, F * h * w, d]: a band is the same rows of
    every frame) is written through views that split the blocks off, at the band's rows of each block:
        %bk = unflatten(%a_cache_k, 2, (F, -1)) ... %k2 = unflatten(%k, 2, (F, -1)) ...
        %u = pipefusion.kv_cache_update(%bk, %bv, %k2, %v2, %row_start, 3, 4, 0)   # F=2, 8 = 2 x 4 per row
        %attn = sdpa(%q, %a_cache_k, %a_cache_v)
    """
    caches, row_start = cache_placeholders(gm)
    for n in list(gm.graph.nodes):
        if not is_sdpa(n):
            continue
        if node_meta(n).token.attention != "self":
            continue
        ck, cv = caches[(n.name, "k")], caches[(n.name, "v")]
        spec: CacheSpec = node_meta(ck).extra["cache_of"]
        offset = group_offset(spec.prefix, spec.suffix, spec.shape[spec.axis], kind)
        _, k, v = sdpa_qkv(n)
        layout = node_meta(n).extra.get("global_kv")
        if layout is None:
            writes = [(k, v, spec.per_row, offset)]
        else:  # operand by operand: the image rows at theirs, the GLOBAL operands at their fixed places
            image = spec.shape[spec.axis] - spec.prefix - spec.suffix
            writes, at = [], 0
            for kpart, vpart, extent in zip(_cat_tensors(k), _cat_tensors(v), layout):
                writes.append((kpart, vpart, 0 if extent else spec.per_row, at))
                at += extent or image
        with gm.graph.inserting_before(n):
            for kpart, vpart, per_row, at in writes:
                axis, dst = spec.axis, (ck, cv, kpart, vpart)
                if spec.outer > 1:
                    if at or layout is not None:
                        raise UnsupportedGraphError("internal: a folded token axis with another token group", n)
                    dst = tuple(gm.graph.call_method("unflatten", (t, axis, (spec.outer, -1))) for t in dst)
                    axis, per_row = axis + 1, per_row // spec.outer
                upd = gm.graph.call_function(
                    torch.ops.pipefusion.kv_cache_update.default, (*dst, row_start, axis, per_row, at),
                )
                upd.meta["stack_trace"] = n.meta.get("stack_trace")
        set_sdpa_kv(n, ck, cv)
        for cat in {k: None, v: None} if layout is not None else ():
            if not cat.users:
                gm.graph.erase_node(cat)
    gm.graph.lint()
    gm.recompile()
    return gm


def rewrite_stale_reductions(gm: fx.GraphModule, whole: bool = False) -> fx.GraphModule:
    """Every reduction over the tokens (STALE_INPUTS) writes its patch's rows of each token-carrying operand
    into that operand's full-size cache, then reduces over the caches: the tokens of patches done this step
    fresh, the others one step stale (as attention's K/V). A piece that holds every token row (`whole`: warmup,
    or the one band of M = 1) only writes the caches and reduces over its own operands, which are the caches'
    contents: the plain op on the plain operands, so it rounds exactly as the plain model does.

    Before (linear attention, a band of 16 of 64 tokens):       After:
        %s = matmul(%v, %k)   # [B, H, D, 16] @ [B, H, 16, D]       %w0 = pipefusion.cache_rows(%s_cache_x0, %v, %row_start, 3, 8)
                                                                    %w1 = pipefusion.cache_rows(%s_cache_x1, %k, %row_start, 2, 8)
                                                                    %s = matmul(%s_cache_x0, %s_cache_x1)   # all 64 tokens
    """
    caches: dict[tuple[str, int], fx.Node] = {}
    row_start = None
    for ph in gm.graph.find_nodes(op="placeholder"):
        extra = node_meta(ph).extra
        if "cache_of" in extra and extra["cache_of"].rule is MixingRule.STALE_INPUTS:
            caches[(extra["cache_of"].attention, extra["cache_of"].operand)] = ph
        if extra.get("row_start"):
            row_start = ph
    for n in list(gm.graph.nodes):
        info = node_meta(n).token if n.op in ("call_function", "call_method") else None
        if info is None or info.mixing is not MixingRule.STALE_INPUTS:
            continue
        for i, x in _reduced_operands(n):
            cache = caches[(n.name, i)]
            spec: CacheSpec = node_meta(cache).extra["cache_of"]
            with gm.graph.inserting_before(n):
                w = gm.graph.call_function(torch.ops.pipefusion.cache_rows.default,
                                           (cache, x, row_start, spec.axis, spec.per_row))
            w.meta["stack_trace"] = n.meta.get("stack_trace")
            if not whole:
                n.replace_input_with(x, cache)
    gm.graph.lint()
    gm.recompile()
    return gm


def rewrite_halo_convs(gm: fx.GraphModule, whole: bool = False) -> fx.GraphModule:
    """Every conv over token rows (HALO_ROWS) writes its patch's input rows into its cache and convolves the
    cache's rows with the halo, without padding along the rows, so it gives exactly the patch's output rows.

    Before (a band of 2 of 8 rows, [B, C, 2, 8], depthwise 3x3):     After:
        %y = conv2d(%x, %w, %b, (1, 1), (1, 1), (1, 1), 64)              %h = pipefusion.halo_rows(%y_cache_x, %x,
                                                                                  %row_start, 2, 1, 1, 1)  # [B, C, 4, 8]
                                                                         %y = conv2d(%h, %w, %b, (1, 1), (0, 1), (1, 1), 64)
    The rows above the band are this step's (earlier patches), those below it the previous step's, rows
    beyond the image zeros (the conv's own padding). Convs of a piece without image rows are not there. A piece
    that holds every token row (`whole`) writes the cache and runs the plain conv on its own input (the same
    rows, and the same rounding as the plain model).
    """
    caches: dict[str, fx.Node] = {}
    row_start = None
    for ph in gm.graph.find_nodes(op="placeholder"):
        extra = node_meta(ph).extra
        if "cache_of" in extra and extra["cache_of"].rule is MixingRule.HALO_ROWS:
            caches[extra["cache_of"].attention] = ph
        if extra.get("row_start"):
            row_start = ph
    for n in list(gm.graph.nodes):
        info = node_meta(n).token if n.op == "call_function" else None
        if info is None or info.mixing is not MixingRule.HALO_ROWS:
            continue
        cache = caches[n.name]
        spec: CacheSpec = node_meta(cache).extra["cache_of"]
        x, w = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs["weight"]
        k = example_value(w).dim() - 2
        sd = spec.axis - (example_value(x).dim() - k)
        if whole:
            with gm.graph.inserting_before(n):
                write = gm.graph.call_function(torch.ops.pipefusion.cache_rows.default,
                                               (cache, x, row_start, spec.axis, spec.per_row))
            write.meta["stack_trace"] = n.meta.get("stack_trace")
            continue
        with gm.graph.inserting_before(n):
            halo = gm.graph.call_function(
                torch.ops.pipefusion.halo_rows.default, (cache, x, row_start, spec.axis, spec.per_row, *spec.halo))
        halo.meta["stack_trace"] = n.meta.get("stack_trace")
        args = list(n.args) + [None] * (7 - len(n.args))
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        for i, key in enumerate(names):
            if key in n.kwargs:
                args[i] = n.kwargs[key]
        padding = args[4] if args[4] is not None else 0
        padding = list(padding) if isinstance(padding, (tuple, list)) else [padding] * k
        padding[sd] = 0
        args[0], args[4] = halo, tuple(padding)
        defaults = (None, None, None, 1, 0, 1, 1)
        n.args = tuple(a if a is not None else d for a, d in zip(args, defaults))
        n.kwargs = {}
    gm.graph.lint()
    gm.recompile()
    return gm


# ----------------------------------------------------------------------------------------------------------
# Sizes that measure the token axis


_SIZE_ARG_TARGETS = {"view", "reshape", "expand", "broadcast_to", torch.reshape, torch.broadcast_to}
_UNFLATTEN_TARGETS = {"unflatten", torch.unflatten}


def _sizes_location(node: fx.Node):
    """(container kind, key) for the size list of a shape op, or None if it takes no explicit sizes."""
    if node.target in _SIZE_ARG_TARGETS:
        for key in ("shape", "size"):
            if key in node.kwargs:
                return ("kwarg", key)
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list, torch.Size)):
            return ("arg", 1)
        if len(node.args) >= 2:
            return ("varargs", 1)
    if node.target in _UNFLATTEN_TARGETS:
        return ("unflatten", None)
    return None


def rewrite_token_sizes(gm: fx.GraphModule, piece: Piece, analysis: TokenAnalysis) -> fx.GraphModule:
    """Rewrite the baked-in sizes of token-carrying shape ops for `piece` (e.g. a band of `rows` token rows).

    Before (full sequence, 4 token rows of 4 tokens):     After (rows=2):
        %r = reshape(%h, shape=(-1, 4, 4, 2, 2, 8))           %r = reshape(%h, shape=(-1, 2, 4, 2, 2, 8))
        %o = reshape(%e, shape=(-1, 8, 8, 8))                 %o = reshape(%e, shape=(-1, 8, 4, 8))
    Only the size at the axis the token analysis assigned to the node's output changes; -1 stays -1. For a
    joint sequence the size counts the text too (70 = 6 text + 64 image): a band gets its rows' image part,
    the text piece the text part.
    """
    for n in gm.graph.nodes:
        if n.op not in ("call_function", "call_method"):
            continue
        info = node_meta(n).token
        if info is None or not info.carries_tokens or info.elements is not None:
            continue
        loc = _sizes_location(n)
        if loc is None:
            continue
        per_row = analysis.per_row(info)
        full = extent(info, per_row, analysis.token_rows, Piece(FULL))
        new = extent(info, per_row, analysis.token_rows, piece)
        kind, key = loc
        if kind == "unflatten":
            dim = n.args[1] if len(n.args) > 1 else n.kwargs["dim"]
            in_nd = example_value(n.args[0]).dim()
            dim = dim + in_nd if dim < 0 else dim
            sizes = list(n.args[2] if len(n.args) > 2 else n.kwargs["sizes"])
            idx = info.axis - dim
            if 0 <= idx < len(sizes):
                sizes[idx] = _replace_size(n, sizes[idx], full, new)
                if len(n.args) > 2:
                    n.args = (*n.args[:2], tuple(sizes), *n.args[3:])
                else:
                    n.kwargs = {**n.kwargs, "sizes": tuple(sizes)}
            continue
        if kind == "kwarg":
            sizes = list(n.kwargs[key])
        elif kind == "arg":
            sizes = list(n.args[1])
        else:
            sizes = list(n.args[1:])
        if any(isinstance(s, fx.Node) for s in sizes):
            raise UnsupportedGraphError("a shape argument computed at run time on a token-carrying tensor", n)
        if len(sizes) <= info.axis:
            continue
        sizes[info.axis] = _replace_size(n, sizes[info.axis], full, new)
        if kind == "kwarg":
            n.kwargs = {**n.kwargs, key: tuple(sizes)}
        elif kind == "arg":
            n.args = (n.args[0], tuple(sizes), *n.args[2:])
        else:
            n.args = (n.args[0], *sizes)
    gm.recompile()
    return gm


def _replace_size(node: fx.Node, old, full: int, new: int):
    if old == -1:
        return old
    if old != full:
        raise UnsupportedGraphError(
            f"size {old} at the token axis does not measure the {full} token elements the analysis expects",
            node,
        )
    return new


# ----------------------------------------------------------------------------------------------------------
# Verification


def _expected(info: TokenInfo, val, piece: Piece, analysis: TokenAnalysis):
    if info is None or not (info.carries_tokens or info.kind is Kind.POSITIONAL):
        return tuple(val.shape) if isinstance(val, torch.Tensor) else None
    if info.elements is not None:
        return tuple(_expected(e, v, piece, analysis) for e, v in zip(info.elements, val))
    shape = list(val.shape)
    shape[info.axis] = extent(info, analysis.per_row(info), analysis.token_rows, piece)
    return tuple(shape)


def propagate_patch_shapes(gm: fx.GraphModule, piece: Piece, analysis: TokenAnalysis) -> fx.GraphModule:
    """Run the piece graph on fake tensors of the piece's input shapes and check that every token-carrying
    value has the piece's shape. The graph is returned unchanged."""
    with FakeTensorMode():
        args = []
        for ph in gm.graph.find_nodes(op="placeholder"):
            extra = node_meta(ph).extra
            if extra.get("row_start"):
                args.append(torch.empty((), dtype=torch.int64))
            elif "cache_of" in extra:
                spec = extra["cache_of"]
                args.append(torch.empty(spec.shape, dtype=spec.dtype))
            else:
                val = example_value(ph)
                if isinstance(val, torch.Tensor):
                    shape = _expected(node_meta(ph).token, val, piece, analysis)
                    args.append(torch.empty(shape, dtype=val.dtype, device=val.device))
                else:
                    args.append(val)
        _CheckingInterpreter(gm, piece, analysis).run(*args)
    return gm


class _CheckingInterpreter(fx.Interpreter):
    def __init__(self, gm, piece, analysis):
        super().__init__(gm)
        self.piece = piece
        self.analysis = analysis

    def run_node(self, n):
        result = super().run_node(n)
        if n.op in ("call_function", "call_method"):
            info = node_meta(n).token
            if info is not None and info.carries_tokens and n.meta.get("example_value") is not None:
                want = _expected(info, n.meta["example_value"], self.piece, self.analysis)
                got = tuple(result.shape) if isinstance(result, torch.Tensor) else tuple(
                    tuple(r.shape) for r in result)
                if want != got:
                    raise UnsupportedGraphError(
                        f"per-patch lowering produced shape {got}, expected {want} for the piece "
                        f"{self.piece.index_name} (a size that measures tokens was not rewritten)",
                        n,
                    )
        return result
