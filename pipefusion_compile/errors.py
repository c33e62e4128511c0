"""Errors the backend raises, each naming the cause in the user's terms."""
from __future__ import annotations

import torch.fx as fx


def describe_node(node: fx.Node) -> str:
    """`node.format_node()` plus the user's source line, as dynamo recorded it."""
    text = node.format_node()
    trace = node.meta.get("stack_trace")
    if trace:
        lines = [ln for ln in trace.strip().splitlines() if ln.strip()]
        # The last two lines of a dynamo stack trace are 'File ..., line N, in fn' and the code itself.
        text += "\n  from: " + "\n        ".join(ln.strip() for ln in lines[-2:])
    return text


class PipefusionError(RuntimeError):
    """Base class of everything the pipefusion backend raises on purpose."""


class OptionsError(PipefusionError, ValueError):
    """An option given to `torch.compile(..., options=...)` is unknown or out of range."""


class UnsupportedGraphError(PipefusionError):
    """The graph holds something PipeFusion cannot pipeline (names the op, node and source line)."""

    def __init__(self, reason: str, node: fx.Node | None = None):
        self.reason = reason
        self.node = node
        msg = reason if node is None else f"{reason}\n  node: {describe_node(node)}"
        super().__init__(msg)


class PlanError(PipefusionError):
    """The options ask for a plan that this graph cannot have (e.g. more stages than attention layers)."""
