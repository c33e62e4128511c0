"""Cost analysis: FLOPs and output bytes per node, from fake-tensor execution (no real compute).

Each call node is re-executed on dynamo's fake example values under `FlopCounterMode`; the count goes to
`node.meta["pipefusion"].flops`, the bytes of its output to `.out_bytes`.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

from ..errors import UnsupportedGraphError
from .meta import example_value, node_meta, tensor_bytes

aten = torch.ops.aten


def _register_cpu_sdpa_formula() -> None:
    """On CPU, SDPA dispatches to the flash-attention-for-CPU kernel, which has no formula (counts 0)."""
    op = aten._scaled_dot_product_flash_attention_for_cpu
    from torch.utils.flop_counter import flop_registry

    if op in flop_registry or op.default in flop_registry:
        return

    @register_flop_formula(op)
    def _cpu_flash_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


_register_cpu_sdpa_formula()


def _fresh(value):
    """A tensor of the same shape/stride/dtype/device made in the current (our own) fake mode."""
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    if isinstance(value, (tuple, list)):
        return type(value)(_fresh(v) for v in value)
    return value


# Context-manager entry/exit that dynamo records as nodes (`with torch.autocast(...)`, grad mode): no compute,
# and not runnable on their own (the exit takes the entry's context object)
_CONTEXT_OPS = tuple(f for f in (
    getattr(torch.amp.autocast_mode, "_enter_autocast", None), getattr(torch.amp.autocast_mode, "_exit_autocast", None),
    torch._C._set_grad_enabled) if f is not None)


def node_flops(node: fx.Node, fake_mode: FakeTensorMode | None = None) -> int:
    """FLOPs of one call node, counted by running it on fake tensors of its operands' shapes."""
    if node.op not in ("call_function", "call_method") or node.target in _CONTEXT_OPS:
        return 0
    fake_mode = fake_mode or FakeTensorMode(allow_non_fake_inputs=True)
    counter = FlopCounterMode(display=False)
    with fake_mode, torch.no_grad():
        def value(a):
            return _fresh(example_value(a)) if isinstance(a, fx.Node) else a

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        with counter:
            if node.op == "call_method":
                getattr(args[0], node.target)(*args[1:], **kwargs)
            else:
                node.target(*args, **kwargs)
    return int(counter.get_total_flops())


def analyze_cost(gm: fx.GraphModule) -> int:
    """Fill `flops` and `out_bytes` of every node's pipefusion meta; return the total FLOPs."""
    total = 0
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    for node in gm.graph.nodes:
        meta = node_meta(node)
        try:
            meta.flops = node_flops(node, fake_mode)
        except (torch._subclasses.fake_tensor.DataDependentOutputException,
                torch._subclasses.fake_tensor.DynamicOutputShapeException):
            # `.item()` / `.tolist()` of a value, or an op whose output size depends on data (`nonzero`, a boolean
            # index; a graph with them is specialized to their sizes, passes/unbacked.py): no fake result, and no
            # FLOPs to count (Cosmos reads a GLOBAL scalar this way); a token-carrying one is refused by the token
            # analysis before this runs
            meta.flops = 0
        except Exception as e:  # e.g. an op without a fake (meta) implementation
            raise UnsupportedGraphError(
                f"the cost analysis could not run this op on fake tensors to count its FLOPs: "
                f"{type(e).__name__}: {e}", node) from e
        meta.out_bytes = tensor_bytes(example_value(node))
        total += meta.flops
    return total
