"""Op identity of attention and its parts: one table for the passes that look for attention.

`canonical_attention.py` rewrites every attention it can express as SDPA; `attention_like.py` reports the
attention-like computation left over (which the token analysis refuses). Both match the same ops, by target
(a Python function, an aten overload packet or one of its overloads, or a Tensor method name) and never by
the names of modules or nodes:

    SOFTMAX.matches(n)      torch.softmax(x, -1), F.softmax, x.softmax(-1), aten._softmax(x, -1, False), ...
    MATMUL.matches(n)       q @ kT, torch.matmul, torch.bmm, x.bmm(y), aten.bmm, ...
    BADDBMM.matches(n)      torch.baddbmm(bias, q, kT, beta=0, alpha=c), ...
    ATEN_SDPA.matches(n)    aten._scaled_dot_product_flash_attention_for_cpu(q, k, v), ... (called directly)
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten


def _packets(*names: str) -> tuple:
    """The aten overload packets of these names that this torch build has."""
    return tuple(getattr(aten, n) for n in names if hasattr(aten, n))


@dataclass(frozen=True)
class OpSet:
    """A set of ops: call_function targets (functions, aten packets) and call_method names."""

    functions: tuple
    methods: tuple = ()

    def matches(self, n) -> bool:
        if not isinstance(n, fx.Node):
            return False
        if n.op == "call_method":
            return n.target in self.methods
        if n.op != "call_function":
            return False
        packet = getattr(n.target, "overloadpacket", None)
        return any(n.target is t or (packet is not None and packet is t) for t in self.functions)

    def __or__(self, other: "OpSet") -> "OpSet":
        return OpSet(self.functions + other.functions, self.methods + other.methods)


SOFTMAX = OpSet((torch.softmax, F.softmax, torch.special.softmax, torch._softmax,
                 *_packets("softmax", "_softmax", "_safe_softmax")), ("softmax",))
# q @ kT and probs @ v (mm is 2-D: no batch or heads, so it is never an attention product of a DiT)
MATMUL = OpSet((torch.matmul, operator.matmul, torch.bmm, *_packets("matmul", "bmm")),
               ("matmul", "bmm", "__matmul__"))
MM = OpSet(_packets("mm"), ("mm",))
BADDBMM = OpSet((torch.baddbmm, *_packets("baddbmm")), ("baddbmm",))   # (bias, a, b, beta=, alpha=)
EINSUM = OpSet((torch.einsum, torch.functional.einsum))
MHA = OpSet((F.multi_head_attention_forward,))
ATEN_SDPA = OpSet(_packets(
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_attention_math", "_scaled_dot_product_attention_math_for_mps",
    "_scaled_dot_product_fused_attention_overrideable", "scaled_dot_product_attention",
))
