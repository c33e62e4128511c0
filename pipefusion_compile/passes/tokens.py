"""Token analysis: which values carry the image tokens, on which axis, at what granularity.

A forward dataflow analysis from the graph inputs. The image input (see `graph_inputs.find_token_input`)
is PATCHED on its row axis; every op has a rule that maps its operands' token axes to its output's, or
declares that it mixes tokens. Results go to `node.meta["pipefusion"].token` (a `TokenInfo`).

    x: [1, 4, 8, 8]  PATCHED axis 2 (8 rows)      conv2d k=s=2   -> [1, 16, 4, 4] PATCHED axis 2 (epr 1/2)
    flatten(2)       -> [1, 16, 16] axis 2 (epr 2) transpose(1,2) -> [1, 16, 16]   axis 1 (epr 2)
    + pos_embed [1, 16, 16]  -> the buffer is POSITIONAL on axis 1 (sliced per patch)
    sdpa(q, k, v) with k, v PATCHED -> MIXING (self-attention: stale K/V); with GLOBAL k, v -> cross

The per-op rules live in `token_rules.py`; this module runs them in graph order and summarizes.
`epr` (elements per input row) fixes the patch granularity: a patch must cover a number of input rows that
makes every `rows * epr` integral, i.e. a multiple of the lcm of the denominators (`granule`).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch
import torch.fx as fx

from ..errors import OptionsError, PipefusionError, UnsupportedGraphError, symbolic_hint
from .graph_inputs import (InputMatch, find_token_inputs, image_input_candidates, input_members, list_latent_error,
                           output_shape)
from .joint_input import JointInput, find_joint_inputs
from . import sample_rules  # noqa: F401  (registers the rules for the samples of a list latent)
from .meta import META_KEY, Kind, MixingRule, TokenInfo, TokenRule, example_value, node_meta
from .token_rules import FOLD_SAFE_RULES, GLOBAL, REDUCED, RuleContext, op_name, rule_for, shape_of, token_operands


@dataclass
class TokenAnalysis:
    """Summary of the token analysis (the per-node results live in node meta)."""

    token_input: str
    input_axis: int
    input_rows: int              # extent of the image input's row axis
    granule: int                 # input rows per token row (lcm of epr denominators)
    counts: dict[str, int]
    self_attention: list[str]
    cross_attention: list[str]
    positional: list[str]
    patched_inputs: list[str] = field(default_factory=list)
    local_attention: list[str] = field(default_factory=list)  # attention within a token row (no cache)
    token_reductions: list[str] = field(default_factory=list)  # reductions over the tokens (STALE_INPUTS):
                                                               # linear attention's phi(K)^T V, sums, means
    attempts: tuple = ()          # every (image input, token axis) tried: `AxisAttempt`s, in order
    joint_input: JointInput | None = None  # the image input holds other tokens too (`joint_input.py`)

    @property
    def attention_layers(self) -> int:
        """Layers a stage boundary can fall between: self-attention, attention local to a row, reductions over
        the tokens (linear attention)."""
        return len(self.self_attention) + len(self.local_attention) + len(self.token_reductions)

    @property
    def mixes_tokens(self) -> bool:
        """Something combines the image tokens across patches (what makes the graph worth pipelining)."""
        return bool(self.self_attention or self.token_reductions)

    @property
    def token_rows(self) -> int:
        """R: the number of token rows a patch plan can split (input rows / granule)."""
        return self.input_rows // self.granule

    def per_row(self, info: TokenInfo) -> int:
        """Elements along `info.axis` per token row."""
        value = info.epr * self.granule
        if value.denominator != 1:
            raise PipefusionError(f"internal: {info.rule_name} value has {info.epr} elements per input row, not a "
                                  f"whole number per token row of {self.granule} input rows")
        return int(value)



# ----------------------------------------------------------------------------------------------------------


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, token_input: fx.Node, axis: int, joint: JointInput | None = None,
                 members: tuple[fx.Node, ...] | None = None, is_list: bool = False):
        self.gm = gm
        self.token_input = token_input
        self.joint = joint
        # the placeholders patched as the image input: itself, or the elements of a list latent (one sample each,
        # without a batch dim; a patch is the same rows of every element)
        self.members = members or (token_input,)
        self.is_list = is_list   # the members have no batch dim (a sample each)
        self.input_rows = shape_of(token_input)[axis] - (joint.prefix + joint.suffix if joint else 0)
        self.axis = axis
        self.positional: dict[str, fx.Node] = {}
        self.reached = 0   # index of the node the analysis is at (how far a failing attempt got)

    def make_info(self, node, axis, rule: TokenRule, kind=Kind.PATCHED, attention=None, extra=None, shape=None,
                  prefix=0, suffix=0, outer=1, mixing=None, halo=(0, 0)):
        rule = TokenRule(rule)   # a rule given by name: an unknown one raises ValueError
        shape = shape if shape is not None else shape_of(node)
        if axis is None or not 0 <= axis < len(shape):
            raise UnsupportedGraphError(f"token axis lost by rule {rule}", node)
        epr = Fraction(shape[axis] - prefix - suffix, self.input_rows)
        if outer > 1 and (prefix or suffix):
            raise UnsupportedGraphError("a joint text+image sequence folded with the dims before its token axis",
                                        node)
        info = TokenInfo(kind, axis, epr, rule, attention, prefix=prefix, suffix=suffix, outer=outer, mixing=mixing,
                         halo=halo)
        if extra and node is not None:
            node_meta(node).extra.update(extra)
        return info

    def mark_positional(self, node: fx.Node, axis: int, user: fx.Node, prefix: int = 0, suffix: int = 0,
                        outer: int = 1) -> None:
        """`node` is a GLOBAL table read token by token along `axis`; with `outer` > 1 that axis is folded like
        the token values it meets (`epr` counts all `outer` slices, as theirs does)."""
        meta = node_meta(node)
        epr = Fraction(shape_of(node)[axis] - prefix - suffix, self.input_rows)
        new = TokenInfo(Kind.POSITIONAL, axis, epr, TokenRule.POSITIONAL, prefix=prefix, suffix=suffix, outer=outer,
                        used_by=user.name)
        old = meta.token
        if old is not None and old.kind is Kind.POSITIONAL and (old.axis, old.epr, old.prefix, old.outer) != (
                axis, epr, prefix, outer):
            raise UnsupportedGraphError(
                f"{node.name} is used token-wise along two different axes ({old.axis} and {axis})", user
            )
        meta.token = new
        self.positional[node.name] = node

    def run(self) -> None:
        ndim = len(shape_of(self.token_input)) + self.is_list   # as one batched tensor
        if ndim >= 4 and self.axis + self.is_list == ndim - 1:
            # the last spatial axis of [B, C, H, W] / [B, C, F, H, W]: its bands are columns, the same range of
            # every row once the tokens are flattened; the folded split of rows within frames would take it, but
            # column bands are not checked against the reference (they differed from it): refused
            raise UnsupportedGraphError(
                f"token rows on the last axis ({self.axis}) of the image input {self.token_input.name} "
                f"{list(shape_of(self.token_input))}: bands of columns are not supported", self.token_input)
        for index, node in enumerate(self.gm.graph.nodes):
            self.reached = index
            meta = node_meta(node)
            if node.op == "placeholder":
                if node is self.token_input and self.joint is not None:
                    meta.token = self.make_info(node, self.axis, TokenRule.JOINT_IMAGE_INPUT, prefix=self.joint.prefix,
                                                suffix=self.joint.suffix)
                elif node in self.members:
                    meta.token = self.make_info(node, self.axis, TokenRule.IMAGE_INPUT)
                else:
                    meta.token = GLOBAL
                continue
            if node.op == "get_attr":
                meta.token = GLOBAL
                continue
            if node.op == "output":
                continue
            ctx = RuleContext(self, node)
            if not token_operands(ctx):
                # computed from a reduction over the tokens (and globals) alone: no token axis, any op is fine
                meta.token = REDUCED if any(ctx.info(a).kind is Kind.REDUCED for a in node.all_input_nodes) \
                    else GLOBAL
                continue
            rule = rule_for(node)
            if rule is None:
                raise UnsupportedGraphError(
                    f"op {op_name(node)} has no token rule and its input carries image tokens "
                    "(it may mix tokens across patches)",
                    node,
                )
            if rule not in FOLD_SAFE_RULES and any(i.outer > 1 for _, i in token_operands(ctx)):
                raise UnsupportedGraphError(
                    f"op {op_name(node)} on a token axis folded with the dims before it (e.g. batch x frames): "
                    "a patch is not a contiguous range there; only element-wise ops, linear, norms, convs "
                    "over that axis as batch, and the reshape that unfolds it are supported",
                    node,
                )
            try:
                meta.token = rule(ctx)
            except UnsupportedGraphError as e:
                raise self._too_few_rows(ctx, e) or e
            except PipefusionError:
                raise
            except Exception as e:  # a rule met a case it does not handle: say which op, where
                hint = symbolic_hint(self.gm)
                raise UnsupportedGraphError(
                    f"the token rule of op {op_name(node)} failed on this node: {type(e).__name__}: {e}"
                    + (f" ({hint})" if hint else ""), node) from e

    def _too_few_rows(self, ctx: RuleContext, error: UnsupportedGraphError) -> UnsupportedGraphError | None:
        """When the analysis fails after some value held a single image token along its token axis, the cause
        is the input's size: a size-1 axis cannot be told apart from a broadcast one, and one token row
        cannot be split into patches."""
        for n in self.gm.graph.nodes:
            if n is ctx.node:
                break
            info = node_meta(n).token
            val = example_value(n)
            if info is not None and info.carries_tokens and info.elements is None and info.axis is not None \
                    and isinstance(val, torch.Tensor) and val.shape[info.axis] - info.prefix - info.suffix == 1:
                return UnsupportedGraphError(
                    f"the image input {self.token_input.name} {list(shape_of(self.token_input))} is too small: "
                    f"its {self.input_rows} rows make a single token row ({n.name} {list(val.shape)} holds one "
                    "token along its token axis), so there is nothing to split into patches and the analysis "
                    f"cannot follow the tokens; use a larger resolution (the analysis stopped at: {error.reason})",
                    ctx.node)
        return None


def default_token_axis(ndim: int) -> int:
    """The axis tried first in the principled order of `candidate_axes`, kept for callers that want one
    guess without a graph: 1 for [B, S, C], else 2 ([B, C, H, W], [B, C, F, H, W])."""
    return 1 if ndim == 3 else 2


def candidate_axes(ndim: int, is_list: bool = False) -> list[int]:
    """The token axes `analyze_tokens` tries, in order: every dim but the batch dim 0, leading first (every dim
    of an element of a list latent, which is one sample without a batch dim).

    The token rows are the leading spatial or temporal axis, so the first axis that is not the channels is
    right: the channel axis (the one the patch embedding's conv or linear contracts) fails the analysis at that
    op ("conv over the channels", "linear contracts over the token axis"), and so does a trailing spatial axis
    (its rows are not contiguous once the tokens are flattened)."""
    return list(range(0 if is_list else 1, ndim))


class AttemptOutcome(enum.Enum):
    CHOSEN = "chosen"
    FAILED = "the analysis failed"
    NO_SELF_ATTENTION = "the analysis succeeded but found no self-attention over the tokens"
    FEWER_LAYERS = "the analysis succeeded, but another input's (or axis') tokens reach more self-attention layers"
    FEWER_ROWS = "the analysis succeeded, but another axis' token rows hold more of the requested patches"
    WEAKER_MATCH = "the analysis succeeded, but another input that passes matches the output's shape more closely"


@dataclass(frozen=True)
class AxisAttempt:
    """One (image input, token axis) pair the analysis tried, and what came of it."""

    token_input: str
    shape: tuple[int, ...]
    axis: int
    outcome: AttemptOutcome
    reason: str = ""     # the analysis' error, for FAILED
    reached: int = 0     # nodes analyzed before it failed (the furthest failure is the likeliest cause)

    def describe(self) -> str:
        text = f"{self.token_input} {list(self.shape)} axis {self.axis}: {self.outcome.value}"
        if self.reason:
            text += ": " + self.reason.splitlines()[0]
        return text


def _reset(gm: fx.GraphModule, saved: dict) -> None:
    """Undo what a previous attempt wrote into the node meta (token infos and rule extras)."""
    for node in gm.graph.nodes:
        meta = node.meta.get(META_KEY)
        if meta is not None:
            meta.token = None
            meta.extra = dict(saved.get(node, {}))


def _run_attempt(gm, token_input: fx.Node, axis: int, saved: dict, joint: JointInput | None = None,
                 members: tuple[fx.Node, ...] | None = None):
    """(analyzer, None) or (analyzer, error) for one attempt, the node meta holding its results. `joint`: the
    input's other token groups; `members`: the elements of a list latent (`token_input` the first), patched alike."""
    _reset(gm, saved)
    analyzer = _Analyzer(gm, token_input, axis, joint, members, is_list=members is not None)
    try:
        analyzer.run()
    except UnsupportedGraphError as e:
        return analyzer, e
    return analyzer, None


def _summarize(gm, token_input: fx.Node, axis: int, analyzer: _Analyzer, attempts) -> TokenAnalysis:
    granule = 1
    counts = {k.value: 0 for k in Kind}
    self_attn, cross_attn, local_attn, reductions = [], [], [], []
    for node in gm.graph.nodes:
        info = node_meta(node).token if node.op != "output" else None
        if info is None:
            continue
        counts[info.kind.value] += 1
        infos = info.elements if info.elements is not None else (info,)
        for i in infos:
            if i.epr is not None:
                granule = math.lcm(granule, i.epr.denominator)
        if info.attention == "self":
            self_attn.append(node.name)
        elif info.attention == "cross":
            cross_attn.append(node.name)
        elif info.attention == "local":
            local_attn.append(node.name)
        if info.mixing is MixingRule.STALE_INPUTS:
            reductions.append(node.name)
    return TokenAnalysis(
        token_input=token_input.name,
        input_axis=axis,
        input_rows=analyzer.input_rows,
        granule=granule,
        counts=counts,
        self_attention=self_attn,
        cross_attention=cross_attn,
        positional=sorted(analyzer.positional),
        patched_inputs=[n.name for n in analyzer.members],
        local_attention=local_attn,
        token_reductions=reductions,
        attempts=tuple(attempts),
        joint_input=analyzer.joint,
    )


def analyze_tokens(
    gm: fx.GraphModule, example_inputs: list | None = None, token_axis: int | None = None,
    image_input: str | None = None, num_patches: int | None = None,
) -> TokenAnalysis:
    """Run the token analysis over `gm`; per-node results in `node.meta["pipefusion"].token`.

    The image input and its token axis are found, not asked for: the candidate inputs
    (`graph_inputs.find_token_inputs`, best match first) and, for each, the axes of `candidate_axes` are tried
    in order, and the first pair under which the analysis succeeds and finds a self-attention over the tokens
    wins (`TokenAnalysis.attempts` records every pair tried and why each other one failed):

        [B, C, H, W]     axis 1: conv over the channels (fails)   axis 2: ok (chosen)
        [B, F, C, H, W]  axis 1: ok (chosen: the frames)
        [B, C, F, H, W]  axis 1: fails                             axis 2: ok (chosen)
        [B, C, 1, H, W]  axis 1: fails   axis 2: ok, 1 row < M     axis 3: ok, H rows (chosen)

    An axis that passes with fewer token rows than the `num_patches` requested is not the last one tried: the
    later axes of that input are tried too (a single latent frame is one row on the frame axis, while its H
    rows are contiguous token ranges: flattening [1, H, W] is flattening [H, W]). Among the passing pairs the
    input whose shape matches the output's most closely (`InputMatch`) wins, then the one whose tokens reach the
    most self-attention layers (the better-ranked input on a tie); of that
    input's passing axes, the one whose rows hold the most of the `num_patches` (all of them when it has at
    least that many rows), then the earliest. Without `num_patches` the first passing axis of an input is its
    last.

    `token_axis` and `image_input` (options of the same names) restrict the search to that axis / input. When
    every pair fails, the error is the one of the attempt that got furthest through the graph, followed by the
    list of attempts. A graph whose analysis succeeds without self-attention returns that analysis (the backend
    runs it unchanged) when that is the conventional axis (`default_token_axis`) of the best input: without
    self-attention nothing tells the axes apart, so the conventional one decides, as it did when it was the only
    one tried.
    """
    inputs, candidates = _token_inputs(gm, example_inputs, image_input)
    # a list latent ranks after every tensor input of any match (see `graph_inputs.image_input_candidates`)
    match_of = {c.name: int(c.match) + (len(InputMatch) if c.is_list and c.match is not InputMatch.NAMED else 0)
                for c in candidates if c.match is not None}
    lists = {c.name for c in candidates if c.is_list and c.match is not None}
    members_of = {n.name: input_members(gm, candidates, n) if n.name in lists else None for n, _ in inputs}
    if token_axis is not None:
        for token_input, _ in inputs:
            ndim = len(shape_of(token_input))
            if not (0 if token_input.name in lists else 1) <= token_axis < ndim:
                raise OptionsError(
                    f"option token_axis={token_axis}: the image input {token_input.name} "
                    f"{list(shape_of(token_input))} has {ndim} dims, so the token axis is one of 1..{ndim - 1}")
    saved = {n: dict(n.meta[META_KEY].extra) for n in gm.graph.nodes if META_KEY in n.meta}
    attempts: list[AxisAttempt] = []
    errors: dict[int, UnsupportedGraphError] = {}
    first_ok = None       # the conventional attempt, when it succeeded without self-attention
    passing: list[_Passing] = []
    last_run = None
    for token_input, joint in inputs:
        shape = tuple(shape_of(token_input))
        is_list = token_input.name in lists
        axes = [token_axis] if token_axis is not None else candidate_axes(len(shape), is_list)
        if joint is not None:
            axes = [a for a in axes if a == joint.axis]
        for axis in axes:
            analyzer, error = _run_attempt(gm, token_input, axis, saved, joint, members_of[token_input.name])
            last_run = (token_input, axis, joint)
            if error is not None:
                errors[len(attempts)] = error
                attempts.append(AxisAttempt(token_input.name, shape, axis, AttemptOutcome.FAILED, error.reason,
                                            analyzer.reached))
                continue
            # layers over the image tokens: a self-attention within another token group alone (the stream
            # of a wrong image input, e.g. the real image as a stream attending over the prompt) is none
            layers = sum(1 for n in gm.graph.nodes if n.op != "output" and node_meta(n).token is not None
                         and ((node_meta(n).token.attention == "self" and node_meta(n).token.epr != 0)
                              or node_meta(n).token.mixing is MixingRule.STALE_INPUTS))
            if layers:
                rows = _summarize(gm, token_input, axis, analyzer, ()).token_rows
                passing.append(_Passing(len(attempts), token_input, axis, analyzer, layers, rows,
                                        match_of.get(token_input.name, 0)))
                attempts.append(AxisAttempt(token_input.name, shape, axis, AttemptOutcome.CHOSEN))
                if num_patches is None or rows >= num_patches:
                    break
                continue
            # without self-attention over them, tokens that only serve as keys of another stream's queries
            # (the prompt taken for the image, the real image then a stream over it) are no fallback
            streams = any(node_meta(n).token is not None and node_meta(n).token.mixing is
                          MixingRule.STALE_KV_CROSS_GROUP for n in gm.graph.nodes if n.op != "output")
            if (token_input, joint) == inputs[0] and axis == (token_axis or default_token_axis(len(shape))) \
                    and not streams:
                first_ok = (len(attempts), token_input, axis, analyzer)
            attempts.append(AxisAttempt(token_input.name, shape, axis, AttemptOutcome.NO_SELF_ATTENTION))
    chosen = None
    if passing:
        # several inputs may pass: the image input is the one whose shape matches the output's most closely
        # (HunyuanImage: its prompt, [B, 6, C], passes too since reductions over tokens have a rule, and its
        # tokens reach its refiner's self-attention besides the joint blocks), then of those the one whose
        # tokens reach the most self-attention layers (WanVACE: its control latent, larger than the latent,
        # matches the output as well; the control stream joins the latent's, the latent's own blocks would be
        # GLOBAL otherwise), the better-ranked on a tie; then, of its axes, the one whose rows hold the
        # requested patches
        image = max(passing, key=lambda p: (-p.match, p.layers, -p.index)).token_input
        best = max((p for p in passing if p.token_input is image),
                   key=lambda p: (p.layers, p.held(num_patches), -p.index))
        for p in passing:
            if p is not best:
                attempts[p.index] = dataclasses.replace(attempts[p.index], outcome=_losing_outcome(p, best))
        chosen = (best.index, best.token_input, best.axis, best.analyzer)
        if image_input is None:
            _refuse_other_than_the_latent(gm, inputs, lists, best, attempts, errors)
    if chosen is None:
        # nothing passed with self-attention: a latent passed as a list (one graph input per sample, which no
        # band of rows can split) explains that better than the attempts over the other inputs
        listed = list_latent_error(candidates, output_shape(gm))
        if listed is not None:
            raise listed
    if chosen is None and first_ok is not None:
        chosen = first_ok
        index = chosen[0]
        attempts[index] = dataclasses.replace(attempts[index], outcome=AttemptOutcome.CHOSEN)
    if chosen is not None:
        _, token_input, axis, analyzer = chosen
        if last_run != (token_input, axis, analyzer.joint):  # a later attempt overwrote the meta: rerun it
            analyzer, _ = _run_attempt(gm, token_input, axis, saved, analyzer.joint, members_of[token_input.name])
        return _summarize(gm, token_input, axis, analyzer, attempts)
    raise _all_failed(attempts, errors, candidates, token_axis) from None


def _refuse_other_than_the_latent(gm, inputs, lists, best: "_Passing", attempts, errors) -> None:
    """Raise when the input chosen is not the one with exactly the output's shape while such an input exists and
    failed the analysis on every axis.

    A denoiser's latent has the shape of its prediction; another input of the same grid (SANA-WM's Plucker rays
    [B, 48, F, H, W] beside its latent [B, 4, F, H, W]) may pass the analysis where the latent does not, and
    pipelining it would split the wrong tensor: every op on the latent would run whole on every patch, so the
    result would differ from PipeFusion's without any error. The latent's own failure is the answer instead (the
    option `image_input` still chooses the other input on purpose)."""
    out = output_shape(gm)
    exact = [n for n, joint in inputs if joint is None and n.name not in lists and tuple(shape_of(n)) == out]
    if not exact or best.token_input in exact:
        return
    failed = [i for i, a in enumerate(attempts) if i in errors and a.token_input in {n.name for n in exact}]
    if len(failed) < sum(len(candidate_axes(len(shape_of(n)))) for n in exact):
        return  # an exact input passed on some axis (without self-attention) or was not tried
    worst = max(failed, key=lambda i: (attempts[i].reached, -i))
    error, attempt = errors[worst], attempts[worst]
    raise UnsupportedGraphError(
        f"{error.reason}\n  (the image input {attempt.token_input} {list(attempt.shape)}, which has exactly the "
        f"output's shape, fails the analysis on every axis; this is axis {attempt.axis}'s error, the one that got "
        f"furthest. Another input, {best.token_input.name} {list(shape_of(best.token_input))}, passes, but "
        "pipelining it would split another tensor than the latent being denoised; "
        f"options={{'image_input': '{best.token_input.name}'}} chooses it on purpose)", error.node)


def _token_inputs(gm, example_inputs, image_input: str | None):
    """(the (input, joint layout or None) pairs to try, best first; every candidate).

    The inputs that match the output's tokens (`find_token_inputs`), each as image tokens only, come first;
    the joint inputs (`joint_input.find_joint_inputs`: one input holding other tokens besides the image's,
    which the graph's output slices off) after them. Without either, the error `find_token_inputs` raises."""
    try:
        inputs, candidates = find_token_inputs(gm, example_inputs, image_input)
    except UnsupportedGraphError as e:
        error, inputs = e, []
        _, candidates = image_input_candidates(gm, example_inputs, image_input)
    else:
        error = None
    joints = [] if image_input is not None else find_joint_inputs(gm, candidates, output_shape(gm))
    if not inputs and not joints:
        raise error
    by_name = {n.name: n for n in gm.graph.find_nodes(op="placeholder")}
    return [*((n, None) for n in inputs), *((by_name[j.name], j) for j in joints)], candidates


@dataclass(frozen=True)
class _Passing:
    """An attempt whose analysis succeeded with self-attention over the tokens."""

    index: int            # in the attempts list
    token_input: fx.Node
    axis: int
    analyzer: _Analyzer
    layers: int           # self-attention layers its tokens reach
    rows: int             # token rows a patch plan can split
    match: int = 0        # its input's `InputMatch` (lower: closer to the output's shape)

    def held(self, num_patches: int | None) -> int:
        """How many of the requested patches its rows can hold (any number when none is requested)."""
        return self.rows if num_patches is None else min(self.rows, num_patches)


def _losing_outcome(loser: _Passing, best: _Passing) -> AttemptOutcome:
    same_input = loser.token_input is best.token_input
    if not same_input and loser.match > best.match:
        return AttemptOutcome.WEAKER_MATCH
    return AttemptOutcome.FEWER_ROWS if same_input and loser.layers == best.layers else AttemptOutcome.FEWER_LAYERS


def _all_failed(attempts: list[AxisAttempt], errors: dict, candidates, token_axis: int | None):
    def conventional(i):
        a = attempts[i]
        return a.token_input == attempts[0].token_input and a.axis == (token_axis or default_token_axis(len(a.shape)))

    failed = [i for i in range(len(attempts)) if i in errors]
    tried = "".join(f"\n    - {a.describe()}" for a in attempts)
    if not failed:  # every attempt passed, none with self-attention, none the conventional one (a list latent)
        return UnsupportedGraphError(
            f"no image input and token axis gave an analysis with self-attention over the tokens; tried:{tried}")
    best = max(failed, key=lambda i: (attempts[i].reached, conventional(i), -i))
    error, attempt = errors[best], attempts[best]
    where = f"the image input {attempt.token_input} {list(attempt.shape)}"
    if token_axis is not None:
        hint = (f"option token_axis={token_axis} puts the token rows on axis {token_axis} of {where}; the token "
                "rows are the latent's leading spatial or temporal axis, e.g. 2 for [B, C, H, W]")
    else:
        hint = (f"no image input and token axis gave an analysis with self-attention over the tokens; this is "
                f"the error of axis {attempt.axis} of {where}, the failure that got furthest through the graph")
    tried = "".join(f"\n    - {a.describe()}" for a in attempts)
    others = [c for c in candidates if c.match is None]
    seen = "".join(f"\n    - {c.describe()}" for c in others)
    text = (f"{error.reason}\n  ({hint}; tried:{tried}"
            + (f"\n  other inputs, not tried:{seen}" if seen else "")
            + "\n  options={'image_input': ..., 'token_axis': ...} choose them)")
    return UnsupportedGraphError(text, error.node)
