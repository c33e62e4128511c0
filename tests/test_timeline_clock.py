"""The timeline's clock: host stamps on CPU; on a CUDA device, events read back into host seconds without
blocking the host, in order, across a device change. The device is faked here (CI has none): a fake event
completes when the fake device's clock passes the time it was recorded at."""
from __future__ import annotations

import pytest
import torch

from pipefusion_compile.comm import Clock, LocalComm


class FakeDevice:
    """A device that runs its queue in order: `now` is how far it has got (ms of device time)."""

    def __init__(self):
        self.queued = 0.0   # device time at which the work queued so far ends
        self.now = 0.0
        self.syncs = 0

    def enqueue(self, ms: float) -> None:
        self.queued += ms

    def synchronize(self) -> None:
        self.syncs += 1
        self.now = self.queued

    def event(self):
        device = self

        class Event:
            def record(self):
                self.at = device.queued

            def query(self):
                return device.now >= self.at

            def synchronize(self):
                device.now = max(device.now, self.at)

            def elapsed_time(self, other):
                assert self.query() and other.query(), "elapsed_time of an event the device has not reached"
                return other.at - self.at

        return Event()


def fake_clock(device: FakeDevice) -> Clock:
    return Clock(torch.device("cuda", 0), event=device.event, synchronize=device.synchronize)


def test_host_clock_on_cpu():
    clock = Clock(torch.device("cpu"))
    assert not clock.on_device
    t0 = clock.mark()
    assert isinstance(t0, float) and clock.seconds(t0, wait=False) == t0


def test_device_marks_read_back_in_host_seconds_without_blocking():
    dev = FakeDevice()
    clock = fake_clock(dev)
    dev.enqueue(5.0)                      # work queued before the first mark: the anchor waits for it once
    start = clock.mark()
    assert dev.syncs == 1
    anchor_host = clock._anchor[1]
    dev.enqueue(20.0)                     # a 20 ms stage, queued, not run
    end = clock.mark()
    assert clock.seconds(end, wait=False) is None   # not run yet: no answer, and no wait
    assert dev.syncs == 1
    dev.now = dev.queued                  # the device ran it
    assert clock.seconds(start, wait=False) == pytest.approx(anchor_host)
    assert clock.seconds(end, wait=False) == pytest.approx(anchor_host + 0.020)
    assert clock.mark() and dev.syncs == 1          # the anchor is made once


def test_comm_keeps_unfinished_events_for_a_later_flush_in_order():
    dev = FakeDevice()
    comm = LocalComm(name="clock-test", stage=0, stage_ranks=[0], timeout_s=1.0, record_timeline=True)
    comm.clock = fake_clock(dev)
    comm.clock.device = torch.device("cuda", 0)
    comm.new_step(3, torch.device("cuda", 0))       # same device: the clock stays
    for patch, ms in enumerate((10.0, 30.0)):
        comm.patch = patch
        t0 = comm.mark()
        dev.enqueue(ms)
        comm.record("compute", t0)
    dev.now = 12.0                         # past patch 0, inside patch 1
    first = comm.take_timeline(wait=False)
    assert [(e.patch, e.kind, e.step) for e in first] == [(0, "compute", 3)]
    assert first[0].end - first[0].start == pytest.approx(0.010)
    rest = comm.take_timeline(wait=True)   # the final flush waits
    assert [e.patch for e in rest] == [1]
    assert rest[0].start == pytest.approx(first[0].end)
    assert rest[0].end - rest[0].start == pytest.approx(0.030)
    assert comm.take_timeline(wait=False) == []


def test_a_device_change_reads_the_old_clock_first():
    comm = LocalComm(name="clock-test-2", stage=0, stage_ranks=[0], timeout_s=1.0, record_timeline=True)
    old = FakeDevice()
    comm.clock = fake_clock(old)
    t0 = comm.mark()
    old.enqueue(7.0)
    comm.record("compute", t0)             # still running on the old device
    # the next call runs on another device: the old clock's stamps are read (waiting for them) before it goes
    comm.new_step(1, torch.device("cuda", 1))
    assert comm.clock.device == torch.device("cuda", 1)
    new = FakeDevice()
    comm.clock = fake_clock(new)
    t1 = comm.mark()
    new.enqueue(4.0)
    comm.record("compute", t1)
    events = comm.take_timeline(wait=False)
    assert [e.step for e in events] == [0]          # the new device's event has not run: it stays
    assert events[0].end - events[0].start == pytest.approx(0.007)
    new.synchronize()
    assert [e.step for e in comm.take_timeline(wait=False)] == [1]


def test_no_stamps_when_the_timeline_is_off():
    comm = LocalComm(name="clock-test-3", stage=0, stage_ranks=[0], timeout_s=1.0)
    assert comm.mark() == 0.0
    comm.record("compute", 0.0)
    assert comm.take_timeline() == []
