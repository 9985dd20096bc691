"""What the collector tells this rank: its run's verdict, findings and stop, over the
back-channel (``trainer_client.wire.health``).

The sender thread owns the SUB socket (``HealthSocket``) and is the only writer of
``Feedback``; the training thread only reads: ``health`` (an immutable snapshot, replaced
whole), ``stop`` (set once) and the ``pending`` findings (a deque: append on one side,
popleft on the other, no lock). ``deliver`` runs the user's ``on_finding`` callbacks on
the training thread, at the next ``log_*`` call; a callback that raises is logged once
and counted, never raised into the loop.

By default the sender thread also writes each raised finding on the training process's
console (logger ``trainwatch.client``), one line each, at most ``CONSOLE_PER_MIN`` a
minute; a stop is always said.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import zmq

from .curve import use_client_keys
from .identity import dial_options
from .wire import health as hw
from .wire.health import Finding, State, Stop

__all__ = ["CONSOLE_PER_MIN", "UNKNOWN", "Feedback", "Finding", "Health", "HealthSocket"]

_log = logging.getLogger("trainwatch.client")

MAX_PENDING = 1000  # findings kept for on_finding between two log_* calls (then oldest go)
CONSOLE_PER_MIN = 10  # finding lines a minute on the trainer's console (then a count)
SUB_HWM = 1000  # back-channel messages the SUB holds before it drops


class Health(NamedTuple):
    """The run's verdict as this rank last heard it (``TrainerClient.health``).

    ``level`` is "unknown" until the collector's first word, then "healthy", "warning" or
    "critical"; ``findings`` are what is raised now, in the order raised (each with its
    ``message`` and ``remedy``); ``epoch`` the last epoch judged (None before the first);
    ``stop_step``/``stopped_by`` the stop, once the collector decided one.
    """

    level: str
    epoch: int | None
    findings: tuple[Finding, ...]
    stop_step: int | None = None
    stopped_by: str | None = None


UNKNOWN = Health("unknown", None, ())


class Feedback:
    """The back-channel's news for one rank; see the module docstring."""

    def __init__(self, run: str, console: bool = True) -> None:
        self.run = run
        self.console = console
        self.health = UNKNOWN
        self.stop: Stop | None = None
        self.pending: deque[Finding] = deque(maxlen=MAX_PENDING)
        self.callbacks: list[Callable[[Finding], object]] = []
        self.stats = {"received": 0, "bad": 0, "findings": 0, "not_delivered": 0,
                      "callback_errors": 0}
        self._seq = 0  # the last finding or stop taken
        self._raised: dict[str, Finding] = {}
        self._epoch = -1
        self._told: deque[float] = deque()  # console lines in the last minute
        self._untold = 0
        self._failed: set[int] = set()  # callbacks already logged as failing
        self._delivering = False

    # -- sender thread -------------------------------------------------------------------
    def take(self, frames: list) -> None:
        """One message off the SUB socket: checked, deduplicated, applied in order."""
        try:
            msg = hw.decode(frames, self.run)
        except hw.BadHealthMessage:
            self.stats["bad"] += 1
            return
        self.stats["received"] += 1
        if isinstance(msg, State):
            self._state(msg)
        elif msg.seq > self._seq:
            self._seq = msg.seq
            if isinstance(msg, Finding):
                self._finding(msg)
            else:
                self._stop(msg)
            self._publish(msg.epoch)

    def _state(self, st: State) -> None:
        """A whole verdict: what this rank missed (it joined late, or a PUB dropped) is
        made up as findings, so ``health`` and the callbacks converge on it."""
        if st.seq < self._seq:
            return  # older than what was taken already
        now = {f.rule: f for f in st.raised}
        for rule in [r for r in self._raised if r not in now]:
            self._finding(Finding(st.seq, st.epoch, rule, hw.CLEARED, "info",
                                  f"{rule} cleared", ""))
        for f in st.raised:
            if self._raised.get(f.rule) != f:
                self._finding(f)
        self._seq = st.seq
        if st.stop is not None and self.stop is None:
            self._stop(st.stop)
        self._publish(st.epoch)

    def _finding(self, f: Finding) -> None:
        if f.kind == hw.RAISED:
            self._raised[f.rule] = f
        else:
            self._raised.pop(f.rule, None)
        self.stats["findings"] += 1
        if len(self.pending) == MAX_PENDING:
            self.stats["not_delivered"] += 1
        self.pending.append(f)
        if self.console and f.kind == hw.RAISED:
            self._say(f)

    def _stop(self, stop: Stop) -> None:
        if self.stop is None:
            self.stop = stop
            _log.warning("trainwatch: the collector stops run %r at step %d (%s)", self.run,
                         stop.step, _line(stop.rule))

    def _publish(self, epoch: int) -> None:
        self._epoch = max(self._epoch, epoch)
        raised = tuple(sorted(self._raised.values(), key=lambda f: f.seq))
        stop = self.stop
        self.health = Health(hw.level_of(f.severity for f in raised),
                             None if self._epoch < 0 else self._epoch, raised,
                             None if stop is None else stop.step,
                             None if stop is None else stop.rule)

    def _say(self, f: Finding) -> None:
        now = time.monotonic()
        while self._told and now - self._told[0] >= 60.0:
            self._told.popleft()
        if len(self._told) >= CONSOLE_PER_MIN:
            self._untold += 1
            return
        self._told.append(now)
        more = f" ({self._untold} more findings not shown)" if self._untold else ""
        self._untold = 0
        remedy = f" -> {f.remedy}" if f.remedy else ""
        _log.warning("trainwatch [%s] epoch %d %s: %s%s%s", _line(f.severity), f.epoch,
                     _line(f.rule), _line(f.message), _line(remedy), more)

    # -- training thread -----------------------------------------------------------------
    def deliver(self) -> None:
        """Run the callbacks on each pending finding, in order (never re-entered)."""
        if self._delivering:
            return
        self._delivering = True
        try:
            pending, callbacks = self.pending, tuple(self.callbacks)
            while pending:
                f = pending.popleft()
                for cb in callbacks:
                    try:
                        cb(f)
                    except Exception:
                        self.stats["callback_errors"] += 1
                        if id(cb) not in self._failed:
                            self._failed.add(id(cb))
                            _log.exception("trainwatch: the on_finding callback %r raised; "
                                           "training goes on (later failures are counted)",
                                           cb)
        finally:
            self._delivering = False


class HealthSocket:
    """The SUB socket of the back-channel, made, read and closed on the sender thread."""

    def __init__(self, endpoint: str, feedback: Feedback,
                 curve: dict[str, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self.feedback = feedback
        self._curve = curve
        self._sock: zmq.Socket | None = None

    def open(self, ctx: zmq.Context) -> None:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, SUB_HWM)
        sock.setsockopt(zmq.LINGER, 0)
        dial_options(sock, self.endpoint)
        use_client_keys(sock, self._curve)
        sock.setsockopt(zmq.SUBSCRIBE, hw.topic(self.feedback.run))
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            _log.warning("trainwatch: no back-channel: cannot connect to %s (%s)",
                         self.endpoint, exc)
            return
        self._sock = sock

    def poll(self) -> None:
        """Take every waiting message, without blocking."""
        sock = self._sock
        if sock is None:
            return
        try:
            while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self.feedback.take(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


def _line(text: str) -> str:
    """One line of visible text: messages quote config values and host names."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
