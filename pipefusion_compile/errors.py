"""Errors the backend raises, each naming the cause in the user's terms."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:  # no import of torch.fx at run time: kernels/, which never imports it, uses these errors
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


class ModelSpecError(PipefusionError, ValueError):
    """A model named to the CLI or `pipefusion_compile.plan` is neither built in nor an importable
    `module:function`."""


def symbolic_hint(gm: fx.GraphModule | None) -> str:
    """If dynamo handed `gm` symbolic sizes (SymInt inputs, tensors of symbolic shape), what that means for the
    user, as a sentence to add to an error; else ""."""
    if gm is None:
        return ""
    for ph in gm.graph.find_nodes(op="placeholder"):
        val = ph.meta.get("example_value", ph.meta.get("val"))
        if isinstance(val, torch.SymInt) or (
                isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape)):
            return ("dynamo passed this graph symbolic sizes (torch.compile(..., dynamic=True), or automatic "
                    "dynamic shapes after a second input shape); torch.compile(..., dynamic=False) hands the "
                    "backend one graph per concrete shape")
    return ""


@contextlib.contextmanager
def failures_named(what: str, gm: fx.GraphModule | None = None) -> Iterator[None]:
    """Re-raise anything but a `PipefusionError` that escapes `what` (a phase of the backend, e.g. "planning
    the pipeline") as a `PipefusionError` that says which phase failed and on what, so that no bare
    KeyError/TypeError/AssertionError from inside the backend reaches the user, and dynamo never mistakes one
    for a reason to fall back to eager silently (it does so for some fake-tensor exceptions)."""
    try:
        yield
    except PipefusionError:
        raise
    except Exception as e:
        cause = symbolic_hint(gm) or "this is a bug in pipefusion-compile, not in the model or the options; please report it"
        raise PipefusionError(f"{what} failed: {type(e).__name__}: {e}\n  ({cause})") from e
