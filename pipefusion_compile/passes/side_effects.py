"""Side effects: which nodes write into a tensor in place, and which value they write into.

A graph extracted from the dynamo graph by walking inputs backwards from the values it returns (the hoisted
globals, a stage) never meets a node that has no users, and an in-place write usually has none:

    %grid = repeat(%g, 1, 1, 1, 1, 1)                 # LTX-Video's RoPE grid
    %s = setitem(%grid, (:, 0:1), %scaled)            # no users: the write is only ordered before ...
    %f = flatten(%grid, 2)                            # ... this read, which reads %grid, not %s

    %z = new_zeros(%pos, 1, 102, 32)                  # CogVideoX's joint positional table
    %d = _get_data_attr(%z); %part = getitem(%d, (:, 6:))
    %c = copy_(%part, %pos)                           # no users; %z is read later

So an extraction must add every write whose target is (a view of) a value it keeps, in graph order, with what
the write reads; `mutation_closure` does that. `is_mutating` is also the impurity test every dead-code pass
uses, and `check_kept` is the verifier: a lowering that drops a write fails loudly at compile time.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..errors import PipefusionError, describe_node

# ops whose result may share storage with their first operand: a write into the result writes the operand
_VIEW_METHODS = {
    "view", "view_as", "reshape", "reshape_as", "detach", "narrow", "select", "transpose", "permute", "t", "mT",
    "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten", "unbind", "split", "chunk",
    "as_strided", "diagonal", "contiguous", "movedim", "swapaxes", "unfold", "real", "imag", "data",
    "__getitem__",
}
_VIEW_FUNCTIONS = {
    operator.getitem, torch._C._autograd._get_data_attr, torch.reshape, torch.narrow, torch.select,
    torch.transpose, torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten, torch.unflatten, torch.unbind,
    torch.split, torch.chunk, torch.as_strided, torch.diagonal, torch.movedim, torch.swapaxes, torch.view_as_real,
    torch.view_as_complex, torch.real, torch.imag, torch.detach,
}
_SIDE_EFFECT_FUNCTIONS = {torch._C._set_grad_enabled}


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", "")


def mutated_operand(node: fx.Node) -> fx.Node | None:
    """The value `node` writes into in place, or None if it writes nothing."""
    if node.op not in ("call_function", "call_method"):
        return None
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.target is operator.setitem:
        return first
    out = node.kwargs.get("out")
    if isinstance(out, fx.Node):
        return out
    if node.kwargs.get("inplace") is True:
        return first
    if isinstance(node.target, torch._ops.OpOverload):
        for i, arg in enumerate(node.target._schema.arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
                if isinstance(value, fx.Node):
                    return value
        return None
    name = _target_name(node)
    if name.endswith("_") and not name.startswith("_"):  # torch's in-place convention: add_, copy_, zero_ ...
        return first
    return None


def is_mutating(node: fx.Node) -> bool:
    """True for a node whose effect is more than its value (an in-place write, a global mode switch)."""
    return mutated_operand(node) is not None or (node.op == "call_function" and node.target in _SIDE_EFFECT_FUNCTIONS)


def is_impure(node: fx.Node) -> bool:
    """For `Graph.eliminate_dead_code(is_impure_node=...)`: FX's default misses in-place methods."""
    return is_mutating(node) or node.is_impure()


def alias_root(node: fx.Node) -> fx.Node:
    """The value whose storage `node` (a view of a view of ...) belongs to."""
    while node.op in ("call_function", "call_method") and node.args and isinstance(node.args[0], fx.Node):
        views = node.target in _VIEW_FUNCTIONS if node.op == "call_function" else node.target in _VIEW_METHODS
        if not views:
            break
        node = node.args[0]
    return node


def mutation_closure(gm: fx.GraphModule, nodes: set[fx.Node], allow=lambda n: True) -> set[fx.Node]:
    """`nodes` and all their inputs, plus every in-place write into (a view of) a value in it, with what the
    write reads, to a fixpoint. `allow(write)` may exclude a write (it then stays out, with its inputs)."""
    closure: set[fx.Node] = set()
    stack = list(nodes)
    writes = [n for n in gm.graph.nodes if is_mutating(n)]
    while True:
        while stack:
            n = stack.pop()
            if n in closure:
                continue
            closure.add(n)
            stack.extend(n.all_input_nodes)
        added = [w for w in writes if w not in closure and mutated_operand(w) is not None
                 and alias_root(mutated_operand(w)) in closure and allow(w)]
        if not added:
            return closure
        stack.extend(added)


def check_kept(gm: fx.GraphModule, extracted: list[fx.GraphModule], where: str) -> None:
    """Every in-place write of `gm` into a graph input, or into a value some graph of `extracted` keeps, is
    in one of them too (by node name); fail naming it otherwise."""
    kept = {n.name for g in extracted for n in g.graph.nodes}
    for n in gm.graph.nodes:
        target = mutated_operand(n)
        if target is None or n.name in kept:
            continue
        root = alias_root(target)
        if root.op in ("placeholder", "get_attr") or root.name in kept:
            raise PipefusionError(
                f"internal: the in-place write {n.name} was dropped from {where}; running without it would give "
                f"a wrong result\n  node: {describe_node(n)}")
