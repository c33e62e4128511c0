"""Errors the backend raises, each naming the cause in the user's terms."""
from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:  # no import of torch.fx at run time: kernels/, which never imports it, uses these errors
    import torch.fx as fx


def source_line(node: fx.Node) -> str:
    """The user's line of code that made `node`, as dynamo recorded it ("" if none)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().strip("^~ ")]  # not the carets
    return lines[-1] if lines else ""


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


class TooFewLayersError(PlanError):
    """A graph has fewer self-attention layers than `num_stages`: usually the model has more, split over several
    graphs at graph breaks (the backend adds the breaks dynamo recorded: `graph_break_report`)."""


class GraphBreakFix(enum.Enum):
    """The config or code change that removes one kind of graph break."""

    CAPTURE_SCALAR_OUTPUTS = ("set torch._dynamo.config.capture_scalar_outputs = True (or env "
                              "TORCHDYNAMO_CAPTURE_SCALAR_OUTPUTS=1) to keep .item() in the graph, or compute the "
                              "value outside the model")
    PRINT = ("remove the print/logging call from forward (or torch._dynamo.config.reorderable_logging_functions"
             ".add(print), which runs it after the graph)")
    DATA_DEPENDENT = ("branch on Python values or shapes, not on tensor values (`if x.sum() > 0`), or use "
                      "torch.cond")
    LOOP = ("a break inside the loop over the blocks: dynamo then runs that forward eagerly and compiles each block "
            "on its own; remove the break named with it")
    OTHER = "see dynamo's hint"


@dataclass(frozen=True)
class GraphBreak:
    """One graph break reason as dynamo records it (`torch._dynamo.utils.counters`)."""

    reason: str          # dynamo's first line
    hint: str            # dynamo's "Hint:" line, if any
    fix: GraphBreakFix
    count: int

    def describe(self) -> str:
        text = f"{self.reason} (x{self.count})\n      fix: {self.fix.value}"
        if self.hint and self.fix is GraphBreakFix.OTHER:
            text += f": {self.hint}"
        return text


_FIXES = (("Tensor.item()", GraphBreakFix.CAPTURE_SCALAR_OUTPUTS), ("capture_scalar_outputs", GraphBreakFix.CAPTURE_SCALAR_OUTPUTS),
          ("print", GraphBreakFix.PRINT), ("logging", GraphBreakFix.PRINT),
          ("Data-dependent", GraphBreakFix.DATA_DEPENDENT), ("data dependent", GraphBreakFix.DATA_DEPENDENT),
          ("generic_jump", GraphBreakFix.DATA_DEPENDENT), ("graph break in loop", GraphBreakFix.LOOP))


def _parse_break(text: str) -> tuple[str, str]:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    reason = lines[0] if lines else text
    hint = next((ln[len("Hint:"):].strip() for ln in lines if ln.startswith("Hint:")), "")
    return reason, hint


def recorded_graph_breaks() -> list[GraphBreak]:
    """The graph breaks dynamo has recorded in this process (since `torch._dynamo.reset()` or
    `counters.clear()`), each with the change that removes it, most frequent first. torch 2.13 records each
    reason's full text in `counters["unimplemented"]` (a break nested in another's handling after a
    '*** While handling this graph break, another graph break occurred: ***' line) and, for some, in
    `counters["graph_break"]`."""
    from torch._dynamo.utils import counters

    found: dict[str, list] = {}
    for key in ("graph_break", "unimplemented"):
        for text, count in counters.get(key, {}).items():
            for part in str(text).split("*** While handling this graph break, another graph break occurred: ***"):
                reason, hint = _parse_break(part)
                if not reason:
                    continue
                entry = found.setdefault(reason, [hint, 0])
                entry[1] = max(entry[1], count) if key == "graph_break" else entry[1] + count
    breaks = []
    for reason, (hint, count) in found.items():
        fix = next((f for pat, f in _FIXES if pat.lower() in (reason + " " + hint).lower()), GraphBreakFix.OTHER)
        breaks.append(GraphBreak(reason, hint, fix, count))
    return sorted(breaks, key=lambda b: -b.count)


def graph_break_report() -> str:
    """The recorded graph breaks as lines to add to an error, or "" when there are none."""
    breaks = recorded_graph_breaks()
    if not breaks:
        return ""
    lines = "".join(f"\n  - {b.describe()}" for b in breaks)
    return (f"\ndynamo recorded these graph breaks in this process (torch._dynamo.utils.counters), which split a model "
            f"into graphs with fewer layers each:{lines}\n  torch.compile(..., fullgraph=True) raises at the first "
            "break with its source line; torch._dynamo.explain(model)(**inputs) lists them all")
