"""The one code path from frames to records, for the live socket and for replay alike.

    frames -> decode/validate -> state.admit -> recording -> state.apply -> health -> sinks

Live, the server feeds frames as they come and asks ``tick(now)`` for the clock's
decisions (epoch timeouts), which are written to the recording as CONTROL records. A
replay feeds the recorded frames and controls, in order, to an identical pipeline with no
recorder, so it reaches identical records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import msgpack

from trainer_client import wire

from .profile import Profile
from .recording import CONTROL, MESSAGE, ReadStats, RecordWriter, read_records
from .sinks import NullSink, Record, Sink
from .state import State

__all__ = ["Pipeline", "replay"]

_log = logging.getLogger("trainwatch.collector")
_NOT_RULES = ("health/phase", "health/mode_collapse_score")


class Pipeline:
    """Feed it frames (``feed``) and recorded controls; it writes records to ``sink``."""

    def __init__(self, profile: Profile, sink: Sink | None = None,
                 recorder: RecordWriter | None = None, epoch_timeout_s: float = 60.0) -> None:
        self.sink: Sink = sink if sink is not None else NullSink()
        self.recorder = recorder
        self.epoch_timeout_s = epoch_timeout_s
        self.state = State(profile, self._emit)
        self.state.before_apply = self._record
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.records_out = 0
        self._pending_rejects: dict[str, dict[str, int]] = {}
        self.muted = False  # while rebuilding state from an old recording
        self.active: dict[str, list[str]] = {}  # run -> rules firing in its latest epoch

    def _emit(self, record: Record) -> None:
        self.records_out += 1
        if record["type"] == "epoch":
            self.active[record["run"]] = sorted(
                k[7:] for k, v in record["metrics"].items()
                if k.startswith("health/") and v == 1 and k not in _NOT_RULES)
        if not self.muted:
            self.sink.write(record)

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels before the first epoch needs them."""
        from .kernels import warm_up

        warm_up()

    def feed(self, frames: list) -> bool:
        """One message off the wire (or out of a recording). True if accepted."""
        try:
            msg = wire.decode(frames)
        except wire.DecodeError as exc:
            self._reject(exc.reason, exc.run)
            return False
        try:
            reason = self.state.accept(msg, frames)
        except Exception:  # a bug must not take the collector down: count it, go on
            reason = "internal_error"
            n = self.rejected.get(reason, 0) + 1  # counted by _reject just below
            if n <= 3 or n % 1000 == 0:
                _log.exception("internal error on a %s message of run %s (%d so far)",
                               wire.KINDS.get(msg.kind), msg.run, n)
        if reason is not None:
            self._reject(reason, msg.run)
            return False
        self.accepted += 1
        return True

    def _record(self, frames: list | None) -> None:
        if self.recorder is not None:
            if self._pending_rejects:
                self._record_rejects()
            self.recorder.append(MESSAGE, frames)

    def _reject(self, reason: str, run: str | None) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.state.reject(run, reason)
        per_run = self._pending_rejects.setdefault(run or "", {})
        per_run[reason] = per_run.get(reason, 0) + 1

    def _record_rejects(self) -> None:
        """Rejects reach the recording as one control, so a replay's counts agree."""
        ctl = {"op": "rejects", "counts": self._pending_rejects}
        self._pending_rejects = {}
        if self.recorder is not None:
            self.recorder.append(CONTROL, [msgpack.packb(ctl)])

    def control(self, ctl: dict, record: bool = True) -> None:
        """Apply a decision (from the clock, or replayed from a CONTROL record)."""
        if record and self.recorder is not None:
            self.recorder.append(CONTROL, [msgpack.packb(ctl)])
        if ctl.get("op") == "rejects":
            if not record:  # live rejects were counted when they happened
                for reason_counts in ctl["counts"].values():
                    for reason, n in reason_counts.items():
                        self.rejected[reason] = self.rejected.get(reason, 0) + n
                self.state.control(ctl)
            return
        self.state.control(ctl)

    def tick(self, now: float) -> None:
        """Live only: the clock's decisions, recorded before they are applied."""
        if self._pending_rejects:
            self._record_rejects()
        for ctl in self.state.overdue(now, self.epoch_timeout_s):
            self.control(ctl)

    def feed_recording(self, path: str | Path, stats: ReadStats | None = None) -> ReadStats:
        """Push a whole recording through this pipeline."""
        st = stats if stats is not None else ReadStats()
        feed, control = self.feed, self.control
        for rtype, frames in read_records(path, st):
            if rtype == MESSAGE:
                feed(frames)
            elif rtype == CONTROL:
                try:
                    ctl = msgpack.unpackb(frames[0])
                except Exception:
                    st.corrupted += 1
                    continue
                if isinstance(ctl, dict):
                    control(ctl, record=False)
        return st

    def finish(self, timeout_s: float = 30.0) -> None:
        """Close what is open: summaries for unfinished runs, then the sinks."""
        if self._pending_rejects:
            self._record_rejects()
        self.state.finish_all()
        if self.recorder is not None:
            self.recorder.close()
        self.sink.close(timeout_s)


def replay(paths: Iterable[str | Path], profile: Profile, sink: Sink | None = None
           ) -> tuple[Pipeline, ReadStats]:
    """Feed recordings through a fresh pipeline, then finish it."""
    pipe = Pipeline(profile, sink)
    st = ReadStats()
    for p in paths:
        pipe.feed_recording(p, st)
    pipe.finish()
    return pipe, st
