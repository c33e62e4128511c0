"""Which placeholders of a dynamo graph are the user's inputs, and which one carries the image tokens."""
from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import UnsupportedGraphError
from .meta import example_value


def _source_root(source):
    while source is not None and hasattr(source, "base") and getattr(source, "base") is not None:
        source = source.base
    return source


def is_user_input(node: fx.Node, example: object | None = None) -> bool:
    """True for forward arguments; False for the module's parameters and buffers lifted as inputs.

    Dynamo records each placeholder's source: arguments root at a local of `forward`, parameters and
    buffers root at its `self`. Graphs not made by dynamo fall back to `isinstance(x, nn.Parameter)`.
    """
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    root = _source_root(source)
    local = getattr(root, "local_name", None)
    if local is not None:
        return local != "self"
    return not isinstance(example, torch.nn.Parameter)


def graph_outputs(gm: fx.GraphModule) -> list:
    """The leaves of the graph's output node, in order."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    return pytree.tree_leaves(out.args[0])


def find_token_input(gm: fx.GraphModule, example_inputs: list | None = None) -> fx.Node:
    """The image input: the user tensor input whose shape equals the model output's in all dims but one.

    A DiT maps a latent to a latent of the same spatial extent ([B, C, H, W] -> [B, C', H, W]; packed
    [B, S, C] -> [B, S, C']). Among several candidates the largest wins.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outputs = [o for o in graph_outputs(gm) if isinstance(o, fx.Node)]
    out_vals = [example_value(o) for o in outputs]
    out_vals = [v for v in out_vals if isinstance(v, torch.Tensor)]
    if not out_vals:
        raise UnsupportedGraphError("the graph returns no tensor, so no image output to pipeline")
    out_shape = tuple(out_vals[0].shape)
    candidates = []
    for i, ph in enumerate(placeholders):
        ex = example_inputs[i] if example_inputs is not None and i < len(example_inputs) else None
        val = example_value(ph)
        if val is None:
            val = ex
        if not isinstance(val, torch.Tensor) or not is_user_input(ph, ex):
            continue
        shape = tuple(val.shape)
        if len(shape) != len(out_shape) or len(shape) < 3:
            continue
        if sum(a != b for a, b in zip(shape, out_shape)) <= 1:
            candidates.append((math.prod(shape), ph))
    if not candidates:
        raise UnsupportedGraphError(
            f"could not find the image input: no user input has the output's shape {out_shape} "
            "in all dims but the channels"
        )
    return max(candidates, key=lambda c: c[0])[1]
