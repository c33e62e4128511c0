"""Running one fx node on given values (real or fake tensors), outside `fx.Interpreter`'s whole-graph loop."""
from __future__ import annotations

import torch.fx as fx

from ..errors import UnsupportedGraphError


def fetch_attr(gm: fx.GraphModule, target: str):
    """The value a `get_attr` node of `gm` reads."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def run_node(gm: fx.GraphModule, n: fx.Node, args, kwargs):
    """The value of the call node `n` of `gm` on these (already evaluated) arguments."""
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        return getattr(args[0], n.target)(*args[1:], **kwargs)
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    raise UnsupportedGraphError(f"internal: unexpected node kind {n.op}", n)
