"""Unbacked sizes: a graph whose sizes depend on tensor *values* (a mask's sum, `nonzero`, a boolean index).

With `torch._dynamo.config.capture_scalar_outputs` and `capture_dynamic_output_shape_ops` dynamo keeps
`int(mask.sum())`, `.item()`, `.tolist()`, `torch.nonzero(mask)` and `x[bool_mask]` in the graph instead of
breaking it there, and the fake tensors after them carry *unbacked* sizes (u0, u1, ...): symbols with no value
at compile time. The node that first produces one records it in `meta["unbacked_bindings"]` (symbol ->
where in its value the symbol is: `()` for an `item()`, `.size()[0]` for a `nonzero`):

    %s = sum(%l_mask_, dim=1); %m = max(%s)
    %item = item(%m)                                  # u0        bindings {u0: ()}
    %p = getitem(%l_prompt_, (:, :%item))             # [2, u1, 32]  bindings {u1: .size()[1]}  (u1 = min(u0, 6))
    %sz = sym_size.int(%p, 1); %ge = ge(%sz, 0); _assert_scalar(%ge, "u1 >= 0")
    %txt = linear(%p, ...)                            # [2, u1, 32]
    ...

The analyses measure token groups in integers, so such a graph is planned like a graph with backed symbolic
sizes (`specialize.py`): once per concrete value of its unbacked symbols. `UnbackedGuard` is what makes that
safe: it holds the backward slice of the binding nodes (the nodes the symbols depend on: the mask's sum, the
`nonzero`, nothing of the transformer's blocks) and evaluates it on the real inputs of *every* call, giving the
symbols' values, which are part of the program's key (`shapes.ShapeDispatcher`); a call whose mask gives other
values builds (or finds) another program, never reuses one planned for other sizes. `specialize` then runs
the graph on static fake tensors, taking the slice's real value where an op's output size depends on data:

    After (for a mask keeping 4 of 6 prompt tokens):
        %p = getitem(%l_prompt_, (:, :4))             # [2, 4, 32]   (item folded; sum, max, asserts removed)
        %txt = linear(%p, ...)                        # [2, 4, 32]

A `nonzero` or boolean index stays in the graph (its output is data the model reads), with a static fake of
the call's size. What the guard refuses (`UnbackedSizeError`, naming the binding node and its source line):
an unbacked float (a value read as data, e.g. a timestep's `.item()`: one program per value would be planned
for every step) and a slice that writes into a graph input in place (evaluating it for the guard would write
the input twice).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols
from torch.utils._sympy.symbol import SymT, symbol_is_type

from ..errors import UnsupportedGraphError, source_line
from .fx_eval import fetch_attr, run_node
from .side_effects import alias_root, mutated_operand, mutation_closure

BINDINGS = "unbacked_bindings"

# what the user can do about a graph with unbacked sizes the backend cannot specialize
_USER_FIX = ("compute the value outside the model and pass it in, or leave "
             "torch._dynamo.config.capture_scalar_outputs / capture_dynamic_output_shape_ops unset so that dynamo "
             "breaks the graph there")


class UnbackedSizeError(UnsupportedGraphError):
    """A graph's data-dependent (unbacked) size cannot be specialized per call: names the node that computes it."""


@dataclass(frozen=True)
class UnbackedSymbol:
    """One unbacked symbol: the node whose value first holds it and where in that value (a pytree key path)."""

    name: str
    node: fx.Node
    path: tuple

    def read(self, value) -> int:
        return pytree.key_get(value, self.path)


@dataclass(frozen=True)
class UnbackedValues:
    """What `UnbackedGuard.values` computed for one call: each symbol's value (`key`, in the guard's order, is
    the program key's part for them) and the real value of each node of the slice (`specialize` takes the
    outputs of the data-dependent ops from it)."""

    key: tuple[int, ...]
    symbols: dict[str, int]
    real: dict[fx.Node, object]


def binding_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The nodes that introduce an unbacked symbol, in graph order."""
    return [n for n in gm.graph.nodes if n.meta.get(BINDINGS)]


def has_unbacked(gm: fx.GraphModule) -> bool:
    """True if any value of the graph has a data-dependent (unbacked) size."""
    if binding_nodes(gm):
        return True
    return any(free_unbacked_symbols(n.meta.get("example_value")) for n in gm.graph.nodes
               if n.meta.get("example_value") is not None)


def _where(node: fx.Node) -> str:
    line = source_line(node)
    return f"{node.name} ({node.format_node()})" + (f" at `{line}`" if line else "")


class UnbackedGuard:
    """The unbacked symbols of a graph and the slice of the graph that computes them from its inputs.

    `values(args)` evaluates the slice on a call's real inputs (`UnbackedValues`)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.symbols: list[UnbackedSymbol] = []
        for n in binding_nodes(gm):
            for sym, path in n.meta[BINDINGS].items():
                if not symbol_is_type(sym, SymT.UNBACKED_INT):
                    raise UnbackedSizeError(
                        f"the graph reads a tensor's value as a Python float ({sym}, from {_where(n)}): the backend "
                        "specializes a graph to the values of its data-dependent scalars, and a float that "
                        f"changes every call would need a new plan every call; {_USER_FIX}", n)
                self.symbols.append(UnbackedSymbol(str(sym), n, tuple(path)))
        bound = {s.name for s in self.symbols}
        for n in gm.graph.nodes:
            free = {str(s) for s in free_unbacked_symbols(n.meta.get("example_value"))} - bound \
                if n.meta.get("example_value") is not None else set()
            if free:
                raise UnbackedSizeError(
                    f"the size {sorted(free)} of {n.name} is data-dependent but no node of the graph records where it "
                    f"comes from (meta['{BINDINGS}']), so it cannot be computed per call; {_USER_FIX}", n)
        sources = {s.node for s in self.symbols}
        inside = mutation_closure(gm, sources)
        for n in inside:
            target = mutated_operand(n)
            if target is not None and alias_root(target).op in ("placeholder", "get_attr"):
                raise UnbackedSizeError(
                    f"the data-dependent sizes of {', '.join(sorted(s.node.name for s in self.symbols))} depend on an "
                    f"in-place write into a graph input ({_where(n)}): computing them per call would write the "
                    f"input twice; {_USER_FIX}", n)
        self.slice: list[fx.Node] = [n for n in gm.graph.nodes if n in inside]
        self._placeholders = {n: i for i, n in enumerate(gm.graph.find_nodes(op="placeholder"))}
        self.inputs = sorted(self._placeholders[n] for n in self.slice if n.op == "placeholder")
        """Positions of the graph inputs the symbols are computed from."""

    def values(self, args) -> UnbackedValues:
        """The symbols' values at these real inputs (evaluating the slice only)."""
        env: dict[fx.Node, object] = {}
        with torch.no_grad():
            for n in self.slice:
                if n.op == "placeholder":
                    env[n] = args[self._placeholders[n]]
                elif n.op == "get_attr":
                    env[n] = fetch_attr(self.gm, n.target)
                else:
                    a = fx.node.map_arg(n.args, lambda x: env[x])
                    kw = fx.node.map_arg(n.kwargs, lambda x: env[x])
                    env[n] = run_node(self.gm, n, a, kw)
        key = tuple(int(s.read(env[s.node])) for s in self.symbols)
        return UnbackedValues(key, {s.name: v for s, v in zip(self.symbols, key)}, env)

    def describe(self, values: UnbackedValues) -> str:
        return ", ".join(f"{s.name}={v} ({s.node.name})" for s, v in zip(self.symbols, values.key))
