"""Timelines: merge the ranks' event records into a Chrome/Perfetto trace and a Gantt chart.

Each rank of a multi-process run with option `timeline=DIR` (or env `PIPEFUSION_TIMELINE=DIR`) appends its
events to `DIR/rank<R>.jsonl`: one JSON object per event with step, patch, stage, kind (compute, send, recv,
wait), start and end in seconds of the machine's monotonic clock (`time.perf_counter`), which
all processes of one machine share. (Across machines the clocks are not aligned; merge per node.) On a CUDA
device the stamps are CUDA events on the current stream, so an event spans the time the device ran it (not when
the host queued it), read back into that clock without blocking the host (`comm.Clock`).

    pipefusion-compile timeline DIR --trace trace.json --png gantt.png
"""
from __future__ import annotations

import glob
import json
import os

from .errors import PipefusionError

KIND_ORDER = ("compute", "recv", "send", "wait", "broadcast")


class TimelineError(PipefusionError, ValueError):
    """The timeline directory holds no records (for the steps asked for)."""


def load_events(directory: str) -> list[dict]:
    events = []
    for path in sorted(glob.glob(os.path.join(directory, "rank*.jsonl"))):
        rank = int(os.path.basename(path)[4:-6])
        with open(path) as f:
            for line in f:
                if line.strip():
                    events.append({**json.loads(line), "rank": rank})
    if not events:
        raise TimelineError(f"no rank*.jsonl timeline files in {directory}")
    return events


def select_steps(events: list[dict], steps: tuple[int, int] | None) -> list[dict]:
    if steps is None:
        return events
    lo, hi = steps
    return [e for e in events if lo <= e["step"] < hi]


def chrome_trace(events: list[dict]) -> dict:
    """Chrome / Perfetto trace: one track per rank (stage), one complete event ("X") per record."""
    t0 = min(e["start"] for e in events)
    trace = []
    for e in events:
        name = e["kind"] if e["patch"] < 0 else f"{e['kind']} p{e['patch']}"
        trace.append({
            "name": name, "cat": e["kind"], "ph": "X", "pid": 0, "tid": e["rank"],
            "ts": (e["start"] - t0) * 1e6, "dur": max((e["end"] - e["start"]) * 1e6, 1.0),
            "args": {"step": e["step"], "patch": e["patch"], "stage": e["stage"], "peer": e.get("peer", -1)},
        })
    for rank in sorted({e["rank"] for e in events}):
        stage = next(e["stage"] for e in events if e["rank"] == rank)
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank,
                      "args": {"name": f"rank {rank} / stage {stage}"}})
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def gantt_png(events: list[dict], path: str, title: str = "") -> None:
    """Stages x time; compute bars coloured by patch, waits for data hatched grey, sends as ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = min(e["start"] for e in events)
    stages = sorted({e["stage"] for e in events})
    patches = sorted({e["patch"] for e in events if e["kind"] == "compute"})
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(11, 1.8 + 0.6 * len(stages)))
    for e in events:
        y = e["stage"]
        start, width = (e["start"] - t0) * 1e3, (e["end"] - e["start"]) * 1e3
        if e["kind"] == "compute":
            ax.broken_barh([(start, width)], (y - 0.35, 0.7), facecolors=cmap(patches.index(e["patch"]) % 10),
                           edgecolor="black", linewidth=0.3)
        elif e["kind"] in ("recv", "wait", "broadcast"):
            ax.broken_barh([(start, width)], (y - 0.2, 0.4), facecolors="lightgrey", hatch="///",
                           edgecolor="grey", linewidth=0.3)
        elif e["kind"] == "send":
            ax.plot([start, start], [y + 0.35, y + 0.5], color="black", linewidth=0.8)
    ax.set_yticks(stages, [f"stage {s}" for s in stages])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    handles = [Patch(facecolor=cmap(i % 10), label=f"patch {p}") for i, p in enumerate(patches)]
    handles.append(Patch(facecolor="lightgrey", hatch="///", label="waiting (recv / sends / output)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.3 - 0.1 / len(stages)),
              ncol=min(len(handles), 9), fontsize=8, frameon=False)
    ax.set_title(title or "PipeFusion timeline")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(directory: str, trace_path: str | None, png_path: str | None,
          steps: tuple[int, int] | None = None, title: str = "") -> list[dict]:
    events = select_steps(load_events(directory), steps)
    if not events:
        raise TimelineError(f"no events in steps {steps}")
    if trace_path:
        with open(trace_path, "w") as f:
            json.dump(chrome_trace(events), f)
    if png_path:
        gantt_png(events, png_path, title)
    return events
