"""Token rules for the samples of a list latent combined inside the graph, and the lowering of their split.

A latent passed as a list of per-sample tensors is one graph input per sample (`graph_inputs`), each patched
alike: a patch is the same band of rows of every sample. The models combine the samples in two ways:

    torch.stack(xs)            [C, H, W] x B -> [B, C, H, W]      a batched latent (`token_rules.rule_cat`)
    pad_sequence(xs, True)     [S, D] x B    -> [B, S, D]         the same, when every sample has S tokens
    torch.cat(xs, dim=0)       [S, D] x B    -> [B * S, D]        the samples folded into the token axis,
                                                                  sample-major: `outer` = B blocks of S tokens
    x.split([S] * B, dim=0)    [B * S, D]    -> [S, D] x B        one block each (`outer` 1 again)

A folded value (`TokenInfo.outer`, see passes/README.md) holds the same range of every block in a patch, so
only the ops that ignore token positions read it; `rewrite_sample_splits` turns the split into one block per
sample into a split that does not measure the blocks (`unflatten` + `unbind`), right for every piece.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .meta import Kind, TokenInfo, TokenRule, example_value, node_meta
from .token_rules import (
    FOLD_SAFE_RULES, RULES, RuleContext, _norm_dim, rule_cat, rule_chunk_split, shape_of, token_operands,
)

_SPLIT_TARGETS = ("chunk", "split", "split_with_sizes", "tensor_split", torch.chunk, torch.split,
                  torch.functional.split, torch.tensor_split)
_PAD_SEQUENCE = (torch._C._nn.pad_sequence, torch.nn.utils.rnn.pad_sequence)


def _image_blocks(ctx: RuleContext, tensors, dim: int) -> int | None:
    """The number of sample blocks of `cat(tensors, dim)` when every operand holds whole images (no other
    token group) along `dim`, its token axis, with as many elements per block; else None."""
    infos = [ctx.info(t) for t in tensors]
    if not infos or any(not i.carries_tokens or i.axis != dim or i.joint or i.epr is None or i.epr <= 0
                        for i in infos):
        return None
    if len({i.epr / i.outer for i in infos}) != 1:
        return None
    return sum(i.outer for i in infos)


def rule_cat_samples(ctx: RuleContext, stack: bool = False) -> TokenInfo:
    """`cat(xs, dim)` along the token axis of operands that each hold whole images (the samples of a list
    latent, patchified one by one): the token axis folded with the samples, `outer` = the number of blocks.
    Any other concatenation: `token_rules.rule_cat` (a joint text+image sequence, a stack, other dims)."""
    tensors = ctx.arg(0, "tensors")
    if not stack and isinstance(tensors, (list, tuple)) and tensors:
        first = next((t for t in tensors if ctx.info(t).carries_tokens), None)
        if first is not None:
            dim = _norm_dim(ctx.arg(1, "dim", 0), len(shape_of(first)))
            blocks = _image_blocks(ctx, tensors, dim)
            if blocks is not None and len(tensors) > 1:
                return ctx.patched(dim, TokenRule.CAT_SAMPLES, outer=blocks)
    return rule_cat(ctx, stack=stack)


def _split_sizes(ctx: RuleContext, extent: int) -> list[int] | None:
    """The sizes a chunk/split node cuts its input into, read from its example value."""
    val = example_value(ctx.node)
    if not isinstance(val, (tuple, list)):
        return None
    return [int(v.shape[_norm_dim(ctx.arg(2, "dim", 0), val[0].dim())]) for v in val]


def rule_split_samples(ctx: RuleContext) -> TokenInfo:
    """`x.split([S] * B, dim)` / `x.chunk(B, dim)` of a token axis folded with B sample blocks (`cat-samples`),
    one block per part: each part is one sample's tokens (`outer` 1). Any other split: `rule_chunk_split`."""
    ops = token_operands(ctx)
    if len(ops) == 1 and ops[0][1].outer > 1:
        a, info = ops[0]
        nd = len(shape_of(a))
        dim = _norm_dim(ctx.arg(2, "dim", 0), nd)
        if dim == info.axis:
            extent = shape_of(a)[dim]
            block = extent // info.outer
            sizes = _split_sizes(ctx, extent)
            if sizes is None or sizes != [block] * info.outer:
                raise ctx.fail(f"splitting a token axis folded with {info.outer} sample blocks of {block} "
                               f"elements into parts of {sizes}: only one part per sample block has a rule")
            elements = tuple(ctx.analysis.make_info(None, dim, TokenRule.SPLIT_SAMPLES, shape=tuple(v.shape))
                             for v in example_value(ctx.node))
            return TokenInfo(Kind.PATCHED, rule=TokenRule.SPLIT_SAMPLES, elements=elements, outer=info.outer, axis=dim)
    return rule_chunk_split(ctx)


def rule_pad_sequence(ctx: RuleContext) -> TokenInfo:
    """`pad_sequence(xs, batch_first)` of token-carrying tensors of one shape pads nothing: it is
    `stack(xs, 0 if batch_first else 1)`. Tensors of different lengths would be padded by position (refused)."""
    tensors = list(ctx.arg(0, "sequences"))
    batch_first = bool(ctx.arg(1, "batch_first", False))
    shapes = {shape_of(t) for t in tensors}
    if len(shapes) != 1:
        raise ctx.fail(f"pad_sequence of token-carrying tensors of different shapes {sorted(shapes)}: it pads "
                       "by position, which no rule follows")
    side = ctx.arg(3, "padding_side", "right")
    if side not in ("right", "left"):
        raise ctx.fail(f"pad_sequence with padding_side={side!r}")
    infos = [ctx.info(t) for t in tensors]
    if any(not i.carries_tokens for i in infos):
        raise ctx.fail("pad_sequence of image-token tensors and tensors without image tokens")
    first = infos[0]
    if any((i.axis, i.epr, i.prefix, i.suffix, i.outer) != (first.axis, first.epr, first.prefix, first.suffix,
                                                            first.outer) for i in infos):
        raise ctx.fail("pad_sequence of tensors whose tokens lie differently (axis, groups or fold)")
    dim = 0 if batch_first else 1
    out_axis = first.axis + (1 if dim <= first.axis else 0)
    return ctx.patched(out_axis, TokenRule.PAD_SEQUENCE_STACK, prefix=first.prefix, suffix=first.suffix)


for _t in (torch.cat, torch.concat, torch.concatenate):
    RULES[_t] = rule_cat_samples
RULES[torch.stack] = lambda ctx: rule_cat_samples(ctx, stack=True)
for _t in _SPLIT_TARGETS:
    RULES[_t] = rule_split_samples
for _t in _PAD_SEQUENCE:
    RULES[_t] = rule_pad_sequence
FOLD_SAFE_RULES.update({rule_cat_samples, rule_split_samples, rule_pad_sequence})


def rewrite_sample_splits(gm: fx.GraphModule) -> fx.GraphModule:
    """A split of a folded token axis into its sample blocks (`split-samples`) measures the blocks in elements
    (64 tokens at full size, a band's tokens in a band): split by the block count instead.

    Before (2 samples of 64 tokens, a band of 16 each):   After:
        %s = split(%x, [64, 64], dim=0)   # x [32, D]          %u = unflatten(%x, 0, (2, -1))   # [2, 16, D]
        %a = getitem(%s, 0)                                    %s = unbind(%u, 0)
        %b = getitem(%s, 1)                                    %a = getitem(%s, 0) ...
    """
    for n in list(gm.graph.nodes):
        info = node_meta(n).token if n.op in ("call_function", "call_method") else None
        if info is None or info.rule is not TokenRule.SPLIT_SAMPLES or info.elements is None:
            continue
        src = n.args[0] if n.args else n.kwargs.get("input", n.kwargs.get("self"))
        with gm.graph.inserting_before(n):
            unflat = gm.graph.call_method("unflatten", (src, info.axis, (info.outer, -1)))
        unflat.meta["stack_trace"] = n.meta.get("stack_trace")
        block = info.elements[0]
        node_meta(unflat).token = TokenInfo(Kind.PATCHED, info.axis + 1, block.epr, TokenRule.UNFLATTEN_SAMPLES)
        n.op, n.target, n.args, n.kwargs = "call_method", "unbind", (unflat, info.axis), {}
    gm.graph.lint()
    gm.recompile()
    return gm
