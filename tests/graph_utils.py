"""Capture dynamo graphs in tests."""
from __future__ import annotations

import torch


def capture_graphs(fn, *args, **kwargs):
    """Run `fn` under torch.compile with a capturing backend; return [(gm, example_inputs)]."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend)(*args, **kwargs)
    return graphs


def capture_model(model, kwargs):
    graphs = capture_graphs(model, **kwargs)
    assert len(graphs) == 1, f"expected one graph, got {len(graphs)}"
    return graphs[0]


def by_name(gm):
    return {n.name: n for n in gm.graph.nodes}
