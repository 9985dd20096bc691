"""The back-channel: each run's verdict, findings and stop actions, published to its ranks.

A sink like the others: it reads the typed records the pipeline emits and keeps, per run,
what is raised (with each finding's message and remedy), the last epoch and the stop, if
one was decided. What a record changes goes out at the next ``flush`` (after the
recording's: no rank hears of a decision the durable log does not hold), in order: each
finding (``trainer_client.wire.health``), then the run's whole state. ``tick`` republishes
the state of every live run every ``REPUBLISH_S``, so a rank that subscribed late (a PUB
drops what was sent before a subscription arrived) converges on it::

    pub = HealthPublisher()
    pub.attach(pub_socket)        # the server's PUB, beside its PULL; before: state only
    pub.write(epoch_record)       # via the pipeline's FanOut
    pub.flush(); pub.tick(time.monotonic())

A PUB never blocks: past its high-water mark a subscriber's messages are dropped
(``stats["dropped"]``), and the next state makes up for them. ``ingest/*`` notes (remarks
on the stream, never cleared) are no findings; every other event is, and each new epoch
record's ``raised`` list is the truth the state is reconciled with.
"""

from __future__ import annotations

import time
from typing import Any

import zmq

from collector.records import (
    CLEARED,
    RAISED,
    EpochRecord,
    EventRecord,
    Record,
    RunRecord,
    StopRecord,
    SummaryRecord,
)
from collector.sinks.base import NullSink
from trainer_client.wire import health as hw

__all__ = ["REPUBLISH_S", "HealthPublisher"]

REPUBLISH_S = 1.0  # seconds between two states of a live run (what a late rank waits at most)
NOTES = "ingest/"  # events under this prefix are remarks on the stream, not findings


class _RunVerdict:
    """One run's back-channel state (sequence numbers start at 1 for each run)."""

    __slots__ = ("seq", "epoch", "raised", "stop", "out", "state_bytes", "sent_at", "ended")

    def __init__(self) -> None:
        self.seq = 0
        self.epoch = -1
        self.raised: dict[str, hw.Finding] = {}  # rule -> the finding that raised it
        self.stop: hw.Stop | None = None
        self.out: list[hw.Finding | hw.Stop] = []  # to publish at the next flush
        self.state_bytes: list[bytes] | None = None  # the encoded state (None: changed)
        self.sent_at = -1e18
        self.ended = False  # its summary came: one last state, then it is let go

    def state(self) -> hw.State:
        raised = tuple(sorted(self.raised.values(), key=lambda f: f.seq))
        return hw.State(self.seq, self.epoch, hw.level_of(f.severity for f in raised), raised,
                        self.stop)


class HealthPublisher:
    """A sink that publishes what the records say to the ranks; see the module docstring."""

    def __init__(self, republish_s: float = REPUBLISH_S) -> None:
        self.republish_s = republish_s
        self._sock: zmq.Socket | None = None
        self._runs: dict[str, _RunVerdict] = {}
        self._changed: dict[str, None] = {}  # runs with news, in the order they changed
        self.stats = {"sent": 0, "dropped": 0}

    def attach(self, sock: zmq.Socket) -> None:
        """Publish on ``sock`` from now on (the server's bound PUB)."""
        self._sock = sock

    # -- the sink ------------------------------------------------------------------------
    def write(self, record: Record) -> None:
        run = record.run
        if isinstance(record, RunRecord):
            self._runs[run] = _RunVerdict()  # a run id seen anew starts afresh
            self._touch(run)
            return
        v = self._runs.get(run)
        if v is None:
            return
        if isinstance(record, EpochRecord | EventRecord):
            for ev in record.events:
                if not ev.rule.startswith(NOTES):
                    self._finding(v, record.epoch, ev.rule, ev.kind, ev.severity, ev.message,
                                  ev.remedy)
            if isinstance(record, EpochRecord) and not record.amends:
                v.epoch = max(v.epoch, record.epoch)
                self._reconcile(v, record)
        elif isinstance(record, StopRecord):
            v.seq += 1
            v.stop = hw.Stop(v.seq, record.epoch, record.step, record.rule)
            v.out.append(v.stop)
        elif isinstance(record, SummaryRecord):
            v.ended = True
        else:
            return
        v.state_bytes = None
        self._touch(run)

    def _finding(self, v: _RunVerdict, epoch: int, rule: str, kind: str, severity: str,
                 message: str, remedy: str) -> None:
        v.seq += 1
        cut = hw.MAX_TEXT  # a rank refuses longer texts, and with them the whole state
        f = hw.Finding(v.seq, epoch, rule[:cut], kind, severity[:cut], message[:cut],
                       remedy[:cut])
        if kind == RAISED:
            v.raised[rule] = f
        else:
            v.raised.pop(rule, None)
        v.out.append(f)

    def _reconcile(self, v: _RunVerdict, record: EpochRecord) -> None:
        """A new epoch's ``raised`` is the truth (an amendment's is that of an older epoch):
        a flag raised without an event here (none should be) gets one, and one no longer
        raised is cleared."""
        now = set(record.raised)
        for rule in [r for r in v.raised if r not in now]:
            self._finding(v, record.epoch, rule, CLEARED, "info", f"{rule} cleared", "")
        for rule in sorted(now - v.raised.keys()):
            self._finding(v, record.epoch, rule, RAISED, "warning", f"{rule} is raised", "")

    def _touch(self, run: str) -> None:
        self._changed[run] = None

    def flush(self) -> None:
        """Send what changed since the last flush: the findings, then each run's state."""
        changed, self._changed = self._changed, {}
        for run in changed:
            v = self._runs.get(run)
            if v is None:
                continue
            out, v.out = v.out, []
            if self._sock is not None:  # else rebuilding from a recording: keep the state
                for msg in out:
                    self._send(hw.encode(msg, run))
                self._send_state(run, v)
            if v.ended:
                del self._runs[run]

    def tick(self, now: float) -> None:
        """Republish every live run's state not sent for ``republish_s`` (monotonic)."""
        if self._sock is None:
            return
        for run, v in self._runs.items():
            if now - v.sent_at >= self.republish_s:
                self._send_state(run, v)

    def _send_state(self, run: str, v: _RunVerdict) -> None:
        if v.state_bytes is None:
            v.state_bytes = hw.encode(v.state(), run)
        self._send(v.state_bytes)
        v.sent_at = time.monotonic()

    def _send(self, frames: list[Any]) -> None:
        try:
            self._sock.send_multipart(frames, flags=zmq.NOBLOCK)
            self.stats["sent"] += 1
        except zmq.ZMQError:  # Again included: a PUB drops rather than blocks
            self.stats["dropped"] += 1

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is left; the server closes the socket."""
        self.flush()


class NullPublisher(NullSink):
    """No back-channel (``--health-bind none``, or none could be bound): nothing to keep,
    nothing to send."""

    def attach(self, sock: zmq.Socket) -> None:
        pass

    def tick(self, now: float) -> None:
        pass


NULL_PUBLISHER = NullPublisher()
