"""Graphs the backend did not pipeline (they run unchanged), each with the reason: `declined(model)`.

A graph runs unchanged when it has no self-attention over the image tokens that the backend can pipeline:
a text encoder, a graph-break piece with only element-wise ops, or a model whose attention is written in a
form the backend does not recognize. The last kind is what a user must hear about: `decline` says it at
WARNING (naming the op, node and source line), or raises under option `strict`; every decline is recorded,
so a user or a test can tell "pipelined" from "ran unchanged":

    compiled = torch.compile(model, backend="pipefusion", options={...}); compiled(x)
    pipefusion_compile.programs(compiled)   # the pipelined graphs
    pipefusion_compile.declined(compiled)   # the graphs that run unchanged, with the reason
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .errors import PipefusionError, UnsupportedGraphError, describe_node
from .passes.attention_like import find_attention_like
from .passes.graph_inputs import find_token_input, is_user_input
from .passes.meta import example_value

log = logging.getLogger("pipefusion_compile")


@dataclass(frozen=True)
class Declined:
    """One graph the backend runs unchanged."""

    reason: str                   # why it was not pipelined
    attention: tuple[str, ...]    # attention-like computation over the image tokens that was not recognized
                                  # (op, node and source line each); empty when there was none
    num_nodes: int
    input_shapes: tuple[tuple[int, ...], ...]   # of the graph's tensor user inputs
    _params: tuple = field(default=(), repr=False, compare=False)  # weak references to the weights it reads

    def uses(self, ids: set[int]) -> bool:
        return any(r() is not None and id(r()) in ids for r in self._params)

    def __str__(self) -> str:
        text = f"graph with {self.num_nodes} nodes, inputs {[list(s) for s in self.input_shapes]}: {self.reason}"
        return text + "".join(f"\n  {a}" for a in self.attention)


# One record list per GraphModule, kept as long as the graph is (dynamo holds the graphs it runs).
_RECORDS: "weakref.WeakKeyDictionary[fx.GraphModule, list[Declined]]" = weakref.WeakKeyDictionary()


def _tensor_inputs(gm: fx.GraphModule, example_inputs) -> tuple[list[fx.Node], list]:
    users, params = [], []
    for i, ph in enumerate(gm.graph.find_nodes(op="placeholder")):
        ex = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
        if isinstance(ex, torch.nn.Parameter):
            params.append(ex)
        elif is_user_input(ph, ex) and isinstance(example_value(ph) if example_value(ph) is not None else ex,
                                                     torch.Tensor):
            users.append(ph)
    return users, params


def decline(gm: fx.GraphModule, example_inputs, strict: bool, reason: str, node: fx.Node | None = None) -> None:
    """The backend will run `gm` unchanged because of `reason` (the op at `node`, if one): record it, and if
    the graph holds attention-like computation over the image tokens, warn, or raise under `strict`."""
    users, params = _tensor_inputs(gm, example_inputs)
    try:
        sources = [find_token_input(gm, example_inputs)]
    except PipefusionError:
        sources = users  # the image input is not known: any attention over the inputs counts
    found = find_attention_like(gm, sources)
    detail = reason if node is None else f"{reason}\n  node: {describe_node(node)}"
    if found:
        head = ("the graph has attention-like computation over the image tokens that the pipefusion backend does "
                "not recognize as attention, so it cannot be pipelined")
        what = "\n".join(f"- {a.describe()}" for a in found)
        advice = ("Write the attention with torch.nn.functional.scaled_dot_product_attention to pipeline it"
                  + (", or pass options={'strict': False} to run this graph unchanged (with a warning)."
                     if strict else ", or pass options={'strict': True} to make this an error."))
        stopped = "" if node is not None and any(a.node is node for a in found) else \
            f"\n(the token analysis stopped at: {detail})"
        message = f"{head}:\n{what}{stopped}\n{advice}"
        if strict:
            err = UnsupportedGraphError(message)
            err.node = found[0].node
            raise err
        log.warning("pipefusion: this graph runs UNCHANGED, not pipelined (every rank runs all of it): %s", message)
    else:
        log.info("pipefusion: graph with %d nodes runs unchanged (%s)", len(gm.graph.nodes), reason)
    shapes = tuple(tuple(int(s) for s in v.shape) for v in (example_value(u) for u in users)
                   if isinstance(v, torch.Tensor) and all(isinstance(s, int) for s in v.shape))
    record = Declined(reason=reason if node is None else f"{reason} (at {node.name})",
                      attention=tuple(a.describe() for a in found), num_nodes=len(gm.graph.nodes),
                      input_shapes=shapes, _params=tuple(weakref.ref(p) for p in params))
    _RECORDS.setdefault(gm, []).append(record)


def declined(compiled_model=None) -> list[Declined]:
    """The graphs compiled so far that the backend runs unchanged, with the reason each was not pipelined.

    With `compiled_model` (the `torch.compile` result or the original module): those that read its weights.
    Without: every such graph alive in this process (also those of functions, which have no weights)."""
    records = [r for rs in list(_RECORDS.values()) for r in rs]
    if compiled_model is None:
        return records
    module = getattr(compiled_model, "_orig_mod", compiled_model)
    if not isinstance(module, torch.nn.Module):
        raise PipefusionError(f"expected a torch.compile'd module, got {type(compiled_model).__name__}")
    ids = {id(p) for p in module.parameters()}
    return [r for r in records if r.uses(ids)]
