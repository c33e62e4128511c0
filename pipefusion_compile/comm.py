"""Point-to-point communication between stages, as registered `pipefusion::` ops, over two transports.

A schedule (`schedule.py`) is an FX graph whose nodes call these ops, so `print(program.schedule_graph())`
shows every irecv, wait, pack and isend in order. The ops take a `channel` string naming the `Comm`
of one stage of one program (its pending requests, byte counters and timeline); the table below only lets ops
find it by name. Two transports implement a `Comm`:

    DistComm    torch.distributed point-to-point (gloo, NCCL): one stage per rank
    LocalComm   in one process (simulate): the stages' schedules run one after another, each send leaves its
                packed buffer in a mailbox the stages share, each wait takes it out (nothing is skipped: routes,
                pack and unpack run exactly as on ranks)

The data-movement ops the schedules also call (`pack`, `unpack`, `write_band`, with Triton kernels) live in
`ops.py`. Every wait has a timeout; a failure names the rank, stage, patch and step and what was being waited
for.
"""
from __future__ import annotations

import datetime
from abc import ABC, abstractmethod
import re
import time
import weakref
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import ops  # noqa: F401  (registers pack/unpack/write_band, which the schedule graphs call)
from .errors import PipefusionError

_CHANNELS: "weakref.WeakValueDictionary[str, Comm]" = weakref.WeakValueDictionary()


class PipefusionCommError(PipefusionError):
    """A send, receive or collective failed or timed out (a peer died, or a schedule mismatch)."""


OUTPUT_TAG = 1 << 12       # + piece index: a band of the model output, from the last stage to every other
TAG_PARITY = 1 << 13       # added on odd calls (`Comm.tag`)


@dataclass
class Event:
    step: int
    patch: int
    stage: int
    kind: str      # compute | send | recv | wait
    start: float
    end: float
    peer: int = -1


class Clock:
    """Time stamps for the timeline. On the host (CPU, or no device given): `time.perf_counter()` seconds.

    On a CUDA device a host stamp would say when the host queued the work, not when the device ran it (the
    per-patch path does not synchronize), so a mark is an event recorded on the current stream, and `seconds`
    reads it back once the device has passed it: the host time of an anchor event (recorded once on an idle
    device, right after a synchronize, so it completed at a known host time) plus the device-measured time from
    the anchor to the mark. Reading back never blocks unless asked to (`wait=True`, for the final flush).

        clock = Clock(torch.device("cuda:0"))
        t0 = clock.mark(); stage(...); t1 = clock.mark()
        clock.seconds(t1, wait=False)   # None until the device has run the stage; then host seconds
    """

    def __init__(self, device: torch.device | None = None, event=None, synchronize=None):
        self.device = device
        self.on_device = device is not None and device.type == "cuda"
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._synchronize = synchronize or (lambda: torch.cuda.synchronize(device))
        self._anchor = None   # (event, host seconds at which it completed)

    def mark(self):
        if not self.on_device:
            return time.perf_counter()
        if self._anchor is None:
            self._synchronize()
            anchor = self._event()
            anchor.record()
            anchor.synchronize()
            self._anchor = (anchor, time.perf_counter())
        event = self._event()
        event.record()
        return event

    def seconds(self, mark, wait: bool) -> float | None:
        """Host seconds of `mark`; None if it is a device event the device has not reached and `wait` is off."""
        if isinstance(mark, float):
            return mark
        if not mark.query():
            if not wait:
                return None
            mark.synchronize()
        anchor, host = self._anchor
        return host + anchor.elapsed_time(mark) / 1e3


@dataclass
class Comm(ABC):
    """Communication state of one stage of one program: what both transports share (names, counters, the
    timeline); the transport's `isend`, `irecv`, `wait_recv` and `wait_sends` are its subclass's."""

    name: str
    stage: int
    stage_ranks: list[int]          # global rank of each stage
    timeout_s: float
    record_timeline: bool = False
    step: int = 0
    patch: int = -1
    calls: int = 0                  # calls of the program so far (the same count on every rank)
    bytes_sent: int = 0             # point-to-point activations, this call
    output_bytes: int = 0           # model output bands, this call (sent by the last stage to every other)
    clock: Clock = field(default_factory=Clock)
    _marks: list = field(default_factory=list)   # recorded events whose stamps may still be device events
    _pending: dict = field(default_factory=dict)
    _sends: list = field(default_factory=list)
    _older_sends: list = field(default_factory=list)

    def __post_init__(self):
        _CHANNELS[self.name] = self

    @property
    def rank(self) -> int:
        return self.stage_ranks[self.stage]

    def where(self, patch: int | None = None) -> str:
        patch = self.patch if patch is None else patch
        return f"rank {self.rank} (stage {self.stage}), step {self.step}, patch {patch}"

    def mark(self):
        """The start stamp of an event to `record` (a host time, or a CUDA event: `Clock`)."""
        return self.clock.mark() if self.record_timeline else 0.0

    def record(self, kind: str, start, patch: int | None = None, peer: int = -1) -> None:
        if self.record_timeline:
            self._marks.append((Event(self.step, self.patch if patch is None else patch, self.stage, kind, 0.0, 0.0,
                                      peer), start, self.clock.mark()))

    def take_timeline(self, wait: bool = True) -> list[Event]:
        """The recorded events whose times are known, in order, with host-clock start and end; with `wait` off,
        the ones from the first the device has not reached on stay for a later call."""
        done = []
        while self._marks:
            event, start, end = self._marks[0]
            t1 = self.clock.seconds(end, wait)
            if t1 is None:
                break
            event.start, event.end = self.clock.seconds(start, True), t1   # the start precedes the end
            done.append(event)
            self._marks.pop(0)
        return done

    def new_step(self, step: int, device: torch.device | None = None) -> None:
        """A new call (on `device`): the sends of the previous one become older ones (`wait_sends` waits for
        those)."""
        if device is not None and self.record_timeline and device != self.clock.device:
            # the old clock's stamps become host seconds before it goes (`Clock.seconds` passes those through)
            self._marks = [(e, self.clock.seconds(s, True), self.clock.seconds(t, True)) for e, s, t in self._marks]
            self.clock = Clock(device)
        self.step, self.patch, self.bytes_sent, self.output_bytes = step, -1, 0, 0
        self.calls += 1
        self._older_sends += self._sends
        self._sends = []

    def tag(self, tag: int) -> int:
        """The wire tag of message `tag` of this call. Consecutive calls use different ones: with lazy outputs
        a rank posts the receives of call c+1 while some of call c may still be pending."""
        return tag + (self.calls & 1) * TAG_PARITY

    def _count(self, buf: torch.Tensor, tag: int) -> None:
        nbytes = buf.numel() * buf.element_size()
        if tag >= OUTPUT_TAG:
            self.output_bytes += nbytes
        else:
            self.bytes_sent += nbytes

    @abstractmethod
    def isend(self, buf: torch.Tensor, peer: int, tag: int) -> None:
        ...

    @abstractmethod
    def irecv(self, buf: torch.Tensor, peer: int, tag: int) -> None:
        ...

    @abstractmethod
    def wait_recv(self, buf: torch.Tensor) -> None:
        ...

    @abstractmethod
    def wait_sends(self) -> None:
        ...


@dataclass
class LocalComm(Comm):
    """One stage's transport in one process. `mailbox` (shared by the program's stages) holds every packed
    message sent and not yet received, by (sender, receiver, patch). The stages' schedules of one step run in
    stage order, so every message a stage waits for was sent before; one that was not is a schedule bug, and
    says so instead of waiting. The model output buffers are shared too: the last stage writes them in place."""

    mailbox: dict = field(default_factory=dict)

    def where(self, patch: int | None = None) -> str:
        patch = self.patch if patch is None else patch
        return f"stage {self.stage}, step {self.step}, patch {patch}"

    def isend(self, buf: torch.Tensor, peer: int, tag: int) -> None:
        t0 = self.mark()
        key = (self.stage, peer, self.tag(tag))
        if key in self.mailbox:
            raise PipefusionCommError(f"{self.where(tag)}: patch {tag} sent to stage {peer} twice in one step")
        self.mailbox[key] = buf
        self._count(buf, tag)
        self.record("send", t0, patch=tag % OUTPUT_TAG, peer=peer)

    def irecv(self, buf: torch.Tensor, peer: int, tag: int) -> None:
        self._pending[buf.data_ptr()] = (peer, tag, self.tag(tag))

    def wait_recv(self, buf: torch.Tensor) -> None:
        peer, tag, wire = self._pending.pop(buf.data_ptr())
        t0 = self.mark()
        sent = self.mailbox.pop((peer, self.stage, wire), None)
        if sent is None:
            raise PipefusionCommError(
                f"{self.where(tag)}: waits for patch {tag} from stage {peer}, which has not sent it (in one process "
                "the stages run in order, so a stage only receives from earlier ones: a schedule bug)")
        if sent.numel() != buf.numel():
            raise PipefusionCommError(
                f"{self.where(tag)}: patch {tag} from stage {peer} has {sent.numel()} bytes, {buf.numel()} expected")
        buf.copy_(sent)
        self.record("recv", t0, patch=tag % OUTPUT_TAG, peer=peer)

    def wait_sends(self) -> None:
        self._older_sends.clear()  # a local send is complete when it returns


@dataclass
class DistComm(Comm):
    """One rank's transport: torch.distributed point-to-point in `group`."""

    group: object = None
    stream_side: bool = False       # NCCL: waits order the current CUDA stream, the host does not block

    def _wait(self, work, what: str, patch: int, peer: int | None = None) -> None:
        """Wait for `work` (on `peer`, a stage index, when one peer is involved). A failure says what happened:
        a timeout, or a failure after how long with the transport's reason and its likely cause.

        On NCCL the wait is stream-side (`work.wait()` without a timeout makes the current stream wait for the
        transfer; a timeout argument would block the host until it completes), and the time limit is the one
        the process group's watchdog enforces (`init_process_group(timeout=...)`); on gloo the host waits at
        most `timeout_s`."""
        t0 = time.monotonic()
        try:
            if self.stream_side:
                work.wait()
            else:
                work.wait(timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:  # gloo/NCCL raise RuntimeError with the transport's reason
            raise PipefusionCommError(
                self._describe_failure(what, patch, peer, time.monotonic() - t0, e)) from e

    def _describe_failure(self, what: str, patch: int, peer: int | None, elapsed: float, error: Exception) -> str:
        reason = _transport_reason(error)
        low = reason.lower()
        who = f"rank {self.stage_ranks[peer]} (stage {peer})" if peer is not None else "a peer rank"
        if "application timeout caused pair closure" in low:  # this rank timed out before: the link is closed
            return (f"{self.where(patch)}: {what} failed after {elapsed:.1f}s: the connection was closed after an "
                    f"earlier operation of this rank timed out ({reason})")
        if elapsed >= 0.95 * self.timeout_s or "timed out" in low or "timeout" in low:
            waited = f"{self.timeout_s:g}s" if elapsed >= 0.95 * self.timeout_s else f"{elapsed:.1f}s"
            return (f"{self.where(patch)}: timed out after {waited} {_waiting(what)}: {who} did not take part in "
                    f"time: it may be stalled (still computing, blocked, or in another step or schedule) or "
                    f"slower than the timeout; raise option timeout_s if its steps take longer ({reason})")
        closed = ("closed by peer", "connection reset", "broken pipe", "connection refused", "socket closed",
                  "connection closed", "end of file")
        if any(c in low for c in closed):
            cause = (f"{who} closed the connection: it probably exited or crashed (or gave up after a timeout of its "
                     "own); see its log")
        else:
            cause = f"the transport failed (if {who} exited or crashed, see its log)"
        return f"{self.where(patch)}: {what} failed after {elapsed:.1f}s: {cause} ({reason})"

    def _start(self, post, what: str, patch: int, peer: int | None = None):
        """Post a send/receive/collective: the transport may refuse at once (e.g. the peer is gone)."""
        try:
            return post()
        except Exception as e:
            raise PipefusionCommError(self._describe_failure(what, patch, peer, 0.0, e)) from e

    def isend(self, buf: torch.Tensor, peer: int, tag: int) -> None:
        t0 = self.mark()
        what = f"sending {_message(tag)} to stage {peer} (rank {self.stage_ranks[peer]})"
        wire = self.tag(tag)
        work = self._start(lambda: dist.isend(buf, dst=self.stage_ranks[peer], group=self.group, tag=wire),
                           what, tag % OUTPUT_TAG, peer)
        self._sends.append((work, buf, peer, tag, what, self.step))
        self._count(buf, tag)
        self.record("send", t0, patch=tag % OUTPUT_TAG, peer=peer)

    def irecv(self, buf: torch.Tensor, peer: int, tag: int) -> None:
        what = f"receiving {_message(tag)} from stage {peer} (rank {self.stage_ranks[peer]})"
        wire = self.tag(tag)
        work = self._start(lambda: dist.irecv(buf, src=self.stage_ranks[peer], group=self.group, tag=wire),
                           what, tag % OUTPUT_TAG, peer)
        self._pending[buf.data_ptr()] = (work, buf, peer, tag, what, self.step)

    def wait_recv(self, buf: torch.Tensor) -> None:
        work, _buf, peer, tag, what, step = self._pending.pop(buf.data_ptr())
        t0 = self.mark()
        self._wait(work, f"{what} (of step {step})" if step != self.step else what, tag % OUTPUT_TAG, peer)
        self.record("recv", t0, patch=tag % OUTPUT_TAG, peer=peer)

    def wait_sends(self) -> None:
        """Wait for the sends of earlier calls (this call's stay in flight: its receivers may still be busy
        with the step before, and waiting here would put that wait between this rank's steps)."""
        t0 = self.mark()
        sends, self._older_sends = self._older_sends, []
        for work, _buf, peer, tag, what, step in sends:
            self._wait(work, f"{what} (of step {step})", tag % OUTPUT_TAG, peer)
        if sends:
            self.record("wait", t0, patch=-1)


def _message(tag: int) -> str:
    return f"band {tag - OUTPUT_TAG} of the model output" if tag >= OUTPUT_TAG else f"patch {tag}"


def _transport_reason(error: Exception) -> str:
    """The transport's message without the C++ source location gloo puts first ("[.../pair.cc:553] ...")."""
    text = str(error).strip()
    return re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", text)


def _waiting(what: str) -> str:
    """'receiving patch 1 from stage 0' -> 'waiting for patch 1 from stage 0' (what a timeout waited for)."""
    for verb, noun in (("receiving ", "for "), ("sending ", "to send "), ("exchanging ", "to exchange ")):
        if what.startswith(verb):
            return "waiting " + noun + what[len(verb):]
    return "waiting for " + what


def comm(channel: str) -> Comm:
    try:
        return _CHANNELS[channel]
    except KeyError:
        raise PipefusionCommError(f"no communication channel {channel!r} (its program was freed)") from None


# ---------------------------------------------------------------------------------------------------------
# The ops. Schedules call them; they are also visible by name in the schedule graph.


@torch.library.custom_op("pipefusion::irecv", mutates_args=("buf",))
def irecv(buf: torch.Tensor, peer: int, tag: int, channel: str) -> None:
    """Post a receive of patch `tag` (or, from `OUTPUT_TAG` on, of a model output band) from stage `peer` into
    `buf` (returns at once)."""
    comm(channel).irecv(buf, peer, tag)


@torch.library.custom_op("pipefusion::wait", mutates_args=("buf",))
def wait(buf: torch.Tensor, channel: str) -> None:
    """Block until the receive posted into `buf` has arrived (with the channel's timeout)."""
    comm(channel).wait_recv(buf)


@torch.library.custom_op("pipefusion::isend", mutates_args=())
def isend(buf: torch.Tensor, peer: int, tag: int, channel: str) -> None:
    """Start sending `buf` (patch `tag`) to stage `peer`; completion is awaited by `wait_sends`."""
    comm(channel).isend(buf, peer, tag)


@torch.library.custom_op("pipefusion::wait_sends", mutates_args=("token",))
def wait_sends(token: torch.Tensor, channel: str) -> None:
    """Block until every send of the earlier calls has completed. `token` only orders the op in the graph."""
    comm(channel).wait_sends()
