"""Lowering: from the analyzed dynamo graph and a plan to per-stage graphs.

For stage k this module builds
  * a *globals* graph: the GLOBAL/POSITIONAL values the stage reads, hoisted out of the patch loop
    (computed once per step from the model inputs), and
  * a *piece* graph per kind of piece (`pieces.py`: the full sequence for warmup, one per distinct band
    height, the text of a joint sequence), composed of passes, each a function over a GraphModule:

        extract_stage          copy the stage's token-carrying nodes; everything they read from outside
                               becomes a placeholder (received value, hoisted global, sliced positional
                               table, sliced image input); self-attention gets two cache placeholders
        select_group           keep, of every value, the token group the piece holds (image band or text):
                               `cat` of text and image along the token axis -> the piece's operand, slices
                               that select a group -> their input, values without the group -> removed
        rewrite_stale_attention   sdpa(q, k, v)  ->  pipefusion.kv_cache_update(ck, cv, k, v, row_start)
                                                     sdpa(q, ck, cv)
        rewrite_halo_convs     conv(x, w, pad=1) ->  h = pipefusion.halo_rows(cx, x, row_start, ...)
                                                     conv(h, w, pad=0 along the rows)
        rewrite_stale_reductions  matmul(v, k) over the tokens -> pipefusion.cache_rows(cv, v, row_start, ...)
                                                     pipefusion.cache_rows(ck, k, ...); matmul(cv, ck)
        rewrite_token_sizes    sizes dynamo baked into reshape/view/expand/unflatten, at the axis the token
                               analysis says carries tokens, become the piece's extent (`rows * per_row`)
        fuse_unpatchify_output the last stage returns a model output that ends in diffusers' unpatchify in token
                               layout; the runtime writes it with `pipefusion.write_unpatchified`

  then `propagate_patch_shapes` runs the patch graph on fake tensors and checks every token-carrying value
  has the patch's shape (a constant that measures tokens and was missed fails here, at compile time).
"""
from __future__ import annotations

import enum
import logging
import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .. import ops  # noqa: F401  (registers torch.ops.pipefusion.*)
from ..errors import PipefusionError, UnsupportedGraphError
from .autocast import autocast_scopes, restore_autocast
from .cross_group import rewrite_cross_group_attention
from .meta import (META_KEY, Kind, MixingRule, NodeMeta, TokenInfo, TokenRule, cache_placeholders, example_value,
                   node_meta)
from .pieces import BAND, FULL, HEAD, Piece, PieceKind, extent, group_offset, holds, token_range
from .sample_rules import rewrite_sample_splits
from .sdpa import is_sdpa, sdpa_qkv, set_sdpa_kv
from .side_effects import alias_root, check_kept, is_impure, mutated_operand, mutation_closure
from .tokens import TokenAnalysis

log = logging.getLogger("pipefusion_compile")



class InputSource(str, enum.Enum):
    """Where the value of a stage input comes from. A str, printed as its value ("recv")."""

    RECV = "recv"               # computed by an earlier stage, received per piece
    GLOBAL = "global"           # hoisted: computed once per step by the stage's globals graph
    POSITIONAL = "positional"   # a positional table from the globals graph, sliced per piece
    IMAGE = "image"             # a graph input that carries the image tokens, sliced per piece

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return self.value.__format__(spec)


@dataclass(frozen=True)
class StageInput:
    """One placeholder of a patch graph (after `row_start`) and where its value comes from."""

    name: str                   # node name in the dynamo graph
    source: InputSource         # RECV (earlier stage), GLOBAL, POSITIONAL or IMAGE (sliced input)
    axis: int | None = None     # token axis, for RECV / POSITIONAL / IMAGE
    per_row: int | None = None  # elements per token row along `axis`
    prefix: int = 0             # text elements before / after the image part along `axis` (joint sequences)
    suffix: int = 0
    outer: int = 1              # > 1: `axis` is `outer` blocks (folded with the dims before it: frames, batch x
                                # positions), a piece the same rows of each block; `per_row` counts all blocks

    def token_range(self, token_rows: int, piece: Piece) -> tuple[int, int]:
        """(start, length) of the full-sequence value that `piece` reads (length over all `outer` slices;
        start within one slice)."""
        if self.outer == 1:
            return token_range(self.prefix, self.suffix, self.per_row, token_rows, piece)
        start, length = token_range(self.prefix, self.suffix, self.per_row // self.outer, token_rows, piece)
        return start, length * self.outer

    def narrow(self, full: torch.Tensor, token_rows: int, piece: Piece) -> torch.Tensor:
        """The part of the full-sequence value `full` that `piece` reads: on a folded axis, the piece's range
        of each of the `outer` slices (`[outer * S, ...]` -> `[outer * length, ...]`)."""
        if piece.kind == FULL:
            return full
        start, length = self.token_range(token_rows, piece)
        if self.outer == 1:
            return full.narrow(self.axis, start, length)
        per_slice = full.unflatten(self.axis, (self.outer, -1)).narrow(self.axis + 1, start, length // self.outer)
        return per_slice.flatten(self.axis, self.axis + 1)


@dataclass(frozen=True)
class CacheSpec:
    """The mixing cache of one token-mixing node: full size, each patch writes its rows before reading it.
    STALE_KV (self-attention): two buffers, K and V. HALO_ROWS (a conv over token rows): one, the conv's
    input, read with `halo` elements before and after the patch."""

    attention: str    # the mixing node (an attention, a conv)
    shape: tuple[int, ...]
    dtype: torch.dtype
    axis: int
    per_row: int
    prefix: int = 0   # text elements before / after the image part (joint attention)
    suffix: int = 0
    rule: MixingRule = MixingRule.STALE_KV
    halo: tuple[int, int] = (0, 0)
    operand: int = 0  # HALO_ROWS / STALE_INPUTS: which argument of the node it caches (one spec per operand)
    outer: int = 1    # > 1: the token axis is `outer` blocks (frames), a patch the same rows of each

    @property
    def buffers(self) -> tuple[str, ...]:
        """The cache tensors, in placeholder order (runtimes allocate one zero tensor of `shape` each)."""
        return ("k", "v") if self.rule is MixingRule.STALE_KV else (f"x{self.operand}",)

    @property
    def nbytes(self) -> int:
        return len(self.buffers) * math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class PieceGraph:
    """The stage's graph for one kind of piece: called as `gm(row_start, *inputs, *caches)`."""

    gm: fx.GraphModule
    inputs: tuple[StageInput, ...]   # the stage inputs this piece reads (a subset, in stage-input order)
    outputs: tuple[str, ...]         # the stage outputs this piece produces
    unpatchified: dict[str, int] = field(default_factory=dict)
    """Model outputs returned in token layout [B, rows * w, p * p * C] (the unpatchify was fused into the
    write into the full output: `pipefusion.write_unpatchified`), with their patch size p."""


@dataclass
class LoweredStage:
    index: int
    globals_gm: fx.GraphModule
    global_inputs: tuple[int, ...]   # positions of the dynamo graph's placeholders it reads
    global_outputs: tuple[str, ...]
    inputs: tuple[StageInput, ...]
    caches: tuple[CacheSpec, ...]
    outputs: tuple[str, ...]
    stage_gm: fx.GraphModule         # full-sequence stage graph before the rewrites (for inspection)
    token_rows: int
    analysis: TokenAnalysis | None = field(repr=False, default=None)
    _build: Callable[[Piece], PieceGraph] = field(repr=False, default=None)
    _piece_graphs: dict[tuple, PieceGraph] = field(default_factory=dict, repr=False)

    def piece_graph(self, piece: Piece) -> PieceGraph:
        """The stage's graph for pieces like `piece` (built once per kind and size)."""
        if piece.key not in self._piece_graphs:
            self._piece_graphs[piece.key] = self._build(piece)
        return self._piece_graphs[piece.key]

    def patch_graph(self, rows: int) -> fx.GraphModule:
        """The stage's graph for an image band of `rows` token rows."""
        return self.piece_graph(Piece(BAND, 0, rows)).gm


# ----------------------------------------------------------------------------------------------------------
# Pass 1: extract a stage


def extract_stage(
    gm: fx.GraphModule, members: list[fx.Node], later_users: set[str], analysis: TokenAnalysis
) -> tuple[fx.GraphModule, tuple[StageInput, ...], tuple[CacheSpec, ...], tuple[str, ...]]:
    """Copy `members` (token-carrying nodes of one stage) into a new graph.

    Before (dynamo graph, stage 1 = the second block):        After:
        %h = add(%attn_out, %h_prev)          # stage 0            row_start, h_prev (recv), w_q (global), ...,
        %q = linear(%h, %w_q, %b_q)           # stage 1            attn_cache_k, attn_cache_v
        ...                                                        %q = linear(%h_prev, %w_q, %b_q) ...
                                                                   return (h_out,)
    Outputs are the members read by later stages or by the model output (`later_users`).
    """
    member_set = set(members)
    inputs: list[StageInput] = []
    seen: dict[fx.Node, None] = {}
    for n in members:
        for a in n.all_input_nodes:
            if a not in member_set and a not in seen:
                seen[a] = None
    for a in seen:
        info = node_meta(a).token
        if info.kind is Kind.REDUCED:
            raise UnsupportedGraphError("internal: a reduction over the tokens is read by a later stage (no cut "
                                        "may cross it)", a)
        if info.kind is Kind.POSITIONAL:
            inputs.append(StageInput(a.name, InputSource.POSITIONAL, info.axis, analysis.per_row(info), info.prefix,
                                     info.suffix, info.outer))
        elif info.carries_tokens:
            source = InputSource.IMAGE if a.op == "placeholder" else InputSource.RECV
            inputs.append(StageInput(a.name, source, info.axis, analysis.per_row(info), info.prefix, info.suffix,
                                     info.outer))
        else:
            inputs.append(StageInput(a.name, InputSource.GLOBAL))
    caches = []
    for n in members:
        info = node_meta(n).token
        if info.attention == "self":
            _, k, _ = sdpa_qkv(n)
            kinfo = node_meta(k).token
            val = example_value(k)
            caches.append(CacheSpec(n.name, tuple(val.shape), val.dtype, kinfo.axis, analysis.per_row(kinfo),
                                    kinfo.prefix, kinfo.suffix, outer=kinfo.outer))
        elif info.mixing is MixingRule.STALE_KV_CROSS_GROUP:   # a K/V cache sized like its keys
            _, k, _ = sdpa_qkv(n)
            kinfo, val = node_meta(k).token, example_value(k)
            caches.append(CacheSpec(n.name, tuple(val.shape), val.dtype, kinfo.axis, analysis.per_row(kinfo),
                                    kinfo.prefix, kinfo.suffix))
        elif info.mixing is MixingRule.HALO_ROWS:
            x = n.args[0]
            xinfo, val = node_meta(x).token, example_value(x)
            caches.append(CacheSpec(n.name, tuple(val.shape), val.dtype, xinfo.axis, analysis.per_row(xinfo),
                                    rule=MixingRule.HALO_ROWS, halo=info.halo))
        elif info.mixing is MixingRule.STALE_INPUTS:
            for i, x in _reduced_operands(n):
                xinfo, val = node_meta(x).token, example_value(x)
                caches.append(CacheSpec(n.name, tuple(val.shape), val.dtype, xinfo.axis, analysis.per_row(xinfo),
                                        rule=MixingRule.STALE_INPUTS, operand=i))

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    row_start = g.placeholder("row_start")
    node_meta(row_start).extra["row_start"] = True
    by_name = {a.name: a for a in seen}
    for inp in inputs:
        src = by_name[inp.name]
        ph = g.placeholder(inp.name)
        ph.meta.update({k: v for k, v in src.meta.items() if k in ("example_value", "val", "stack_trace")})
        ph.meta["pipefusion"] = node_meta(src)
        env[src] = ph
    for c in caches:
        for which in c.buffers:
            ph = g.placeholder(f"{c.attention}_cache_{which}")
            node_meta(ph).extra["cache_of"] = c
            node_meta(ph).extra["cache_which"] = which
    for n in members:
        new = g.node_copy(n, lambda a: env[a])
        new.meta["pipefusion"] = node_meta(n)
        env[n] = new
    outputs = tuple(n.name for n in members if n.name in later_users)
    g.output(tuple(env[n] for n in members if n.name in later_users))
    g.lint()
    return fx.GraphModule(gm, g), tuple(inputs), tuple(caches), outputs


# ----------------------------------------------------------------------------------------------------------
# The stage interface of a piece graph: output values by stage-output name


def output_names(gm: fx.GraphModule) -> tuple[str, ...]:
    """The stage-output name of each value a piece graph returns, in order.

    Stages exchange values by the name of the dynamo node that computes them (`StageInput.name`, the
    producer's `LoweredStage.outputs`). A pass may replace a returned value by another node (`select_group`
    replaces a `cat` of text and image by the piece's operand; `fuse_unpatchify_output` returns the value
    before the unpatchify): the value changes, its name in the stage interface does not. So the names are
    recorded on the output node before the first such pass and kept position by position.
    """
    out = next(iter(gm.graph.find_nodes(op="output")))
    names = out.meta.get(META_KEY)
    names = names.extra.get("output_names") if names is not None else None
    return names if names is not None else tuple(o.name for o in out.args[0])


def _set_output_values(gm: fx.GraphModule, values, names) -> None:
    """Return `values` under the stage-output `names` (one per value)."""
    out = next(iter(gm.graph.find_nodes(op="output")))
    if len(values) != len(names):
        raise PipefusionError(f"internal: {len(values)} stage outputs but {len(names)} output names")
    out.args = (tuple(values),)
    # a fresh NodeMeta: graph copies share the meta objects of the graph they were copied from
    out.meta[META_KEY] = NodeMeta(extra={"output_names": tuple(names)})


# ----------------------------------------------------------------------------------------------------------
# Pass 2: the piece's token group


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
# Pass 3: stale-K/V attention


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


def _reduced_operands(n: fx.Node) -> list[tuple[int, fx.Node]]:
    """(argument position, node) of the token-carrying operands of a reduction over the tokens; an einsum's
    operands count from its first tensor (position 0 after the equation)."""
    args = list(n.args[1:] if n.target in (torch.einsum, torch.functional.einsum) else n.args)
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return [(i, a) for i, a in enumerate(args)
            if isinstance(a, fx.Node) and node_meta(a).token is not None and node_meta(a).token.carries_tokens]


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
# Pass 4: sizes that measure the token axis


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


# ----------------------------------------------------------------------------------------------------------
# Pass 5: unpatchify fused into the output write


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


# ----------------------------------------------------------------------------------------------------------
# Globals graph


def extract_globals(gm: fx.GraphModule, needed: list[fx.Node], allow_write=lambda n: True,
                    writes: tuple[fx.Node, ...] = ()) -> tuple[fx.GraphModule, tuple[int, ...], tuple[str, ...]]:
    """The hoisted part of a stage: GLOBAL (and POSITIONAL, full-size) values computed once per step, with
    every in-place write into a value it keeps (`side_effects.mutation_closure`), in graph order.

    Before (dynamo graph):                          After (globals graph of the stage):
        %t = l_timestep_                                 def forward(l_timestep_, w1, b1, w_k, ...):
        %emb = linear(sin(..%t..), %w1, %b1)  GLOBAL         emb = linear(sin(...), w1, b1)
        %k2 = linear(%prompt, %w_k, %b_k)     GLOBAL         k2 = linear(prompt, w_k, b_k)
        %grid = repeat(...)                   GLOBAL         grid = repeat(...)
        setitem(%grid, (:, 0:1), %s)          (no users)     grid[:, 0:1] = s          # kept: grid is read
        %f = flatten(%grid, 2)                GLOBAL         f = flatten(grid, 2)
        %q = linear(%h, %w_q, ...)            PATCHED        return (emb, k2, f, w_q, ...)
    `allow_write(w)` may leave a write out (simulate mode applies a write into a graph input once per step,
    in the first stage's globals); `writes` are more writes to apply (into graph inputs no stage reads).
    """
    closure = mutation_closure(gm, set(needed) | set(writes), allow_write)
    for n in closure:
        if node_meta(n).token is not None and node_meta(n).token.in_stage:
            raise PipefusionError(f"internal: {n.name} carries tokens but was asked for as a global")
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    positions = []
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    for i, ph in enumerate(placeholders):
        if ph in closure:
            env[ph] = g.placeholder(ph.name)
            env[ph].meta.update(ph.meta)
            positions.append(i)
    for n in gm.graph.nodes:
        if n in closure and n.op != "placeholder":
            env[n] = g.node_copy(n, lambda a: env[a])
    g.output(tuple(env[n] for n in needed))
    g.lint()
    return fx.GraphModule(gm, g), tuple(positions), tuple(n.name for n in needed)


# ----------------------------------------------------------------------------------------------------------
# The lowering pipeline


def _run_pass(name: str, fn, gm: fx.GraphModule, *args) -> fx.GraphModule:
    log.debug("pipefusion pass %s: before\n%s", name, gm.graph)
    try:
        out = fn(gm, *args)
    except PipefusionError:
        raise
    except Exception as e:  # re-raise with the pass name
        raise PipefusionError(f"pass {name} failed: {type(e).__name__}: {e}") from e
    log.debug("pipefusion pass %s: after\n%s", name, (out[0] if isinstance(out, tuple) else out).graph)
    return out


_FRESH_FACTORIES = {"new_zeros": torch.zeros, "new_ones": torch.ones, "new_empty": torch.empty,
                    "new_full": torch.full}


def _detach_cast(gm: fx.GraphModule, n: fx.Node) -> bool:
    """`x.type_as(t)` / `x.to(t)` of a GLOBAL x with a token-carrying t (Cosmos: `emb.type_as(hidden_states)`):
    t lends only its dtype (and device), so the cast reads it no more: `x.to(dtype, device)`."""
    if n.op != "call_method" or n.target not in ("type_as", "to") or len(n.args) != 2:
        return False
    x, other = n.args
    if not isinstance(other, fx.Node) or not isinstance(example_value(other), torch.Tensor):
        return False
    info, oinfo = node_meta(n).token, node_meta(other).token
    if info is None or info.carries_tokens or oinfo is None or not oinfo.carries_tokens:
        return False
    val = example_value(other)
    n.args = (x,)
    n.target = "to"
    n.kwargs = {**n.kwargs, "dtype": val.dtype, "device": val.device}
    return True


def detach_fresh_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """A fresh tensor made from a token-carrying one only for its dtype and device (GLOBAL by the token
    analysis) must not read it in the hoisted globals graph, which never sees tokens.

    Before:                                        After:
        %t = new_zeros(%x, 1, 64, 32)  # x PATCHED     %t = zeros((1, 64, 32), dtype=float32, device=cpu)
        %e = type_as(%emb, %x)         # emb GLOBAL    %e = to(%emb, dtype=float32, device=cpu)
    """
    for n in list(gm.graph.nodes):
        if _detach_cast(gm, n):
            continue
        if n.op != "call_method" or n.target not in _FRESH_FACTORIES or not isinstance(n.args[0], fx.Node):
            continue
        src = node_meta(n.args[0]).token
        if src is None or not src.carries_tokens:
            continue
        val = example_value(n)
        kwargs = {k: v for k, v in n.kwargs.items() if k not in ("dtype", "device", "requires_grad")}
        rest = n.args[1:]
        if n.target == "new_full":
            sizes, fill = (rest[0], rest[1]) if len(rest) > 1 else (rest[0], kwargs.pop("fill_value"))
            args = (tuple(sizes), fill)
        else:
            args = (tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest),)
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(_FRESH_FACTORIES[n.target], args,
                                         {**kwargs, "dtype": val.dtype, "device": val.device})
        new.meta.update(n.meta)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm


def check_lowerable(gm: fx.GraphModule) -> None:
    """What the piece lowering cannot express yet, refused with the node that shows it: a model output that
    holds tokens of another group than the image (text, extra tokens) next to image tokens. An output of one
    group only (LTX-2's audio, a separate stream whose queries attend over the image) is written whole by
    that group's piece (`runtime._OutputSlot`)."""
    out = next(iter(gm.graph.find_nodes(op="output")))
    for n in out.all_input_nodes:
        info = node_meta(n).token
        if info is not None and info.carries_tokens and info.joint and info.epr > 0:
            raise UnsupportedGraphError("a model output that holds text tokens of a joint sequence", n)
        if info is not None and info.kind is Kind.REDUCED:
            raise UnsupportedGraphError("a model output that is a reduction over the image tokens (no token axis)", n)


def lower(gm: fx.GraphModule, plan, analysis: TokenAnalysis, shared_inputs: bool = False) -> list[LoweredStage]:
    """Build the globals graph and the piece-graph factory of every stage of `plan`.

    `shared_inputs`: all stages run in one process on the same graph inputs (simulate mode), so an in-place
    write into a graph input (a buffer, a parameter, an argument) runs once per step, in the globals of the
    first stage that reads it; with one process per stage, each stage's globals apply it to their own copy.
    A write into a graph input that no stage reads still runs (on the last stage): it is visible to the
    caller. Every write of the dynamo graph must end up in some extracted graph (`check_kept`).
    """
    check_lowerable(gm)
    _run_pass("detach_fresh_tensors", detach_fresh_tensors, gm)
    scopes = autocast_scopes(gm)
    nodes_by_name = {n.name: n for n in gm.graph.nodes}
    order = [nodes_by_name[name] for name in plan.order]
    position = {n.name: i for i, n in enumerate(order)}
    out_node = next(iter(gm.graph.find_nodes(op="output")))
    writes_to_inputs = [n for n in gm.graph.nodes if mutated_operand(n) is not None
                        and alias_root(mutated_operand(n)).op in ("placeholder", "get_attr")]
    applied: set[fx.Node] = set()   # writes into graph inputs some earlier stage's globals already apply
    last = len(plan.stages) - 1

    def allow_write(w: fx.Node) -> bool:
        return not (shared_inputs and w in applied)

    stages = []
    for sp in plan.stages:
        members = order[sp.start:sp.end]
        later = set()
        for n in members:
            for u in n.users:
                if u is out_node or (u.name in position and position[u.name] >= sp.end):
                    later.add(n.name)
        stage_gm, inputs, caches, outputs = _run_pass("extract_stage", extract_stage, gm, members, later, analysis)
        needed = [nodes_by_name[i.name] for i in inputs if i.source in (InputSource.GLOBAL, InputSource.POSITIONAL)]
        if sp.index == last:
            for leaf in out_node.all_input_nodes:
                if not node_meta(leaf).token.carries_tokens and leaf not in needed:
                    needed.append(leaf)
        unread = tuple(w for w in writes_to_inputs if w not in applied) if sp.index == last else ()
        globals_gm, positions, gouts = _run_pass("extract_globals", extract_globals, gm, needed, allow_write,
                                                 unread)
        globals_gm = restore_autocast(globals_gm, scopes)
        kept = {n.name for n in globals_gm.graph.nodes}
        applied.update(w for w in writes_to_inputs if w.name in kept)

        model_outputs = {n.name for n in out_node.all_input_nodes} if sp.index == len(plan.stages) - 1 else set()

        def build(piece: Piece, stage_gm=stage_gm, inputs=inputs, model_outputs=model_outputs,
                  stage_outputs=outputs, sp_index=sp.index) -> PieceGraph:
            graph = fx.Graph()
            graph.output(graph.graph_copy(stage_gm.graph, {}))
            g = fx.GraphModule(stage_gm, graph)
            g = _run_pass("rewrite_cross_group_attention", rewrite_cross_group_attention, g, piece.kind)
            g = _run_pass("select_group", select_group, g, piece.kind)
            g = _run_pass("rewrite_sample_splits", rewrite_sample_splits, g)
            g = _run_pass("rewrite_stale_attention", rewrite_stale_attention, g, piece.kind)
            whole = piece.kind == FULL or (piece.kind == BAND and piece.rows == analysis.token_rows)
            g = _run_pass("rewrite_halo_convs", rewrite_halo_convs, g, whole)
            g = _run_pass("rewrite_stale_reductions", rewrite_stale_reductions, g, whole)
            g = _run_pass("rewrite_token_sizes", rewrite_token_sizes, g, piece, analysis)
            g = _run_pass("propagate_patch_shapes", propagate_patch_shapes, g, piece, analysis)
            g, fused = _run_pass("fuse_unpatchify_output", fuse_unpatchify_output, g, model_outputs)
            g = _run_pass("restore_autocast", restore_autocast, g, scopes)
            names = output_names(g)
            if not set(names) <= set(stage_outputs):
                raise PipefusionError(
                    f"internal: the {piece.kind} piece graph of stage {sp_index} returns "
                    f"{sorted(set(names) - set(stage_outputs))}, which are not outputs of the stage")
            kept = {ph.target for ph in g.graph.find_nodes(op="placeholder")}
            return PieceGraph(g, tuple(i for i in inputs if i.name in kept), names, fused)

        stages.append(LoweredStage(
            index=sp.index, globals_gm=globals_gm, global_inputs=positions, global_outputs=gouts,
            inputs=inputs, caches=caches, outputs=outputs, stage_gm=stage_gm,
            token_rows=analysis.token_rows, analysis=analysis, _build=build,
        ))
    check_kept(gm, [g for st in stages for g in (st.globals_gm, st.stage_gm)], "the lowered stages")
    return stages
