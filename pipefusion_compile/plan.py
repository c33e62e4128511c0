"""`PipelinePlan`: what the backend decided, as a dataclass that prints as a table and that tests assert on.

`build_plan` composes the analyses (tokens, cost), the cut finder and a partition rule. It never runs the
model: everything comes from dynamo's fake example values.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .errors import PlanError, TooFewLayersError, source_line
from .options import PipefusionOptions
from .passes.canonical_attention import AttentionForm, attention_form
from .passes.cost import analyze_cost
from .passes.meta import MixingRule, example_value, node_meta
from .passes.partition import (
    CutCandidates,
    balanced_cuts,
    find_cut_candidates,
    layer_cuts,
    token_nodes,
    uniform_layers,
)
from .passes.cross_group import is_cross_group, query_side
from .passes.pieces import BAND, FULL, HEAD, TAIL, Piece, patch_bands, sub_band
from .passes.sdpa import sdpa_qkv
from .passes.tokens import TokenAnalysis, analyze_tokens

log = logging.getLogger("pipefusion_compile")


@dataclass(frozen=True)
class MixingOp:
    """One token-mixing op of the graph and the rule that pipelines it."""

    node: str
    form: AttentionForm      # how the model wrote it (rewritten to SDPA if it was not SDPA)
    rule: MixingRule
    stage: int
    source: str              # the user's source line, as dynamo recorded it ("" if none)


@dataclass(frozen=True)
class CrossingTensor:
    """A token-carrying value that one stage sends to a later one."""

    name: str
    shape: tuple[int, ...]        # full sequence
    patch_shape: tuple[int, ...]  # for the largest patch
    dtype: torch.dtype
    patch_bytes: int              # bytes per (largest) patch
    producer: int                 # stage that computes it
    consumer: int                 # last stage that reads it (num_stages for the model output)
    consumers: tuple[int, ...] = ()  # every later stage that reads it (each gets it straight from the producer)
    row_bytes: int = 0            # bytes per token row (image part)
    text_bytes: int = 0           # bytes of its text tokens (joint sequences), sent once per step


@dataclass(frozen=True)
class StagePlan:
    index: int
    start: int                            # first position in the token-node order
    end: int                              # one past the last
    attention_layers: tuple[int, ...]     # global indices of its self-attention layers
    flops: int                            # per step, full sequence, token-carrying ops
    global_flops: int                     # per step, hoisted GLOBAL ops this stage computes
    share: float                          # flops / total token-carrying flops
    kv_cache_bytes: int                   # every mixing cache of the stage (K/V, conv inputs, reduction inputs)
    modules: str                          # first..last attention module (display only)


@dataclass(frozen=True)
class CutPlan:
    after_stage: int
    position: int
    after_node: str
    tensors: tuple[CrossingTensor, ...]

    @property
    def patch_bytes(self) -> int:
        return sum(t.patch_bytes for t in self.tensors)


@dataclass(frozen=True)
class PipelinePlan:
    num_stages: int
    num_patches: int
    warmup_steps: int
    partition: str
    token_input: str
    token_axis: int
    input_rows: int
    granule: int
    patches: tuple[tuple[int, int], ...]   # (first token row, rows) per patch
    stages: tuple[StagePlan, ...]
    cuts: tuple[CutPlan, ...]
    total_flops: int
    self_attention: tuple[str, ...]
    cross_attention: tuple[str, ...]
    positional: tuple[str, ...]
    order: tuple[str, ...] = field(repr=False, default=())
    attention_positions: tuple[int, ...] = field(repr=False, default=())  # index in `order` per self-attention
    crossing: tuple[CrossingTensor, ...] = field(repr=False, default=())
    text: str | None = None   # joint sequence: other tokens (text, extra tokens) "first", "last" or "both" (before
                              # and after the image along the token axis); None: image only
    input_shape: tuple[int, ...] = ()  # the image input's shape (to say what a patch is)
    mixing: tuple[MixingOp, ...] = ()  # every op that mixes image tokens, with the rule that handles it
    sp_degree: int = 1   # sequence-parallel ranks per stage (Ulysses, `ulysses.py`): each runs one part of every band
    sp_rank: int = 0     # which part this program's ranks run (`pieces.sub_band`)

    @property
    def split(self) -> str:
        """Which axis the patches split, and why that makes each patch a contiguous token range."""
        if len(self.input_shape) == 5 and self.token_axis < 3:
            layout = "[B, C, F, H, W]" if self.token_axis == 2 else "[B, F, C, H, W]"
            return (f"bands of whole latent frames (axis {self.token_axis} of the {layout} video latent): tokens "
                    "run frame by frame, so whole frames are a contiguous token range (rows inside a frame are "
                    "not split yet, so M <= frames)")
        if len(self.input_shape) == 5:
            return (f"bands of latent rows (axis {self.token_axis}) of every frame of the video latent (fewer "
                    "latent frames than patches): a frame's tokens are in raster order, so a band is the same "
                    "token range of each frame (one range with one latent frame; K/V written frame by frame)")
        if len(self.input_shape) == 3:
            return (f"bands of the packed token sequence (axis {self.token_axis}): tokens are in raster order, "
                    "so a band of rows is a contiguous range")
        return (f"bands of latent rows (axis {self.token_axis}): tokens are in raster order, so a band of rows "
                "is a contiguous token range")

    def pieces(self, pipelined: bool) -> tuple[Piece, ...]:
        """The pieces one step runs, in order. Warmup: the whole sequence. Pipelined: the M image bands, plus
        for a joint text+image sequence the text piece at its place in the sequence (with M = 1 the whole
        joint sequence is the one patch, so a pipelined step equals the plain model).
        With sequence parallelism each image band is this program's part of it (`pieces.sub_band`); the text
        and the full sequence of a joint sequence are run whole by every rank of a stage."""
        if not pipelined or (self.text and self.num_patches == 1):
            return (Piece(FULL, 0, self.token_rows) if self.text else self._band(0, self.token_rows),)
        bands = tuple(self._band(r0, n) for r0, n in self.patches)
        head = (Piece(HEAD),) if self.text in ("first", "both") else ()
        tail = (Piece(TAIL),) if self.text in ("last", "both") else ()
        return (*head, *bands, *tail)

    def _band(self, row0: int, rows: int) -> Piece:
        band = Piece(BAND, row0, rows)
        return sub_band(band, self.sp_degree, self.sp_rank) if self.sp_degree > 1 else band

    def check_sequence_parallel(self) -> None:
        """Every band (and the whole image, which a warmup step runs as one band) splits into `sp_degree`
        parts of at least one token row."""
        smallest = min(n for _, n in self.patches)
        if self.sp_degree > smallest:
            rows = f"{smallest} row" + ("s" if smallest != 1 else "")
            raise PlanError(
                f"sequence_parallel={self.sp_degree} splits every band of token rows over the ranks of a stage, but "
                f"the smallest of the M={self.num_patches} bands has {rows}; use fewer patches "
                f"(num_patches <= {self.token_rows // self.sp_degree}) or a lower sequence_parallel")

    def p2p_bytes_per_step(self, stage: int, pipelined: bool = True) -> int:
        """Bytes stage `stage` sends to later stages per step: every patch of every value it produces, once
        per consuming stage. The same for warmup and pipelined steps (all token rows, once), except under
        sequence parallelism, where this rank sends its parts of the bands and the whole of what every rank of
        the stage runs whole (the text; a joint sequence's full warmup sequence)."""
        rows = sum(p.rows for p in self.pieces(pipelined) if p.kind in (BAND, FULL))
        return sum(
            (t.row_bytes * rows + t.text_bytes) * sum(1 for c in t.consumers if c < self.num_stages)
            for t in self.crossing if t.producer == stage
        )

    @property
    def token_rows(self) -> int:
        return self.input_rows // self.granule

    @property
    def max_min_ratio(self) -> float:
        flops = [s.flops for s in self.stages]
        return max(flops) / max(min(flops), 1)

    def stage_of(self, position: int) -> int:
        for s in self.stages:
            if s.start <= position < s.end:
                return s.index
        raise PlanError(f"position {position} lies in no stage of the plan (stages cover 0..{self.stages[-1].end - 1})")

    def __str__(self) -> str:
        gf = _fmt_flops
        lines = [
            f"PipeFusion plan: N={self.num_stages} stages, M={self.num_patches} patches, "
            f"warmup_steps={self.warmup_steps}, partition={self.partition}",
            f"image input {self.token_input}: axis {self.token_axis}, {self.input_rows} rows "
            f"= {self.token_rows} token rows x {self.granule}; "
            f"{len(self.self_attention)} self-attention, "
            + "".join(f"{n} {what}, " for n, what in (
                (sum(m.rule is MixingRule.LOCAL for m in self.mixing), "row-local attention"),
                (sum(m.rule is MixingRule.HALO_ROWS for m in self.mixing), "conv over rows"),
                (sum(m.rule is MixingRule.STALE_INPUTS for m in self.mixing), "reduction over tokens")) if n)
            + f"{len(self.cross_attention)} cross-attention layers"
            + (f"; positional: {_names(self.positional)}" if self.positional else ""),
            "",
            f"{'stage':>5}  {'attn layers':<12} {'FLOP/step':>10} {'share':>6} {'global FLOP':>12} "
            f"{'mix cache':>10}  modules",
        ]
        for s in self.stages:
            layers = f"{s.attention_layers[0]}-{s.attention_layers[-1]}" if s.attention_layers else "-"
            lines.append(
                f"{s.index:>5}  {layers:<12} {gf(s.flops):>10} {s.share:>6.1%} {gf(s.global_flops):>12} "
                f"{_fmt_bytes(s.kv_cache_bytes):>10}  {s.modules}"
            )
        lines.append(f"max/min stage FLOPs: {self.max_min_ratio:.3f}")
        if self.cuts:
            lines += ["", f"{'cut':>5}  {'after node':<24} tensors crossing (shape per patch, bytes per patch)"]
            for c in self.cuts:
                desc = "; ".join(_describe_crossing(t, self.num_stages) for t in c.tensors)
                lines.append(f"{c.after_stage:>3}|{c.after_stage + 1:<1}  {c.after_node:<24} {desc}")
        if self.mixing:
            lines += ["", f"{'stage':>5}  {'token-mixing op':<28} {'written as':<32} rule"]
            for m in self.mixing:
                lines.append(f"{m.stage:>5}  {m.node:<28} {m.form.value:<32} {m.rule.name}: {m.rule.value}"
                             + (f"\n{'':>7}{m.source}" if m.source else ""))
        lines += ["", "patches (token rows): " + ", ".join(f"[{r0}, {r0 + n})" for r0, n in self.patches),
                  f"split: {self.split}"]
        if self.text:
            where = {"first": "before the image bands (head)", "last": "after the image bands (tail)",
                     "both": "before (head) and after (tail) the image bands"}[self.text]
            lines.append(
                f"joint sequence (other tokens {self.text} along the token axis: text, extra tokens): each group "
                f"is one more patch, run once per pipelined step {where}"
                + (" (M=1: the whole joint sequence is one patch)" if self.num_patches == 1 else "")
            )
        if self.sp_degree > 1:
            parts = ", ".join(f"[{p.row0}, {p.row0 + p.rows})" for p in self.pieces(True) if p.kind == BAND)
            lines.append(
                f"sequence parallel: {self.sp_degree} ranks per stage (Ulysses all-to-all around each self-attention);"
                f" this rank's part {self.sp_rank} of each band: {parts}")
        return "\n".join(lines)


def _describe_crossing(t: CrossingTensor, num_stages: int) -> str:
    route = f"(stage {t.producer}->{'out' if t.consumer == num_stages else t.consumer})"
    if not t.patch_bytes and t.text_bytes:  # the text stream of a joint sequence: once per step
        return f"{t.name} text {list(t.shape)} {_fmt_bytes(t.text_bytes)}/step {route}"
    text = f" + text {_fmt_bytes(t.text_bytes)}/step" if t.text_bytes else ""
    return f"{t.name} {list(t.patch_shape)} {_fmt_bytes(t.patch_bytes)}{text} {route}"


def _names(names: tuple[str, ...], limit: int = 4) -> str:
    if len(names) <= limit:
        return ", ".join(names)
    return f"{len(names)} tables ({', '.join(names[:limit])}, ...)"


def _fmt_flops(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _attention_module(node: fx.Node) -> str:
    """The module path dynamo recorded for an attention node, for display only (never for structure)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return node.name
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else str(path)
    path = re.sub(r"_modules\['([^']+)'\]", r"\1", path.replace("L['self'].", "").replace("__dict__['_modules']", "_modules"))
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    return path.replace("_modules", "").strip(".").replace("..", ".")


def _global_closure(nodes: list[fx.Node]) -> set[fx.Node]:
    """GLOBAL/POSITIONAL call nodes that `nodes` read, transitively."""
    seen: set[fx.Node] = set()
    stack = [a for n in nodes for a in n.all_input_nodes]
    while stack:
        a = stack.pop()
        if a in seen or node_meta(a).token.in_stage:
            continue
        seen.add(a)
        stack.extend(a.all_input_nodes)
    return {n for n in seen if n.op in ("call_function", "call_method", "call_module")}


@dataclass(frozen=True)
class KeptCuts:
    """Where a model's stages were cut at its first input shape (positions in its token-node order)."""

    cuts: tuple[int, ...]
    num_nodes: int
    attention_positions: tuple[int, ...]

    @classmethod
    def of(cls, plan: "PipelinePlan") -> "KeptCuts":
        return cls(tuple(s.start for s in plan.stages[1:]), len(plan.order), plan.attention_positions)

    def fits(self, candidates: CutCandidates, num_stages: int) -> bool:
        return (len(self.cuts) == num_stages - 1 and len(candidates.order) == self.num_nodes
                and tuple(candidates.attention_positions) == self.attention_positions
                and all(c in candidates.positions for c in self.cuts))


def build_plan(
    gm: fx.GraphModule, example_inputs: list | None, options: PipefusionOptions,
    analysis: TokenAnalysis | None = None, keep: "KeptCuts | None" = None,
) -> tuple[PipelinePlan, TokenAnalysis]:
    """Analyze `gm` (unless its token `analysis` is given) and choose cuts and patches.

    `options` must be resolved (`options.resolve()`). `keep`: the cuts of this model's plan at another input
    shape; used when the graph has the same token-node structure there (same count, attention at the same
    positions, the cuts still candidates), so each stage keeps the same layers, hence the same parameters on
    its rank, whatever the resolution."""
    if analysis is None:
        analysis = analyze_tokens(gm, example_inputs, options.token_axis, options.image_input,
                                  options.num_patches)
    total = analyze_cost(gm)
    n_stages, n_patches = options.num_stages, options.num_patches
    n_layers = analysis.attention_layers
    if not analysis.mixes_tokens:
        raise PlanError("no self-attention over the image tokens was found: nothing to pipeline")
    if n_stages > n_layers:
        raise TooFewLayersError(
            f"num_stages={n_stages} is more than the {n_layers} attention layers of this graph (if the "
            "model has more, dynamo split it into several graphs at graph breaks; each graph is planned on "
            "its own, so every graph needs at least num_stages layers)"
        )
    patches = patch_bands(analysis.token_rows, n_patches)
    nodes = token_nodes(gm)
    candidates = find_cut_candidates(gm)
    costs = [node_meta(n).flops for n in nodes]
    if keep is not None and keep.fits(candidates, n_stages):
        cuts = keep.cuts
        partition = f"{options.partition if isinstance(options.partition, str) else list(options.partition)} " \
                    "(cuts kept from this model's first input shape)"
    elif isinstance(options.partition, str) and options.partition == "flops":
        cuts = balanced_cuts(costs, candidates, n_stages)
        partition = "flops"
    else:
        layers = (
            uniform_layers(n_layers, n_stages) if options.partition == "uniform" else tuple(options.partition)
        )
        if len(layers) != n_stages:
            raise PlanError(f"partition {list(layers)} has {len(layers)} stages, expected {n_stages}")
        cuts = layer_cuts(layers, candidates)
        partition = options.partition if isinstance(options.partition, str) else str(list(layers))
    plan = _assemble(gm, analysis, nodes, candidates, cuts, patches, partition, options, total)
    log.info("pipefusion plan for graph with %d nodes:\n%s", len(gm.graph.nodes), plan)
    return plan, analysis


def _assemble(gm, analysis, nodes, candidates: CutCandidates, cuts, patches, partition, options, total):
    bounds = (0, *cuts, len(nodes))
    position = {n.name: i for i, n in enumerate(nodes)}
    attn_positions = list(candidates.attention_positions)
    token_flops = sum(node_meta(n).flops for n in nodes)
    largest = max(n for _, n in patches)
    stages = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        members = nodes[lo:hi]
        flops = sum(node_meta(n).flops for n in members)
        layer_ids = tuple(i for i, p in enumerate(attn_positions) if lo <= p < hi)
        kv = 0   # every mixing cache: K/V of self-attention, the input of a conv over rows (HALO_ROWS)
        for n in members:
            if node_meta(n).token.attention == "self" or is_cross_group(n):
                kv += sum(node_meta(a).out_bytes for a in sdpa_qkv(n)[1:])
            elif node_meta(n).token.mixing is MixingRule.HALO_ROWS:
                kv += node_meta(n.args[0]).out_bytes
            elif node_meta(n).token.mixing is MixingRule.STALE_INPUTS:
                kv += sum(node_meta(a).out_bytes for a in n.all_input_nodes if node_meta(a).token.carries_tokens)
        modules = [_attention_module(nodes[attn_positions[i]]) for i in layer_ids]
        span = f"{modules[0]} .. {modules[-1]}" if len(modules) > 1 else (modules[0] if modules else "")
        stages.append(StagePlan(
            index=k, start=lo, end=hi, attention_layers=layer_ids, flops=flops,
            global_flops=sum(node_meta(n).flops for n in _global_closure(members)),
            share=flops / max(token_flops, 1), kv_cache_bytes=kv, modules=span,
        ))

    def stage_at(pos: int) -> int:
        return next(s.index for s in stages if s.start <= pos < s.end)

    crossing: list[CrossingTensor] = []
    n_stages = len(stages)
    for n in nodes:
        producer = stage_at(position[n.name])
        consumers = sorted({n_stages if u.op == "output" else stage_at(position[u.name])
                            for u in n.users if u.op == "output" or u.name in position} - {producer})
        last = max(consumers, default=producer)
        if last > producer:
            val = example_value(n)
            info = node_meta(n).token
            shape = tuple(val.shape)
            per_row = analysis.per_row(info)
            patch_shape = shape[:info.axis] + (largest * per_row,) + shape[info.axis + 1:]
            axis_element_bytes = val.element_size() * torch.Size(shape).numel() // shape[info.axis]
            crossing.append(CrossingTensor(
                name=n.name, shape=shape, patch_shape=patch_shape, dtype=val.dtype,
                patch_bytes=int(val.element_size() * torch.Size(patch_shape).numel()),
                producer=producer, consumer=last, consumers=tuple(consumers),
                row_bytes=axis_element_bytes * per_row,
                text_bytes=axis_element_bytes * (info.prefix + info.suffix),
            ))
    cut_plans = []
    for k, pos in enumerate(cuts):
        tensors = tuple(t for t in crossing if t.producer <= k < t.consumer)
        cut_plans.append(CutPlan(after_stage=k, position=pos, after_node=nodes[pos - 1].name, tensors=tensors))
    return PipelinePlan(
        num_stages=n_stages,
        num_patches=len(patches),
        warmup_steps=options.warmup_steps,
        partition=partition,
        token_input=analysis.token_input,
        token_axis=analysis.input_axis,
        input_rows=analysis.input_rows,
        granule=analysis.granule,
        patches=patches,
        stages=tuple(stages),
        cuts=tuple(cut_plans),
        total_flops=total,
        self_attention=tuple(analysis.self_attention),
        cross_attention=tuple(analysis.cross_attention),
        positional=tuple(analysis.positional),
        order=tuple(n.name for n in nodes),
        attention_positions=tuple(candidates.attention_positions),
        crossing=tuple(crossing),
        text=_text_side(nodes),
        input_shape=tuple(example_value(next(n for n in gm.graph.nodes if n.name == analysis.token_input)).shape),
        mixing=tuple(
            MixingOp(n.name, attention_form(n), _mixing_rule(node_meta(n).token),
                     next(st.index for st in stages if st.start <= i < st.end), source_line(n))
            for i, n in enumerate(nodes) if _mixing_rule(node_meta(n).token) is not None),
    )


def _mixing_rule(info) -> MixingRule | None:
    if info.attention == "local":
        return MixingRule.LOCAL
    return info.mixing


def _text_side(nodes: list[fx.Node]) -> str | None:
    """Where the text group of a joint sequence lies along the self-attention's token axis (None: no text).
    The query's groups decide: keys with more groups than their query hold tokens computed without the image
    (`MixingRule.STALE_KV_GLOBAL_KEYS`), which every patch writes itself, so they need no piece of their own.
    Attention between two token streams (`MixingRule.STALE_KV_CROSS_GROUP`) needs the stream's piece."""
    sides = set()
    for n in nodes:
        if node_meta(n).token.attention == "self":
            info = node_meta(sdpa_qkv(n)[0]).token
            if info.prefix:
                sides.add("first")
            if info.suffix:
                sides.add("last")
        elif is_cross_group(n):   # a separate token stream's piece writes or reads its K/V cache
            prefix, suffix = query_side(n)
            sides.add("first" if prefix else "last")
    if len(sides) > 1:
        return "both"
    return sides.pop() if sides else None
