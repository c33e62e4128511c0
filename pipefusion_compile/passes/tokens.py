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

import math
from dataclasses import dataclass, field
from fractions import Fraction

import torch.fx as fx

from ..errors import UnsupportedGraphError
from .graph_inputs import find_token_input
from .meta import Kind, TokenInfo, node_meta
from .token_rules import FOLD_SAFE_RULES, GLOBAL, RuleContext, op_name, rule_for, shape_of, token_operands


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

    @property
    def token_rows(self) -> int:
        """R: the number of token rows a patch plan can split (input rows / granule)."""
        return self.input_rows // self.granule

    def per_row(self, info: TokenInfo) -> int:
        """Elements along `info.axis` per token row."""
        value = info.epr * self.granule
        assert value.denominator == 1, (info, self.granule)
        return int(value)



# ----------------------------------------------------------------------------------------------------------


class _Analyzer:
    def __init__(self, gm: fx.GraphModule, token_input: fx.Node, axis: int):
        self.gm = gm
        self.token_input = token_input
        self.input_rows = shape_of(token_input)[axis]
        self.axis = axis
        self.positional: dict[str, fx.Node] = {}

    def make_info(self, node, axis, rule, kind=Kind.PATCHED, attention=None, extra=None, shape=None,
                  prefix=0, suffix=0, outer=1):
        shape = shape if shape is not None else shape_of(node)
        if axis is None or not 0 <= axis < len(shape):
            raise UnsupportedGraphError(f"token axis lost by rule {rule}", node)
        epr = Fraction(shape[axis] - prefix - suffix, self.input_rows)
        if outer > 1 and (prefix or suffix):
            raise UnsupportedGraphError("a joint text+image sequence folded with the dims before its token axis",
                                        node)
        info = TokenInfo(kind, axis, epr, rule, attention, prefix=prefix, suffix=suffix, outer=outer)
        if extra and node is not None:
            node_meta(node).extra.update(extra)
        return info

    def mark_positional(self, node: fx.Node, axis: int, user: fx.Node, prefix: int = 0, suffix: int = 0) -> None:
        meta = node_meta(node)
        epr = Fraction(shape_of(node)[axis] - prefix - suffix, self.input_rows)
        new = TokenInfo(Kind.POSITIONAL, axis, epr, f"positional (used by {user.name})", prefix=prefix,
                        suffix=suffix)
        old = meta.token
        if old is not None and old.kind is Kind.POSITIONAL and (old.axis, old.epr, old.prefix) != (
                axis, epr, prefix):
            raise UnsupportedGraphError(
                f"{node.name} is used token-wise along two different axes ({old.axis} and {axis})", user
            )
        meta.token = new
        self.positional[node.name] = node

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            meta = node_meta(node)
            if node.op == "placeholder":
                if node is self.token_input:
                    meta.token = self.make_info(node, self.axis, "image input")
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
                meta.token = GLOBAL
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
            meta.token = rule(ctx)


def default_token_axis(ndim: int) -> int:
    return 1 if ndim == 3 else 2


def analyze_tokens(
    gm: fx.GraphModule, example_inputs: list | None = None, token_axis: int | None = None
) -> TokenAnalysis:
    """Run the token analysis over `gm`; per-node results in `node.meta["pipefusion"].token`."""
    token_input = find_token_input(gm, example_inputs)
    axis = token_axis if token_axis is not None else default_token_axis(len(shape_of(token_input)))
    analyzer = _Analyzer(gm, token_input, axis)
    try:
        analyzer.run()
    except UnsupportedGraphError as e:
        ndim = len(shape_of(token_input))
        if token_axis is not None or ndim != 5:  # 5-D: [B, C, F, H, W] (the default) or [B, F, C, H, W]
            raise
        raise UnsupportedGraphError(
            f"{e.reason}\n  (the token rows of the image input {token_input.name} {list(shape_of(token_input))} "
            f"were taken to lie on axis {axis}, the default for a {ndim}-D input; if they lie on another axis, "
            "e.g. the frames of [B, F, C, H, W] latents, pass options={'token_axis': ...})", e.node) from None

    granule = 1
    counts = {k.value: 0 for k in Kind}
    self_attn, cross_attn = [], []
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
    return TokenAnalysis(
        token_input=token_input.name,
        input_axis=axis,
        input_rows=analyzer.input_rows,
        granule=granule,
        counts=counts,
        self_attention=self_attn,
        cross_attention=cross_attn,
        positional=sorted(analyzer.positional),
        patched_inputs=[token_input.name],
    )
