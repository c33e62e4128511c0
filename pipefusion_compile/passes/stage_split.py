"""Stage split: the stage interface and the graphs one stage is cut into, out of the analyzed dynamo graph.

Holds what the runtimes read of a lowered stage (`StageInput` and where its value comes from, `InputSource`;
the mixing caches, `CacheSpec`; `PieceGraph`; `LoweredStage`) and the passes over the whole dynamo graph that
make a stage's graphs:

    check_lowerable        refuse what the piece lowering cannot express (a model output holding text
                           tokens next to image tokens, a reduction over the tokens as a model output)
    detach_fresh_tensors   a fresh tensor made from a token-carrying one only for its dtype and device no
                           longer reads it (the hoisted globals graph never sees tokens)
    extract_stage          copy the stage's token-carrying nodes; everything they read from outside becomes a
                           placeholder (received value, hoisted global, sliced positional table, sliced image
                           input); every token-mixing node gets its cache placeholders
    extract_globals        the GLOBAL / POSITIONAL values the stage reads, hoisted out of the patch loop
                           (computed once per step from the model inputs), with the in-place writes they need

and the stage-output names of a piece graph's values (`output_names`), which the passes that replace a
returned value keep. The passes on a stage graph that make one piece's graph are in `piece_rewrites.py` and
`output_fusion.py`; `lower.py` composes them all.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..errors import PipefusionError, UnsupportedGraphError
from .meta import META_KEY, Kind, MixingRule, NodeMeta, ValueEnum, example_value, node_meta
from .pieces import BAND, FULL, Piece, token_range
from .sdpa import sdpa_qkv
from .side_effects import mutation_closure
from .tokens import TokenAnalysis


class InputSource(ValueEnum):
    """Where the value of a stage input comes from. A str, printed as its value ("recv")."""

    RECV = "recv"               # computed by an earlier stage, received per piece
    GLOBAL = "global"           # hoisted: computed once per step by the stage's globals graph
    POSITIONAL = "positional"   # a positional table from the globals graph, sliced per piece
    IMAGE = "image"             # a graph input that carries the image tokens, sliced per piece


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
# Extract a stage


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



def _reduced_operands(n: fx.Node) -> list[tuple[int, fx.Node]]:
    """(argument position, node) of the token-carrying operands of a reduction over the tokens; an einsum's
    operands count from its first tensor (position 0 after the equation)."""
    args = list(n.args[1:] if n.target in (torch.einsum, torch.functional.einsum) else n.args)
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return [(i, a) for i, a in enumerate(args)
            if isinstance(a, fx.Node) and node_meta(a).token is not None and node_meta(a).token.carries_tokens]


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
# Before the split: what the lowering refuses, fresh tensors that read tokens only for their dtype


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
