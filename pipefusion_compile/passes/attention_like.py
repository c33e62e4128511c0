"""Attention-like computation that the backend does not recognize as attention, found by dataflow and op identity.

The backend pipelines self-attention written as `scaled_dot_product_attention` (`sdpa.py`). A graph may also
hold attention in other forms, which the token analysis refuses (they mix tokens with no rule), so the graph
would run unchanged; the backend then says so (WARNING, or an error under option `strict`). Found here:

    softmax(x), x = product(a, b)     a hand-written attention: `softmax(q @ k.transpose(-2, -1) * scale) @ v`,
                                      also with bmm / baddbmm / einsum; between the product and the softmax only
                                      element-wise ops (scale, mask, cast) and reshapes. `a` and `b` both come
                                      from the model's inputs (neither is a parameter: `x @ W` is a linear)
    multi_head_attention_forward      `nn.MultiheadAttention` (dynamo keeps it as one call)
    aten._scaled_dot_product_*        an SDPA kernel called directly

"Over the image tokens": the attention's query and keys both depend on the image input (its `sources`); a
cross-attention whose keys come from the prompt alone is not reported. Never matched by names.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..errors import describe_node
from .attention_ops import ATEN_SDPA, BADDBMM, EINSUM, MATMUL, MHA, MM, SOFTMAX, OpSet

_PRODUCT = MATMUL | MM | EINSUM
# Between the scores and the softmax: scaling, masking, casts and head reshapes.
_PASS_THROUGH = OpSet((
    operator.mul, operator.truediv, operator.add, operator.sub, operator.neg,
    torch.mul, torch.div, torch.add, torch.sub, torch.where, torch.masked_fill, torch.clamp,
    torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.transpose,
), (
    "mul", "div", "add", "sub", "neg", "masked_fill", "masked_fill_", "clamp", "float", "half", "bfloat16",
    "double", "to", "type", "type_as", "contiguous", "view", "reshape", "flatten", "unflatten", "squeeze",
    "unsqueeze", "transpose", "mul_", "div_", "add_", "sub_", "__truediv__", "__mul__", "__add__",
))


@dataclass(frozen=True)
class AttentionLike:
    """One attention-like computation the backend does not recognize."""

    node: fx.Node      # the softmax, the MHA call or the aten SDPA call
    form: str          # what it is, in the user's terms

    def describe(self) -> str:
        return f"{self.form}\n  node: {describe_node(self.node)}"


def depends_on(gm: fx.GraphModule, sources: list[fx.Node]) -> set[fx.Node]:
    """The nodes whose value depends on any of `sources` (forward reachability, sources included)."""
    reach = set(sources)
    for n in gm.graph.nodes:
        if n not in reach and any(a in reach for a in n.all_input_nodes):
            reach.add(n)
    return reach


def _operands(node: fx.Node) -> list:
    if BADDBMM.matches(node):
        return list(node.args[1:3])
    if EINSUM.matches(node):
        ops = node.args[1:]
        if len(ops) == 1 and isinstance(ops[0], (tuple, list)):
            ops = ops[0]
        return list(ops)
    return list(node.args[:2])


def _scores_product(softmax: fx.Node, reach: set[fx.Node], depth: int = 12) -> fx.Node | None:
    """The product of two activations that feeds `softmax` through pass-through ops, if any."""
    frontier = [a for a in softmax.all_input_nodes if a in reach]
    seen: set[fx.Node] = set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _PRODUCT.matches(n) or BADDBMM.matches(n):
                ops = _operands(n)
                if len(ops) == 2 and all(isinstance(o, fx.Node) and o in reach for o in ops):
                    return n
            elif _PASS_THROUGH.matches(n):
                nxt.extend(a for a in n.all_input_nodes if a in reach)
        frontier = nxt
    return None


def _op(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    if t is operator.matmul:
        return "@"
    if isinstance(t, (torch._ops.OpOverloadPacket, torch._ops.OpOverload)):
        return str(t)
    return f"{getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', t)}".lstrip(".")


def find_attention_like(gm: fx.GraphModule, sources: list[fx.Node]) -> list[AttentionLike]:
    """Attention-like computation over `sources` (the image input; every user input if it is not known) that
    is not `scaled_dot_product_attention`, in graph order."""
    reach = depends_on(gm, sources)
    found = []
    for n in gm.graph.nodes:
        if n not in reach:
            continue
        if SOFTMAX.matches(n):
            product = _scores_product(n, reach)
            if product is not None:
                found.append(AttentionLike(n, (
                    f"a hand-written attention: softmax of the product {product.name} ({_op(product)}) of two "
                    "activations, as in softmax(q @ k.transpose(-2, -1) * scale) @ v")))
        elif MHA.matches(n):
            q, k = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("key")
            if q in reach and k in reach:
                found.append(AttentionLike(n, "torch.nn.MultiheadAttention (F.multi_head_attention_forward)"))
        elif ATEN_SDPA.matches(n):
            q, k = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("key")
            if q in reach and k in reach:
                found.append(AttentionLike(n, f"the aten attention kernel {_op(n)} called directly"))
    return found
