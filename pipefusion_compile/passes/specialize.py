"""Shape specialization: dynamo's symbolic-shape graph -> the static graph for one concrete input shape.

By default dynamo compiles a frame for the first shape it sees with every size baked in, and on the second
distinct shape recompiles it with symbolic sizes ("automatic dynamic shapes"): the graph then takes SymInt
placeholders and computes sizes with SymInt arithmetic. PipeFusion's analyses measure token axes in concrete
integers (a band is `rows * per_row` elements), so the backend plans and lowers one program per concrete
input shape. This pass makes the static graph for a shape from the symbolic one:

    Before (dynamo's graph for a batch of s0):             After (for inputs of batch 2, 32 x 24 latents):
        s0 : SymInt                                           s0 : SymInt            # kept, no users
        l_x_ : [s0, 4, s1, s2]                                l_x_ : [2, 4, 32, 24]
        %h = size(%l_x_, 2)                                   (folded)
        %r = floordiv(%h, 2)                                  (folded)
        %v = view(%y, %s0, -1, 16)                            %v = view(%y, 2, -1, 16)
        %p = reshape(%z, %s0, %r, 12, 2, 2, 8)                %p = reshape(%z, 2, 16, 12, 2, 2, 8)

Every node whose value is a Python number, size, dtype or device is replaced by its value at these inputs
(its uses get the constant, the node is removed), every other node's `meta["example_value"]` becomes a
static fake tensor of this shape, so the rest of the compiler sees exactly what dynamo would have traced with
`dynamic=False` at these inputs. Nodes that return None (side effects such as `_set_grad_enabled`) stay.
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

from ..errors import UnsupportedGraphError
from .fx_eval import fetch_attr, run_node
from .meta import example_value
from .side_effects import is_impure
from .unbacked import UnbackedValues

_CONSTANT_LEAVES = (int, float, bool, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


def _is_symbolic_value(value) -> bool:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    if isinstance(value, torch.Tensor):
        return any(not isinstance(s, int) for s in value.shape)
    if isinstance(value, (tuple, list)):
        return any(_is_symbolic_value(v) for v in value)
    return False


def is_symbolic(gm: fx.GraphModule, example_inputs: list) -> bool:
    """True if dynamo handed us a graph with symbolic sizes (inputs or any recorded value)."""
    if any(_is_symbolic_value(x) for x in example_inputs):
        return True
    return any(_is_symbolic_value(example_value(n)) for n in gm.graph.nodes if n.op == "placeholder")


def shape_key(args) -> tuple:
    """What a static graph is specialized on: each tensor input's shape, dtype and device, each number's
    value. Two calls with the same key run the same program."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(a.shape), a.dtype, a.device.type))
        elif isinstance(a, (int, float, bool)):
            key.append((type(a).__name__, a))
        else:
            key.append(type(a).__name__)
    return tuple(key)


def _is_constant(value) -> bool:
    leaves = pytree.tree_leaves(value)
    return bool(leaves) and all(isinstance(v, _CONSTANT_LEAVES) for v in leaves) and not isinstance(
        value, torch.Tensor)


def _substitute(user: fx.Node, node: fx.Node, value) -> None:
    def sub(a):
        return value if a is node else a

    user.args = fx.node.map_arg(user.args, sub)    # map_arg also looks inside slices
    user.kwargs = fx.node.map_arg(user.kwargs, sub)


def specialize(gm: fx.GraphModule, args: list, unbacked: UnbackedValues | None = None) -> fx.GraphModule:
    """The static graph of `gm` at the concrete inputs `args` (real tensors and ints, as the graph is
    called). The result shares `gm`'s attributes and keeps its placeholders (same calling convention).

    A graph with unbacked (data-dependent) sizes needs `unbacked`, what `unbacked.UnbackedGuard` computed at
    these inputs: an op whose output depends on data (`item`, `nonzero`, a boolean index) takes its real value
    there (a number is folded like a size, a tensor becomes a static fake of its real shape), and every
    symbol's value is checked against the static graph's. The runtime checks those held (`_assert_scalar` of
    folded conditions) are removed, with the nodes that only fed folded values."""
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copies))
    out = fx.GraphModule(gm, graph)
    original = {new: old for old, new in copies.items()}
    placeholders = list(graph.find_nodes(op="placeholder"))
    if len(placeholders) != len(args):
        raise UnsupportedGraphError(
            f"internal: the graph has {len(placeholders)} inputs but was called with {len(args)}")
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[fx.Node, object] = {}
    had_users = {n for n in graph.nodes if n.users}

    def fake(v):
        return mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) else v

    scalars = {i: args[i].item() for i in value_inputs(gm)}  # read outside the fake mode
    grad = torch.is_grad_enabled()
    try:
        with mode:
            for n in list(graph.nodes):
                if n.op == "output":
                    continue
                if n.op == "placeholder":
                    value = fake(args[placeholders.index(n)])
                elif reads_value_of_input(n):  # a float dynamo passes as a 0-d tensor (dynamic=True): its value
                    value = scalars[placeholders.index(n.args[0])]
                elif n.op == "get_attr":
                    value = fake(fetch_attr(out, n.target))
                else:
                    a = fx.node.map_arg(n.args, lambda x: env[x])
                    kw = fx.node.map_arg(n.kwargs, lambda x: env[x])
                    try:
                        value = run_node(out, n, a, kw)
                    except (DataDependentOutputException, DynamicOutputShapeException) as e:
                        value = _data_dependent_value(original[n], unbacked, fake, e)
                    except Exception as e:
                        raise UnsupportedGraphError(
                            f"re-tracing the graph at the new input shapes failed: {type(e).__name__}: {e}", n
                        ) from e
                bindings = n.meta.pop("unbacked_bindings", None)
                if bindings:
                    _check_bindings(n, bindings, value, unbacked)
                env[n] = value
                n.meta.pop("val", None)
                if _is_constant(value):
                    for user in list(n.users):
                        _substitute(user, n, value)
                    n.meta["example_value"] = value
                    if n.op not in ("placeholder", "get_attr"):
                        graph.erase_node(n)
                elif value is None and _is_held_check(n):
                    graph.erase_node(n)
                elif value is not None:
                    n.meta["example_value"] = value
    finally:
        torch._C._set_grad_enabled(grad)
    for n in reversed(list(graph.nodes)):  # what only fed folded values (a mask's sum before its item())
        if n in had_users and not n.users and n.op in ("call_function", "call_method") and not is_impure(n):
            graph.erase_node(n)
    graph.lint()
    out.recompile()
    return out


# dynamo's runtime checks of symbolic sizes (`u1 >= 0`): once their operands are folded they have been
# evaluated at these values, and the program is only ever called with them
_RUNTIME_CHECKS = (torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size.default,
                   torch.ops.aten.sym_constrain_range.default, torch._check, torch._check_is_size)


def _is_held_check(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in _RUNTIME_CHECKS and not n.all_input_nodes


def _data_dependent_value(n: fx.Node, unbacked: UnbackedValues | None, fake, error: Exception):
    """The value at this call of a node whose output depends on data: from the guard's evaluation."""
    if unbacked is None or n not in unbacked.real:
        raise UnsupportedGraphError(
            f"internal: {n.name}'s output depends on tensor values ({type(error).__name__}) but the unbacked-size "
            "guard did not evaluate it", n)
    return fake(unbacked.real[n])


def _check_bindings(n: fx.Node, bindings: dict, value, unbacked: UnbackedValues | None) -> None:
    """Each unbacked symbol `n` introduces has, in the static graph, the value the guard computed."""
    for sym, path in bindings.items():
        want = None if unbacked is None else unbacked.symbols.get(str(sym))
        got = pytree.key_get(value, tuple(path))
        if want is None or got != want:
            raise UnsupportedGraphError(
                f"internal: the unbacked size {sym} of {n.name} is {got} in the specialized graph but the guard "
                f"computed {want}", n)


def reads_value_of_input(n: fx.Node) -> bool:
    """`x.item()` of a graph input: under `dynamic=True` dynamo passes Python floats (a LayerNorm's eps, a
    guidance scale) as 0-d tensors; the specialized graph takes their value at the call (and the program
    cache is keyed by it, see `value_inputs`)."""
    return (n.op == "call_method" and n.target == "item" and len(n.args) == 1 and isinstance(n.args[0], fx.Node)
            and n.args[0].op == "placeholder")


def value_inputs(gm: fx.GraphModule) -> tuple[int, ...]:
    """Positions of the graph inputs whose value (not only shape) the specialized graph depends on."""
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    return tuple(i for i, ph in enumerate(placeholders) if any(reads_value_of_input(u) for u in ph.users))
