"""Token rules: for each op, how its operands' token axes map to its output's (or why it mixes tokens).

A rule is `(ctx) -> TokenInfo`, called by the token analysis (`tokens.py`) only when some operand carries
image tokens. `ctx` gives the node, its operands' infos, and ways to record a POSITIONAL operand or fail with
the op, node and source line. `RULES` maps op identity (a torch function, an operator, or a Tensor method
name) to its rule; an op on token-carrying data that is not in it is an error, never a guess.
"""
from __future__ import annotations

import math
import operator
from fractions import Fraction
from typing import Callable

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import UnsupportedGraphError
from .meta import Kind, MixingRule, TokenInfo, TokenRule, example_value, node_meta
from .sdpa import SDPA_TARGETS
from .cross_group import cross_group_kind, rule_cross_group_attention

GLOBAL = TokenInfo(Kind.GLOBAL, rule=TokenRule.GLOBAL)
REDUCED = TokenInfo(Kind.REDUCED, rule=TokenRule.FROM_REDUCTION)
REDUCE_TOKENS = TokenInfo(Kind.REDUCED, rule=TokenRule.REDUCE_TOKENS, mixing=MixingRule.STALE_INPUTS)
"""A reduction over the token axis: it reads full-size caches of its token-carrying operands."""

# ----------------------------------------------------------------------------------------------------------
# Helpers shared by the rules


def shape_of(node) -> tuple[int, ...]:
    val = example_value(node) if isinstance(node, fx.Node) else node
    if not isinstance(val, torch.Tensor):
        raise UnsupportedGraphError(
            f"{node} is used as a tensor but its example value is {type(val).__name__}",
            node if isinstance(node, fx.Node) else None)
    return tuple(int(s) for s in val.shape)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class RuleContext:
    """What a rule sees: the node, its operands' token infos, and ways to record or fail."""

    def __init__(self, analysis, node: fx.Node):  # analysis: tokens._Analyzer (make_info, mark_positional)
        self.analysis = analysis
        self.node = node

    def info(self, arg) -> TokenInfo:
        if isinstance(arg, fx.Node):
            return node_meta(arg).token or GLOBAL
        return GLOBAL

    def arg(self, i: int, name: str, default=None):
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name, default)

    def out_shape(self) -> tuple[int, ...]:
        return shape_of(self.node)

    def patched(self, axis: int, rule: TokenRule, **kw) -> TokenInfo:
        """Info for the output with tokens on `axis`. Unless given, the text groups (prefix/suffix) come
        from the first token-carrying operand, scaled by how the axis extent changed (reshapes)."""
        if "prefix" not in kw:
            src = token_operands(self)
            if src:
                a, info = src[0]
                if info.joint:
                    ratio = Fraction(self.out_shape()[axis], shape_of(a)[info.axis])
                    prefix, suffix = info.prefix * ratio, info.suffix * ratio
                    if prefix.denominator != 1 or suffix.denominator != 1:
                        raise self.fail("reshape splits a text token of a joint sequence")
                    kw.update(prefix=int(prefix), suffix=int(suffix))
        if "outer" not in kw:
            src = token_operands(self)
            if src:
                kw["outer"] = src[0][1].outer
        return self.analysis.make_info(self.node, axis, rule, **kw)

    def fail(self, reason: str) -> UnsupportedGraphError:
        return UnsupportedGraphError(reason, self.node)

    def positional(self, arg, axis: int, out_axis: int, expected: int | None = None,
                   like: TokenInfo | None = None) -> None:
        """Mark GLOBAL `arg` as POSITIONAL along `axis` if it spans the tokens there, else leave it.
        `expected` is the token extent it must have (default: the node's output extent on `out_axis`);
        `like` is the token-carrying operand it is combined with (its text groups apply to `arg` too).
        Combined with a text-only value, `arg` is the text group itself: it stays GLOBAL."""
        if not isinstance(arg, fx.Node):
            return
        if like is not None and like.epr == 0:
            return
        val = example_value(arg)
        if self.info(arg).kind is Kind.REDUCED:   # no token axis: it must broadcast along the tokens
            if isinstance(val, torch.Tensor) and 0 <= axis < val.dim() and int(val.shape[axis]) != 1:
                raise self.fail(f"operand {arg.name}, a reduction over the image tokens, is combined token by "
                                "token with image tokens (it has no token axis)")
            return
        if not isinstance(val, torch.Tensor) or axis < 0 or axis >= val.dim():
            return
        extent = int(val.shape[axis])
        if extent == 1:
            return
        expected = self.out_shape()[out_axis] if expected is None else expected
        if extent != expected:
            raise self.fail(f"operand {arg.name} has {extent} elements on the token axis, expected "
                            f"{expected} or 1")
        outer = like.outer if like is not None else 1
        if outer > 1 and like.joint:
            raise self.fail(f"operand {arg.name} is combined token by token with a joint sequence whose token "
                            "axis is folded with the dims before it: no rule slices it per patch")
        # on a folded axis (Latte's per-position timestep table [B * HW, 1, D] on temporal tokens [B * HW, F, D])
        # the table is folded the same way: a patch takes its range of every one of the `outer` slices
        self.analysis.mark_positional(arg, axis, self.node, like.prefix if like else 0, like.suffix if like else 0,
                                      outer=outer)


def token_operands(ctx: RuleContext) -> list[tuple[fx.Node, TokenInfo]]:
    found = []
    for a in ctx.node.all_input_nodes:
        info = ctx.info(a)
        if info.carries_tokens:
            found.append((a, info))
    return found


# ----------------------------------------------------------------------------------------------------------
# Rules: (ctx) -> TokenInfo for the node's output. Called only when some operand carries tokens.


def rule_elementwise(ctx: RuleContext) -> TokenInfo:
    """Broadcasting op: token axes align from the right; GLOBAL operands spanning the axis are POSITIONAL."""
    out = ctx.out_shape()
    out_axis = None
    groups = None
    for a, info in token_operands(ctx):
        cand = len(out) - len(shape_of(a)) + info.axis
        if out_axis is not None and cand != out_axis:
            raise ctx.fail(f"operands carry tokens on different axes ({out_axis} vs {cand})")
        if groups is not None and groups != (info.prefix, info.suffix):
            raise ctx.fail("operands hold different token groups (text/image) along the token axis")
        out_axis, groups = cand, (info.prefix, info.suffix)
    like = token_operands(ctx)[0][1]
    if any(info.outer != like.outer for _, info in token_operands(ctx)):
        raise ctx.fail("operands carry tokens folded differently with the dims before the token axis")
    for a in ctx.node.all_input_nodes:
        if not ctx.info(a).carries_tokens and isinstance(example_value(a), torch.Tensor):
            nd = len(shape_of(a))
            ctx.positional(a, nd - (len(out) - out_axis), out_axis, like=like)
    return ctx.patched(out_axis, TokenRule.ELEMENTWISE)


def rule_view_complex(ctx: RuleContext) -> TokenInfo:
    """`view_as_complex` drops the last dim (the real/imaginary pair), `view_as_real` adds one: the dims before
    it, the token axis among them, stay where they are (aligning from the right, as for a broadcast, would
    move the axis by one)."""
    (a, info), = token_operands(ctx)
    if info.axis >= min(len(shape_of(a)), len(ctx.out_shape())) - (ctx.node.target is torch.view_as_complex):
        raise ctx.fail("view_as_complex over the token axis")
    return ctx.patched(info.axis, TokenRule.VIEW_COMPLEX)


def rule_cast(ctx: RuleContext) -> TokenInfo:
    """`x.type_as(other)` / `x.to(other)`: only `x`'s values matter; `other` only lends its dtype."""
    x = ctx.node.args[0]
    info = ctx.info(x)
    if not info.carries_tokens:
        return GLOBAL
    return ctx.patched(info.axis, TokenRule.CAST)


def reshape_axis(in_shape: tuple[int, ...], axis: int, out_shape: tuple[int, ...]) -> int | None:
    """Where the token axis of `in_shape` lands after a reshape to `out_shape`, or None if it is merged
    with dims before it (then a row band is no longer a contiguous range of one dim).

    The dims before the token axis must be reproduced exactly as a prefix; the innermost such split wins, so
    size-1 dims do not capture the axis.
    """
    outer = math.prod(in_shape[:axis])
    best = None
    for b in range(len(out_shape)):
        if math.prod(out_shape[:b]) == outer and out_shape[b] > 1:
            best = b
    return best


def fold_axis(in_shape: tuple[int, ...], axis: int, out_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(out dim, outer) when a reshape folds the token axis with the dims just before it (and maybe the dims
    just after it) into one dim, outer-major: [B, F, C, H, W] -> [B * F, C, H, W] (frames as token rows):
    out dim 0, outer B; [B, D, F, h, w] -> [B, D, F * h * w] (rows within frames): out dim 2, outer F, each
    of the F blocks holding the h rows of one frame in order. Else None."""
    for j in range(axis):
        for k in range(axis, len(in_shape)):
            for b in range(len(out_shape)):
                if (math.prod(out_shape[:b]) == math.prod(in_shape[:j])
                        and out_shape[b] == math.prod(in_shape[j:k + 1])):
                    return b, math.prod(in_shape[j:axis])
    return None


def rule_reshape(ctx: RuleContext) -> TokenInfo:
    """A reshape keeps the token axis (splitting it into rows and the rest is fine), or folds it with the
    dims before it (the fold is tracked as `outer`, e.g. batch x frames for a per-frame conv) or, on a
    folded axis, unfolds it back so that the dims before it reappear."""
    (a, info), = token_operands(ctx)
    if ctx.node.args[0] is not a:
        raise ctx.fail("the shape argument of a reshape depends on the image tokens")
    in_shape, out = shape_of(a), ctx.out_shape()
    if info.outer > 1:
        before = math.prod(in_shape[:info.axis])
        b = reshape_axis(in_shape[:info.axis] + (info.outer, in_shape[info.axis] // info.outer)
                         + in_shape[info.axis + 1:], info.axis + 1, out)
        if b is not None and math.prod(out[:b]) == before * info.outer:
            return ctx.patched(b, TokenRule.RESHAPE_UNFOLD, extra={"shape_arg": True}, outer=1)
        b = reshape_axis(in_shape, info.axis, out)
        if b is not None and out[b] % info.outer == 0 and out[b] > info.outer:
            return ctx.patched(b, TokenRule.RESHAPE, extra={"shape_arg": True})
        raise ctx.fail("reshape of a token axis folded with the dims before it, neither keeping the fold "
                       "nor unfolding it")
    b = reshape_axis(in_shape, info.axis, out)
    if b is not None:
        return ctx.patched(b, TokenRule.RESHAPE, extra={"shape_arg": True})
    fold = fold_axis(in_shape, info.axis, out)
    if fold is None and not info.joint:
        fold = split_fold_axis(in_shape, info.axis, out, info.epr)
    if fold is None or info.joint:
        raise ctx.fail("reshape merges the token axis with the dims before it (e.g. batch) in a way that is "
                       "not a plain fold, so a patch is no longer a contiguous range of one axis")
    b, outer = fold
    return ctx.patched(b, TokenRule.RESHAPE_FOLD, extra={"shape_arg": True}, outer=outer * info.outer)


def split_fold_axis(in_shape: tuple[int, ...], axis: int, out_shape: tuple[int, ...],
                    epr: Fraction) -> tuple[int, int] | None:
    """(out dim, outer) when a reshape splits the token axis into (units, rest) and folds the units with the
    dims before it, each unit whole input rows' worth of elements: [B, F * HW, D] -> [B * F, HW, D] for
    frames as token rows (per-frame spatial attention). Else None."""
    for j in range(axis + 1):
        before = math.prod(in_shape[j:axis])
        for b in range(len(out_shape)):
            if math.prod(out_shape[:b]) != math.prod(in_shape[:j]) or out_shape[b] % before:
                continue
            units = out_shape[b] // before
            if units <= 1 or in_shape[axis] % units:
                continue
            rest = in_shape[axis] // units
            # the rest of the token axis and the dims after it follow, unchanged in order
            if math.prod(out_shape[b + 1:]) != rest * math.prod(in_shape[axis + 1:]):
                continue
            if (epr / rest).denominator != 1 or not _suffix_dims(out_shape[b + 1:], rest, in_shape[axis + 1:]):
                continue
            return b, before
    return None


def _suffix_dims(out_rest: tuple[int, ...], rest: int, in_after: tuple[int, ...]) -> bool:
    """out_rest is `rest` (split into any dims) followed by the dims of `in_after` (split or merged in any
    way: diffusers' unpatchify views [B, F * h * w, p * p * C] as [B * F, h, w, p, p, C])."""
    return any(math.prod(out_rest[:k]) == rest and math.prod(out_rest[k:]) == math.prod(in_after)
               for k in range(len(out_rest) + 1))


def rule_expand(ctx: RuleContext) -> TokenInfo:
    (a, info), = token_operands(ctx)
    return ctx.patched(len(ctx.out_shape()) - len(shape_of(a)) + info.axis, TokenRule.EXPAND, extra={"shape_arg": True})


def rule_permute(ctx: RuleContext) -> TokenInfo:
    (a, info), = token_operands(ctx)
    nd = len(shape_of(a))
    target = ctx.node.target
    if target == "permute" or target is torch.permute:
        dims = ctx.node.args[1:]   # x.permute(0, 2, 1), x.permute((0, 2, 1)), torch.permute(x, (0, 2, 1))
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = dims[0]
        if not dims:
            dims = ctx.node.kwargs.get("dims")
        dims = [_norm_dim(d, nd) for d in dims]
        return ctx.patched(dims.index(info.axis), TokenRule.PERMUTE)
    if target == "t":
        d0, d1 = 0, 1
    elif target == "mT":
        d0, d1 = nd - 2, nd - 1
    elif target == "movedim" or target is torch.movedim:
        src, dst = _norm_dim(ctx.arg(1, "source"), nd), _norm_dim(ctx.arg(2, "destination"), nd)
        order = [d for d in range(nd) if d != src]
        order.insert(dst, src)
        return ctx.patched(order.index(info.axis), TokenRule.MOVEDIM)
    else:
        d0, d1 = _norm_dim(ctx.arg(1, "dim0"), nd), _norm_dim(ctx.arg(2, "dim1"), nd)
    ax = info.axis
    ax = d1 if ax == d0 else d0 if ax == d1 else ax
    return ctx.patched(ax, TokenRule.TRANSPOSE)


def rule_einsum(ctx: RuleContext) -> TokenInfo:
    eq = ctx.node.args[0]
    operands = ctx.node.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (tuple, list)):
        operands = operands[0]
    if not isinstance(eq, str) or "..." in eq or "->" not in eq:
        raise ctx.fail("einsum without an explicit output (or with '...') has no token rule")
    lhs, out = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    letter = None
    for sub, op in zip(subs, operands):
        info = ctx.info(op)
        if info.carries_tokens:
            if letter is not None and sub[info.axis] != letter:
                raise ctx.fail("einsum operands carry tokens on different letters")
            letter = sub[info.axis]
    like = next(ctx.info(op) for op in operands if ctx.info(op).carries_tokens)
    for sub, op in zip(subs, operands):
        if not ctx.info(op).carries_tokens and letter in sub:
            ctx.positional(op, sub.index(letter), out.index(letter) if letter in out else 0, like=like)
    if letter not in out:
        tokens = [op for op in operands if ctx.info(op).carries_tokens]
        if len(tokens) != sum(1 for sub in subs if letter in sub):
            raise ctx.fail(f"einsum '{eq}' sums over the token axis '{letter}' with a global operand on it")
        return _reduce_tokens(ctx, tokens, [ctx.info(op) for op in tokens])
    return ctx.patched(out.index(letter), TokenRule.EINSUM)


def rule_linear(ctx: RuleContext) -> TokenInfo:
    x = ctx.node.args[0]
    info = ctx.info(x)
    if not info.carries_tokens or any(ctx.info(w).carries_tokens for w in ctx.node.all_input_nodes if w is not x):
        raise ctx.fail("linear whose weight carries image tokens mixes tokens")
    if info.axis == len(shape_of(x)) - 1:
        raise ctx.fail("linear contracts over the token axis (mixes tokens)")
    return ctx.patched(info.axis, TokenRule.LINEAR)


def rule_matmul(ctx: RuleContext) -> TokenInfo:
    a, b = ctx.node.args[0], ctx.node.args[1]
    ia, ib = ctx.info(a), ctx.info(b)
    na, nb, nout = len(shape_of(a)), len(shape_of(b)), len(ctx.out_shape())
    if ia.carries_tokens and ib.carries_tokens and min(na, nb) >= 2 and ia.axis == na - 1 and ib.axis == nb - 2:
        # contracts the token axis of both (linear attention's phi(K)^T V): a reduction over the tokens
        return _reduce_tokens(ctx, (a, b), (ia, ib))
    if ia.carries_tokens and not ib.carries_tokens and na >= 2 and ia.axis < na - 1:
        return ctx.patched(nout - na + ia.axis, TokenRule.MATMUL)
    if ib.carries_tokens and not ia.carries_tokens and nb >= 2 and ib.axis == nb - 1:
        # tokens on b's columns (linear attention applies its summary to phi(Q) [.., D, N]): kept there
        return ctx.patched(nout - 1, TokenRule.MATMUL)
    raise ctx.fail("matmul over the token axis mixes tokens (only attention and reductions whose operands "
                   "both carry the tokens on the contracted axis may)")


def _reduce_tokens(ctx: RuleContext, operands, infos) -> TokenInfo:
    """A reduction over the token axis (STALE_INPUTS): every token-carrying operand is read from its full-size
    cache, so the operands must hold the image tokens alone (no text group, no fold), one row layout."""
    for a, i in zip(operands, infos):
        if i.joint or i.outer > 1 or i.elements is not None:
            raise ctx.fail(f"reduction over the token axis of {a.name}, which holds other token groups (text) or "
                           "a token axis folded with the dims before it: no cache rule for it")
    if len({i.epr for i in infos}) > 1:
        raise ctx.fail("reduction over the token axis of operands with different token layouts")
    return REDUCE_TOKENS


def rule_norm(ctx: RuleContext) -> TokenInfo:
    x = ctx.node.args[0]
    info = ctx.info(x)
    normalized = ctx.arg(1, "normalized_shape")
    n = len(normalized) if isinstance(normalized, (tuple, list)) else 1
    if not info.carries_tokens or info.axis >= len(shape_of(x)) - n:
        raise ctx.fail("normalization over the token axis mixes tokens")
    return ctx.patched(info.axis, TokenRule.NORM)


_TOKEN_REDUCTIONS = {"sum", "mean", "amax", "amin", "var", "std", "norm", torch.sum, torch.mean, torch.amax,
                     torch.var, torch.std, torch.norm, torch.linalg.vector_norm}
"""Reductions that may run over the token axis (on the full-size cache of their input: STALE_INPUTS)."""


def rule_reduce(ctx: RuleContext) -> TokenInfo:
    x = ctx.node.args[0]
    info = ctx.info(x)
    nd = len(shape_of(x))
    dim = ctx.arg(1, "dim")
    if isinstance(dim, torch.dtype):
        dim = None
    dims = [] if dim is None else ([dim] if isinstance(dim, int) else list(dim))
    dims = [_norm_dim(d, nd) for d in dims]
    if not dims or info.axis in dims:
        # over named dims only: a reduction of everything (batch too, to a scalar) is no per-sample summary
        if not dims or ctx.node.target not in _TOKEN_REDUCTIONS:
            raise ctx.fail("reduction over the token axis mixes tokens")
        if any(ctx.info(a).carries_tokens for a in ctx.node.all_input_nodes if a is not x):
            raise ctx.fail("reduction over the token axis with another token-carrying operand")
        return _reduce_tokens(ctx, (x,), (info,))
    out_nd = len(ctx.out_shape())
    shift = 0 if out_nd == nd else sum(1 for d in dims if d < info.axis)
    return ctx.patched(info.axis - shift, TokenRule.REDUCE)


def _conv_param(value, sd: int, default):
    """A conv's stride / padding / dilation along spatial dim `sd` (given per dim, as one int, or not at all)."""
    if value is None:
        return default
    return value[sd] if isinstance(value, (tuple, list)) else value


def rule_conv(ctx: RuleContext) -> TokenInfo:
    """A conv over the token rows: a patch embedding (kernel == stride, no padding, no dilation: each output row
    reads its own input rows) or, with stride 1 and the padding that keeps the rows ("same" conv, e.g. the
    depthwise 3x3 conv of a conv FFN), a conv that mixes neighbouring rows: MIXING with the HALO_ROWS rule
    (`halo` = the padding before and after, the rows of other patches a patch reads). Anything else is refused."""
    x, w = ctx.node.args[0], ctx.arg(1, "weight")
    info = ctx.info(x)
    if not info.carries_tokens or ctx.info(w).carries_tokens:
        raise ctx.fail("conv whose weight carries image tokens")
    nd = len(shape_of(x))
    k = len(shape_of(w)) - 2
    if info.axis == 0 and nd == k + 2:  # tokens along the conv's batch axis: each sample convolved alone
        return ctx.patched(0, TokenRule.CONV_BATCH_AXIS)
    sd = info.axis - (nd - k)
    if sd < 0:
        raise ctx.fail("conv over the channels of a token-carrying tensor")

    kernel = shape_of(w)[2 + sd]
    stride = _conv_param(ctx.arg(3, "stride"), sd, 1)
    padding = _conv_param(ctx.arg(4, "padding"), sd, 0)
    dilation = _conv_param(ctx.arg(5, "dilation"), sd, 1)
    if isinstance(padding, str):
        padding = 0 if padding == "valid" else -1
    if stride == kernel and padding == 0 and dilation == 1:
        return ctx.patched(info.axis, TokenRule.CONV_PATCH_EMBED)
    if stride == 1 and padding >= 0 and 2 * padding == dilation * (kernel - 1):
        if info.joint or info.outer > 1:
            raise ctx.fail("conv over token rows of a joint text+image sequence or of a token axis folded with "
                           "the dims before it: no halo rule for it")
        return ctx.patched(info.axis, TokenRule.CONV_HALO, kind=Kind.MIXING, mixing=MixingRule.HALO_ROWS,
                           halo=(padding, padding))
    raise ctx.fail(
        f"conv over token rows (kernel {kernel}, stride {stride}, padding {padding}, dilation {dilation}) mixes "
        "neighbouring rows and changes their number; supported: patch embeddings (kernel == stride, no padding) "
        "and stride-1 convs whose padding keeps the rows (halo rows)"
    )


def rule_conv_transpose(ctx: RuleContext) -> TokenInfo:
    """A transposed conv with kernel == stride, no padding, no output padding and no dilation on the token axis
    (an unpatchify, e.g. AceStep's `ConvTranspose1d(hidden, C, p, stride=p)`): each input row becomes `stride`
    output rows of its own, so it keeps the rows' order and mixes nothing. Any other transposed conv overlaps
    neighbouring rows' outputs: refused."""
    x, w = ctx.node.args[0], ctx.arg(1, "weight")
    info = ctx.info(x)
    if not info.carries_tokens or ctx.info(w).carries_tokens:
        raise ctx.fail("transposed conv whose weight carries image tokens")
    nd, k = len(shape_of(x)), len(shape_of(w)) - 2
    sd = info.axis - (nd - k)
    if sd < 0:
        raise ctx.fail("transposed conv over the channels of a token-carrying tensor")

    kernel = shape_of(w)[2 + sd]
    stride, padding = _conv_param(ctx.arg(3, "stride"), sd, 1), _conv_param(ctx.arg(4, "padding"), sd, 0)
    output_padding = _conv_param(ctx.arg(5, "output_padding"), sd, 0)
    dilation = _conv_param(ctx.arg(7, "dilation"), sd, 1)
    if (stride, padding, output_padding, dilation) != (kernel, 0, 0, 1) or info.joint:
        raise ctx.fail(f"transposed conv over token rows (kernel {kernel}, stride {stride}, padding {padding}, "
                       f"output padding {output_padding}, dilation {dilation}) overlaps neighbouring rows; only "
                       "an unpatchify (kernel == stride, no padding) is supported")
    return ctx.patched(info.axis, TokenRule.CONV_TRANSPOSE_UNPATCHIFY)


def rule_pad(ctx: RuleContext) -> TokenInfo:
    """`F.pad(x, pad, mode, value)` on dims other than the token axis keeps every row where it is (Sana's linear
    attention pads the head dim with ones). Padding the token axis would add rows no patch owns: refused."""
    (a, info), = token_operands(ctx)
    if ctx.node.args[0] is not a:
        raise ctx.fail("pad whose pad sizes or value depend on the image tokens")
    pad = ctx.arg(1, "pad")
    nd = len(shape_of(a))
    if not isinstance(pad, (tuple, list)) or any(not isinstance(p, int) for p in pad):
        raise ctx.fail("pad with sizes computed at run time on a token-carrying tensor")
    for i in range(len(pad) // 2):
        if nd - 1 - i == info.axis and (pad[2 * i] or pad[2 * i + 1]):
            raise ctx.fail("pad along the token axis (rows no patch owns)")
    return ctx.patched(info.axis, TokenRule.PAD)


def rule_sdpa(ctx: RuleContext) -> TokenInfo:
    q, k, v = ctx.arg(0, "query"), ctx.arg(1, "key"), ctx.arg(2, "value")
    iq, ik, iv = ctx.info(q), ctx.info(k), ctx.info(v)
    mask = ctx.arg(3, "attn_mask")
    nq = len(shape_of(q))
    if iq.carries_tokens and iq.outer > 1 and iq.axis == nq - 2:
        return _strided_attention(ctx, (q, k, v), (iq, ik, iv), mask)
    if any(i.outer > 1 for i in (iq, ik, iv)):
        return _local_attention(ctx, (q, k, v), (iq, ik, iv), mask)
    if isinstance(mask, fx.Node) and ctx.info(mask).carries_tokens:
        raise ctx.fail("attention mask computed from the image tokens")
    if ctx.arg(5, "is_causal", False):
        raise ctx.fail("causal attention over image tokens cannot use stale K/V")
    form = cross_group_kind(iq, ik, iv)
    if form is not None:   # a separate token stream's queries over image keys, or image queries over its keys
        return rule_cross_group_attention(ctx, q, k, v, iq, ik, mask, form)
    if not iq.carries_tokens:
        raise ctx.fail("attention whose query is global but whose keys carry image tokens (pools tokens)")
    if iq.axis != nq - 2:
        raise ctx.fail("attention query carries tokens off the sequence axis")
    if isinstance(mask, fx.Node):
        ctx.positional(mask, len(shape_of(mask)) - 2, nq - 2, like=iq)
    if ik.carries_tokens != iv.carries_tokens:
        raise ctx.fail("attention with only one of K/V carrying image tokens")
    if not ik.carries_tokens:
        return ctx.patched(iq.axis, TokenRule.CROSS_ATTENTION, attention="cross")
    for t, it in ((k, ik), (v, iv)):
        if it.axis != len(shape_of(t)) - 2 or it.epr != iq.epr:
            raise ctx.fail("self-attention whose K/V token layout differs from its query's")
    if (ik.prefix, ik.suffix) != (iq.prefix, iq.suffix) or (iv.prefix, iv.suffix) != (iq.prefix, iq.suffix):
        groups = _global_key_groups(ctx, (k, ik), (v, iv), iq)
        node_meta(ctx.node).extra["global_kv"] = groups
        return ctx.patched(iq.axis, TokenRule.SELF_ATTENTION_GLOBAL_KEYS, attention="self", kind=Kind.MIXING,
                           mixing=MixingRule.STALE_KV_GLOBAL_KEYS)
    return ctx.patched(iq.axis, TokenRule.SELF_ATTENTION, attention="self", kind=Kind.MIXING,
                       mixing=MixingRule.STALE_KV)


def _cat_operands(node) -> list | None:
    if not isinstance(node, fx.Node) or node.target not in (torch.cat, torch.concat, torch.concatenate):
        return None
    return list(node.args[0] if node.args else node.kwargs["tensors"])


def _global_key_groups(ctx: RuleContext, key, value, iq: TokenInfo) -> tuple[int, ...]:
    """Image queries over keys that are the image's K/V concatenated with K/V computed without the image
    tokens (text K/V of the prompt: NucleusMoE-Image [image | text], PRX [text | image]). Returns the token
    extent of each operand of the key concatenation, in order, with the image operand as 0; the K/V cache
    covers the whole key sequence, each patch writes its image rows and the GLOBAL operands (the same for
    every patch) into it. Any other form of keys with more token groups than the query is refused."""
    def refuse(why: str):
        it = key[1]
        return ctx.fail(
            f"self-attention whose keys hold other token groups than its query (query: {iq.prefix} tokens "
            f"before and {iq.suffix} after the image; keys: {it.prefix} before and {it.suffix} after): {why}; "
            "only image queries over a concatenation of the image's K/V with K/V that do not depend on the image "
            "tokens (e.g. the prompt's) are supported")

    if iq.joint:
        raise refuse("the query holds tokens of other groups too")
    layouts = []
    for t, it in (key, value):
        operands = _cat_operands(t)
        if operands is None or it.rule is not TokenRule.CAT_JOINT:
            raise refuse(f"{t.name} is not a concatenation (along the token axis) next to the attention")
        if len(t.users) != 1:
            raise refuse(f"{t.name} has other users than the attention")
        layout = []
        for a in operands:
            info = ctx.info(a)
            if info.carries_tokens:
                if info.joint or info.epr != iq.epr:
                    raise refuse(f"operand {a.name} of {t.name} holds tokens of other groups than the image "
                                 "(their K/V would come from a piece that runs no query here)")
                layout.append(0)
            else:
                layout.append(shape_of(a)[it.axis])
        layouts.append(tuple(layout))
    if layouts[0] != layouts[1]:
        raise refuse(f"the key and value concatenations differ ({layouts[0]} vs {layouts[1]}; 0: the image)")
    return layouts[0]


def _strided_attention(ctx: RuleContext, qkv, infos, mask) -> TokenInfo:
    """Attention along a token axis folded with the dims before it (`outer` > 1 on the sequence axis), e.g.
    [B, heads, F * h * w, d] with the rows within frames: a patch is the same rows of every frame, a strided
    set of the sequence, and a self-attention's K/V cache is written at those positions (the lowering views
    the cache's token axis as [outer, rest]). Attention is invariant to the order of its keys, and a patch's
    queries keep their order in its output, so nothing else changes. K and V must be folded alike; GLOBAL K/V
    (the prompt) make it a cross-attention."""
    q, k, v = qkv
    iq, ik, iv = infos
    if isinstance(mask, fx.Node) and ctx.info(mask).carries_tokens:
        raise ctx.fail("attention mask computed from the image tokens")
    if ctx.arg(5, "is_causal", False):
        raise ctx.fail("causal attention over image tokens cannot use stale K/V")
    if isinstance(mask, fx.Node):
        ctx.positional(mask, len(shape_of(mask)) - 2, len(shape_of(q)) - 2, like=iq)
    if ik.carries_tokens != iv.carries_tokens:
        raise ctx.fail("attention with only one of K/V carrying image tokens")
    if not ik.carries_tokens:
        return ctx.patched(iq.axis, TokenRule.CROSS_ATTENTION, attention="cross", outer=iq.outer)
    for t, it in ((k, ik), (v, iv)):
        if it.axis != len(shape_of(t)) - 2 or (it.epr, it.outer) != (iq.epr, iq.outer):
            raise ctx.fail("self-attention whose K/V token layout differs from its query's (folded with the dims "
                           "before the token axis differently)")
    return ctx.patched(iq.axis, TokenRule.SELF_ATTENTION, attention="self", kind=Kind.MIXING, outer=iq.outer,
                       mixing=MixingRule.STALE_KV)


def _local_attention(ctx: RuleContext, qkv, infos, mask) -> TokenInfo:
    """Attention whose token rows lie on a batch dim (folded with the real batch, `outer` > 1), e.g. spatial
    attention per frame on [B * F, H, HW, D] with frames as token rows: each row attends within itself, so a
    patch of rows needs nothing of the others (no cache, no stale values). Its sequence axis must not carry
    tokens, and q, k, v must carry the same rows."""
    nq = len(shape_of(qkv[0]))
    for t, i in zip(qkv, infos):
        if i.carries_tokens and i.outer > 1 and i.axis >= nq - 2:
            raise ctx.fail("attention along a token axis folded with the dims before it (e.g. batch x frames): "
                           "a patch is not a contiguous range of its sequence")
        if not i.carries_tokens or i.axis >= nq - 2 or (i.axis, i.epr, i.outer) != (infos[0].axis, infos[0].epr,
                                                                                      infos[0].outer):
            raise ctx.fail("attention whose query, key and value carry the token rows on a batch dim, but not "
                           "all three on the same one")
    if isinstance(mask, fx.Node) and ctx.info(mask).carries_tokens:
        raise ctx.fail("attention mask computed from the image tokens")
    return ctx.patched(infos[0].axis, TokenRule.ATTENTION_LOCAL, attention="local")


def _select_range(ctx: RuleContext, info: TokenInfo, extent: int, lo: int, hi: int, out_axis: int,
                  shape: tuple[int, ...]) -> TokenInfo:
    """Info of elements [lo, hi) of a token axis of `extent` elements whose image part is
    [info.prefix, extent - info.suffix): the whole image part with some text around it, or text only.
    A range that cuts through the image part has no rule (it would split image tokens by position)."""
    img_lo, img_hi = info.prefix, extent - info.suffix
    if img_hi == img_lo:    # a value of one group only: the part keeps its side
        side = "prefix" if info.prefix else "suffix"
        return ctx.analysis.make_info(None, out_axis, TokenRule.TEXT_GROUP, shape=shape, **{side: hi - lo})
    if hi <= img_lo:        # tokens of the head group (before the image)
        return ctx.analysis.make_info(None, out_axis, TokenRule.TEXT_GROUP, shape=shape, prefix=hi - lo)
    if lo >= img_hi:        # tokens of the tail group (after the image)
        return ctx.analysis.make_info(None, out_axis, TokenRule.TEXT_GROUP, shape=shape, suffix=hi - lo)
    if lo <= img_lo and hi >= img_hi:
        return ctx.analysis.make_info(None, out_axis, TokenRule.TOKEN_GROUP, shape=shape, prefix=img_lo - lo,
                                      suffix=hi - img_hi)
    raise ctx.fail("slicing the token axis through the image tokens (only whole token groups, e.g. the "
                   "text and image parts of a joint sequence, can be selected)")


def _split_like(ctx: RuleContext, dim_index: int, drop_dim: bool) -> TokenInfo:
    (a, info), = token_operands(ctx)
    nd = len(shape_of(a))
    dim = _norm_dim(ctx.arg(dim_index, "dim", 0), nd)
    val = example_value(ctx.node)
    if dim == info.axis:
        if info.outer > 1:
            raise ctx.fail("splitting a token axis folded with the dims before it (e.g. batch x frames)")
        if drop_dim:
            raise ctx.fail("unbind along the token axis (one tensor per token) has no rule")
        extent, lo, elements = shape_of(a)[dim], 0, []
        for v in val:
            hi = lo + int(v.shape[dim])
            elements.append(_select_range(ctx, info, extent, lo, hi, dim, tuple(v.shape)))
            lo = hi
        return TokenInfo(Kind.PATCHED, rule=TokenRule.SPLIT_GROUPS, elements=tuple(elements))
    axis = info.axis - (1 if drop_dim and dim < info.axis else 0)
    elements = tuple(ctx.analysis.make_info(None, axis, TokenRule.SPLIT, shape=tuple(v.shape), prefix=info.prefix,
                                            suffix=info.suffix, outer=info.outer) for v in val)
    return TokenInfo(Kind.PATCHED, rule=TokenRule.SPLIT, elements=elements)


def rule_chunk_split(ctx: RuleContext) -> TokenInfo:
    return _split_like(ctx, 2, drop_dim=False)


def rule_unbind(ctx: RuleContext) -> TokenInfo:
    return _split_like(ctx, 1, drop_dim=True)


def rule_cat(ctx: RuleContext, stack: bool = False) -> TokenInfo:
    tensors = ctx.arg(0, "tensors")
    out = ctx.out_shape()
    nd_in = len(out) - (1 if stack else 0)
    dim = _norm_dim(ctx.arg(1, "dim", 0), len(out) if stack else nd_in)
    axis = None
    for t in tensors:
        info = ctx.info(t)
        if info.carries_tokens:
            if axis is not None and info.axis != axis:
                raise ctx.fail("concatenated tensors carry tokens on different axes")
            axis = info.axis
    out_axis = axis + (1 if stack and dim <= axis else 0)
    outers = {ctx.info(t).outer for t in tensors if ctx.info(t).carries_tokens}
    if not stack and dim == axis:
        if outers != {1}:
            raise ctx.fail("concatenation along a token axis folded with the dims before it (e.g. frames x rows)")
        return _cat_groups(ctx, tensors, axis)
    if len(outers) > 1:
        raise ctx.fail("concatenated tensors carry tokens folded differently with the dims before the token axis")
    if len({(ctx.info(t).prefix, ctx.info(t).suffix) for t in tensors if ctx.info(t).carries_tokens}) > 1:
        raise ctx.fail("concatenated tensors hold different token groups (text/image) along the token axis")
    for t in tensors:
        if not ctx.info(t).carries_tokens:
            if isinstance(t, fx.Node) and len(shape_of(t)) == nd_in and shape_of(t)[axis] != out[out_axis]:
                raise ctx.fail(f"{t.name} does not span the token axis of the other concatenated tensors")
            ctx.positional(t, axis, out_axis, like=next(ctx.info(x) for x in tensors if ctx.info(x).carries_tokens))
    return ctx.patched(out_axis, TokenRule.STACK if stack else TokenRule.CAT)


def _cat_groups(ctx: RuleContext, tensors, axis: int) -> TokenInfo:
    """Concatenation along the token axis: a joint text+image sequence. At most one operand holds image
    tokens; the others (GLOBAL text, or text-only values) become the text groups before and after it."""
    before = after = 0
    image = None
    for t in tensors:
        info = ctx.info(t)
        extent = shape_of(t)[axis]
        has_image = info.carries_tokens and extent - info.prefix - info.suffix > 0
        if has_image:
            if image is not None:
                raise ctx.fail("concatenating two tensors that both hold image tokens")
            image = info
            before += info.prefix
            after += info.suffix
        elif image is None:
            before += extent
        else:
            after += extent
    if image is not None:
        seen_image = False
        for t in tensors:
            info = ctx.info(t)
            if info.carries_tokens and info is not image and info.epr == 0 and (
                    info.suffix if not seen_image else info.prefix):
                # tokens computed as the group on one side of the image (each side is its own piece) placed
                # on the other side: the piece that computes them would not be the piece that reads them
                raise ctx.fail(
                    f"{t.name} holds tokens of the group {'after' if info.suffix else 'before'} the image tokens "
                    f"and is concatenated {'before' if not seen_image else 'after'} them (the same tokens on "
                    "both sides of the image are not supported)")
            seen_image = seen_image or info is image
    if image is None:  # tokens of other groups only: one side (two parts of the head group, say)
        sides = {"suffix" if ctx.info(t).suffix else "prefix" for t in tensors if ctx.info(t).carries_tokens}
        if len(sides) > 1:
            raise ctx.fail("concatenating tokens from before and after the image tokens without the image")
        groups = {"prefix": 0, "suffix": 0}
        groups[sides.pop() if sides else "prefix"] = before + after
        return ctx.patched(axis, TokenRule.CAT_TEXT, **groups)
    return ctx.patched(axis, TokenRule.CAT_JOINT, prefix=before, suffix=after)


def rule_getitem(ctx: RuleContext) -> TokenInfo:
    src, index = ctx.node.args
    info = ctx.info(src)
    if info.elements is not None:
        return info.elements[index]
    if not isinstance(example_value(src), torch.Tensor):
        raise ctx.fail("indexing a non-tensor that carries tokens")
    in_shape = shape_of(src)
    items = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    in_dim = out_dim = 0
    out_axis = None
    selected = None
    for it in items:
        if it is None:
            out_dim += 1
            continue
        if it is Ellipsis:
            skip = len(in_shape) - consumed
            if in_dim <= info.axis < in_dim + skip:
                out_axis = out_dim + (info.axis - in_dim)
            in_dim += skip
            out_dim += skip
            continue
        if isinstance(it, int):
            if in_dim == info.axis:
                raise ctx.fail("indexing a single token row")
            in_dim += 1
            continue
        if isinstance(it, slice):
            if in_dim == info.axis:
                lo, hi, step = it.indices(in_shape[in_dim])
                if step != 1:
                    raise ctx.fail("strided slicing of the token axis")
                if (lo, hi) != (0, in_shape[in_dim]):
                    selected = (lo, hi)
                out_axis = out_dim
            in_dim += 1
            out_dim += 1
            continue
        raise ctx.fail("advanced (tensor) indexing of a token-carrying tensor")
    if out_axis is None:
        out_axis = out_dim + (info.axis - in_dim)
    if selected is not None and info.outer > 1:
        raise ctx.fail("slicing a token axis folded with the dims before it (e.g. batch x frames)")
    if selected is not None:
        choice = _select_range(ctx, info, in_shape[info.axis], *selected, out_axis, ctx.out_shape())
        return ctx.patched(out_axis, TokenRule.GETITEM_GROUP, prefix=choice.prefix, suffix=choice.suffix)
    return ctx.patched(out_axis, TokenRule.GETITEM)


def rule_setitem(ctx: RuleContext) -> TokenInfo:
    """`target[index] = value` (e.g. interleaved RoPE writes `out[..., 0::2] = ...`): allowed when the index
    leaves the target's token axis whole and the value lines up with it, or, on a joint text+image target,
    selects one whole token group there (RoPE on the image part: `q[:, :, text_len:] = rope(q[:, :, text_len:])`)
    and the value holds that group. The node itself has no value; its info is the target's (the mutated tensor
    keeps its layout); a group write records which group and where its token-axis index is (`group_write`)."""
    target, index, value = ctx.node.args
    info = ctx.info(target)
    if not info.carries_tokens:
        raise ctx.fail("writing image tokens into a global tensor (it would mix them)" + _buffer_note(target))
    shape = shape_of(target)
    items = index if isinstance(index, tuple) else (index,)
    consumed = sum(1 for it in items if it is not None and it is not Ellipsis)
    dim = 0
    group = None
    for pos, it in enumerate(items):
        if it is Ellipsis:
            dim += len(shape) - consumed
            continue
        if it is None:
            continue
        if dim == info.axis and not (isinstance(it, slice) and it.indices(shape[dim]) == slice(None).indices(shape[dim])):
            if not (info.joint and isinstance(it, slice) and it.indices(shape[dim])[2] == 1):
                raise ctx.fail("in-place write to part of the token axis")
            lo, hi, _ = it.indices(shape[dim])
            group = pos, _select_range(ctx, info, shape[dim], lo, hi, dim, shape[:dim] + (hi - lo,) + shape[dim + 1:])
            if group[1].joint and group[1].epr != 0:
                raise ctx.fail("in-place write to the image tokens and part of the text of a joint sequence")
        if not isinstance(it, (int, slice)):
            raise ctx.fail("in-place write with a tensor index into a token-carrying tensor")
        dim += 1
    vinfo = ctx.info(value)
    if group is not None:
        pos, part = group
        lines_up = (vinfo.carries_tokens and (vinfo.epr, vinfo.prefix, vinfo.suffix) == (part.epr, part.prefix, part.suffix))
        if not (lines_up or (part.epr == 0 and not vinfo.carries_tokens)):
            raise ctx.fail("in-place write into one token group of a joint sequence of a value that does not "
                           "hold exactly that group")
        node_meta(ctx.node).extra["group_write"] = (
            "image" if part.epr != 0 else "head" if part.prefix else "tail", pos)
        return TokenInfo(Kind.PATCHED, info.axis, info.epr, TokenRule.SETITEM_GROUP, prefix=info.prefix,
                         suffix=info.suffix)
    if isinstance(value, fx.Node) and isinstance(example_value(value), torch.Tensor):
        nd = len(shape_of(value))
        axis_in_value = nd - (len(shape) - info.axis)
        if vinfo.carries_tokens and (vinfo.axis, vinfo.outer) != (axis_in_value, info.outer):
            raise ctx.fail("in-place write of a value whose tokens lie on another axis (or are folded with the "
                           "dims before it otherwise)")
        if not vinfo.carries_tokens:
            ctx.positional(value, axis_in_value, info.axis, expected=shape[info.axis], like=info)
    return TokenInfo(info.kind if info.kind is Kind.PATCHED else Kind.PATCHED, info.axis, info.epr, TokenRule.SETITEM,
                     prefix=info.prefix, suffix=info.suffix, outer=info.outer)


def _buffer_note(target) -> str:
    """Why the writes into a fresh buffer were not rewritten as a concatenation (`buffer_writes`), if they were
    looked at."""
    refusal = node_meta(target).extra.get("not_concatenation") if isinstance(target, fx.Node) else None
    if refusal is None:
        return ""
    return (f"; {target.name} is a fresh buffer filled by slice writes, which is read as the concatenation of the "
            f"written values only when they tile it exactly, but here {refusal.describe()}")


def rule_repeat(ctx: RuleContext) -> TokenInfo:
    """`x.repeat(*counts)` tiles x; with count 1 at the token axis the tokens keep their order there (tiling
    the token axis itself would put a patch's rows in several places: refused)."""
    (a, info), = token_operands(ctx)
    counts = ctx.node.args[1:]
    if len(counts) == 1 and isinstance(counts[0], (tuple, list, torch.Size)):
        counts = tuple(counts[0])
    nd = len(shape_of(a))
    if not counts or any(not isinstance(c, int) for c in counts):
        raise ctx.fail("repeat with counts computed at run time on a token-carrying tensor")
    shift = len(counts) - nd
    if counts[shift + info.axis] != 1:
        raise ctx.fail("repeat that tiles the token axis")
    return ctx.patched(info.axis + shift, TokenRule.REPEAT)


def rule_flip(ctx: RuleContext) -> TokenInfo:
    """`x.flip(dims)` reverses other axes (the frames of a bidirectional scan): every token keeps its place on
    the token axis; reversing the token axis itself would move a patch's tokens to another patch's place."""
    (a, info), = token_operands(ctx)
    dims = ctx.arg(1, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims)
    nd = len(shape_of(a))
    if info.axis in [_norm_dim(d, nd) for d in dims]:
        raise ctx.fail("flip of the token axis (it reverses the order of the tokens)")
    return ctx.patched(info.axis, TokenRule.FLIP)


def rule_narrow(ctx: RuleContext) -> TokenInfo:
    """`x.narrow(dim, start, length)` on another axis (the frames of a scan shifted by one step) keeps every
    token where it is; on the token axis it would select a fixed range of tokens whatever the patch."""
    (a, info), = token_operands(ctx)
    if _norm_dim(ctx.arg(1, "dim"), len(shape_of(a))) == info.axis:
        raise ctx.fail("narrow of the token axis (a fixed range of tokens, whatever the patch)")
    return ctx.patched(info.axis, TokenRule.NARROW)


def rule_repeat_interleave(ctx: RuleContext) -> TokenInfo:
    """`x.repeat_interleave(n, dim)` along another dim than the token axis keeps the token order."""
    x = ctx.node.args[0]
    info = ctx.info(x)
    repeats, dim = ctx.arg(1, "repeats"), ctx.arg(2, "dim")
    if not info.carries_tokens or isinstance(repeats, fx.Node) and ctx.info(repeats).carries_tokens:
        raise ctx.fail("repeat_interleave whose repeat counts depend on the image tokens")
    if dim is None:
        raise ctx.fail("repeat_interleave without dim flattens the token axis")
    if _norm_dim(dim, len(shape_of(x))) == info.axis:
        raise ctx.fail("repeat_interleave along the token axis")
    return ctx.patched(info.axis, TokenRule.REPEAT_INTERLEAVE)


def rule_embedding(ctx: RuleContext) -> TokenInfo:
    idx = ctx.node.args[0]
    info = ctx.info(idx)
    if not info.carries_tokens:
        raise ctx.fail("embedding table carries image tokens")
    return ctx.patched(info.axis, TokenRule.EMBEDDING)


def rule_shape_query(ctx: RuleContext) -> TokenInfo:
    raise ctx.fail("reading the size of a token-carrying tensor at run time (the size changes per patch)")


_ELEMENTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow, operator.iadd,
    operator.imul, operator.isub, operator.itruediv, operator.floordiv,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.sin, torch.cos, torch.tanh,
    torch.sigmoid, torch.rsqrt, torch.sqrt, torch.abs, torch.where, torch.clamp, torch.pow, torch.erf,
    torch.square, torch.relu, torch.maximum, torch.minimum, torch.lerp, torch.addcmul, torch.nan_to_num,
    torch.real, torch.imag, torch.clamp_min, torch.clamp_max, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.randn_like,
    F.silu, F.gelu, torch._C._nn.gelu, F.relu, F.dropout, F.mish, F.softplus, F.sigmoid, F.tanh, F.leaky_relu,
    F.hardswish, F.elu,
    # comparisons and logic: element-wise masks (`x == 0`, `~mask`), one output per element
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge, operator.invert, operator.and_,
    operator.or_, operator.xor, torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.logical_not,
    torch.logical_and, torch.logical_or, torch.isnan, torch.isinf, torch.isfinite,
]
_ELEMENTWISE_METHODS = [
    "float", "half", "bfloat16", "double", "type", "contiguous", "clone", "detach", "add",
    "sub", "mul", "div", "neg", "pow", "exp", "sin", "cos", "tanh", "sigmoid", "rsqrt", "sqrt", "abs",
    "clamp", "clamp_", "clamp_min", "clamp_max", "masked_fill", "add_", "mul_", "sub_", "div_", "float_", "bool", "int", "long",
    "square", "erf", "relu", "silu", "gelu", "new_zeros_like", "__add__", "__mul__", "lerp", "addcmul",
    "zero_", "fill_", "copy_", "where", "nan_to_num",
    "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or", "isnan", "isinf", "isfinite",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__invert__", "__and__", "__or__",
]

RULES: dict[object, Callable[[RuleContext], TokenInfo]] = {}
for _f in _ELEMENTWISE_FUNCS:
    RULES[_f] = rule_elementwise
for _m in _ELEMENTWISE_METHODS:
    RULES[_m] = rule_elementwise
for _t in ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
           torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten):
    RULES[_t] = rule_reshape
for _t in ("expand", "expand_as", "broadcast_to", torch.broadcast_to):
    RULES[_t] = rule_expand
for _t in ("permute", "transpose", "swapaxes", "t", "mT", "movedim",
           torch.permute, torch.transpose, torch.swapaxes, torch.movedim):
    RULES[_t] = rule_permute
for _t in (torch.einsum, torch.functional.einsum):
    RULES[_t] = rule_einsum
for _t in (torch._C._nn.linear, F.linear):
    RULES[_t] = rule_linear
for _t in (torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm", "__matmul__"):
    RULES[_t] = rule_matmul
for _t in (F.layer_norm, torch.layer_norm, torch.rms_norm, getattr(F, "rms_norm", torch.rms_norm)):
    RULES[_t] = rule_norm
for _t in ("mean", "sum", "amax", "amin", "max", "min", "softmax", "log_softmax", "var", "std", "norm",
           "any", "all", "argmax", torch.mean, torch.sum, torch.softmax, F.softmax, F.log_softmax,
           torch.amax, torch.amin, torch.all, torch.any, torch.var, torch.std, torch.norm, torch.linalg.vector_norm):
    RULES[_t] = rule_reduce
for _t in (torch.conv1d, torch.conv2d, torch.conv3d, F.conv1d, F.conv2d, F.conv3d):
    RULES[_t] = rule_conv
for _t in SDPA_TARGETS:
    RULES[_t] = rule_sdpa
for _t in ("chunk", "split", "split_with_sizes", "tensor_split", torch.chunk, torch.split,
           torch.functional.split, torch.tensor_split):
    RULES[_t] = rule_chunk_split
for _t in ("unbind", torch.unbind):
    RULES[_t] = rule_unbind
for _t in (torch.cat, torch.concat, torch.concatenate):
    RULES[_t] = rule_cat
RULES[torch.stack] = lambda ctx: rule_cat(ctx, stack=True)
RULES["to"] = RULES["type_as"] = rule_cast
RULES[torch.view_as_complex] = RULES[torch.view_as_real] = rule_view_complex
RULES["repeat"] = rule_repeat
RULES["flip"] = RULES[torch.flip] = rule_flip
RULES["narrow"] = RULES[torch.narrow] = rule_narrow
RULES["repeat_interleave"] = RULES[torch.repeat_interleave] = rule_repeat_interleave
RULES[operator.getitem] = rule_getitem
for _t in (F.pad, torch._C._nn.pad):
    RULES[_t] = rule_pad
for _t in (torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d, F.conv_transpose1d,
           F.conv_transpose2d, F.conv_transpose3d):
    RULES[_t] = rule_conv_transpose
RULES[operator.setitem] = rule_setitem


def rule_new_tensor(ctx: RuleContext) -> TokenInfo:
    """`x.new_zeros(sizes)` (and new_ones/new_empty/new_full/new_tensor): a fresh tensor that takes only
    the dtype and device of `x`, never its values, so it does not depend on the tokens (GLOBAL)."""
    return GLOBAL


for _m in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor"):
    RULES[_m] = rule_new_tensor
for _t in (F.embedding, torch.embedding):
    RULES[_t] = rule_embedding
for _t in ("size", "dim", "numel", "item", "tolist", torch.numel):
    RULES[_t] = rule_shape_query


# Rules that may run on a folded token axis (`TokenInfo.outer` > 1): they never use token positions (a POSITIONAL
# operand is marked folded the same way by `RuleContext.positional`) or handle the fold themselves (reshape, conv).
FOLD_SAFE_RULES = {rule_elementwise, rule_cast, rule_reshape, rule_permute, rule_linear, rule_norm, rule_reduce,
                   rule_conv, rule_sdpa, rule_chunk_split, rule_pad, rule_unbind, rule_getitem, rule_view_complex,
                   rule_repeat, rule_repeat_interleave, rule_setitem, rule_cat, rule_flip, rule_narrow}


def rule_for(node: fx.Node) -> Callable[[RuleContext], TokenInfo] | None:
    if node.op not in ("call_function", "call_method") or isinstance(node.target, str) != (node.op == "call_method"):
        return None  # call_module: a submodule dynamo did not inline (its target is a path, not a method name)
    try:
        return RULES.get(node.target)
    except TypeError:  # unhashable target
        return None


def op_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_module":
        return f"module {t} ({type(node.graph.owning_module.get_submodule(t)).__name__})" \
            if node.graph.owning_module is not None else f"module {t}"
    if isinstance(t, str):
        return f"Tensor.{t}"
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', str(t))}".lstrip(".")


