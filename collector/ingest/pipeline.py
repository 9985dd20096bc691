"""The one code path from frames to records, for the live socket and for replay alike.

    frames -> decode -> state.admit -> recording -> state.apply -> facts
           -> analysis (health.on_epoch, ...) -> typed records -> sink

Messages come in batches (``feed_batch``): what the server drained off the socket, or a
stretch of a recording. Binary step frames, nearly all of the traffic, are parsed in one
compiled pass (``stepscan``); a run of them whose streams are known and whose sequence
numbers rise is recorded in bulk and appended to the state column-wise. Every other
message, and any step the bulk pass does not vouch for, takes the per-message path
(``feed``), which gives the same result one at a time; tests hold the two equal. Both
record what they accept before it has any effect.

Live, the server asks ``tick(now)`` for the clock's decisions (epoch timeouts), and the stop
policy for its (``collector.ingest.stops``), which are written to the recording as CONTROL
records. A replay feeds the recorded frames and
controls, in order, to an identical pipeline with a recorder that records nothing, so it
reaches identical records.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import msgpack
import numpy as np

from collector.analysis.health import EpochVerdict, RunHealth
from collector.analysis.profile import Profile
from collector.ingest.batch import Batch, record_frames, step_bytes_of
from collector.ingest.facts import (
    BadStep,
    ConfigSeen,
    DataChunk,
    EpochClosed,
    Fact,
    LateValidation,
    Note,
    RunEvicted,
    RunFinished,
    RunOpened,
    StopDecided,
)
from collector.ingest.limits import Limits
from collector.ingest.runs import Stream
from collector.ingest.state import State
from collector.ingest.stepscan import (
    COUNT,
    SEQ,
    WORLD,
    Steps,
    admit,
    group_rows,
    parse_steps,
)
from collector.recording import controls
from collector.recording.format import CONTROL, MESSAGE
from collector.recording.reader import ReadStats, frames_of, open_recording, scan
from collector.recording.writer import NullRecorder, Recorder
from collector.records import (
    RAISED,
    ConfigRecord,
    DataStatsRecord,
    EpochRecord,
    Event,
    EventRecord,
    Ranks,
    Record,
    RunRecord,
    StopRecord,
    SummaryRecord,
)
from collector.sinks.base import NullSink, Sink
from collector.text import printable
from trainer_client import wire

__all__ = ["Pipeline", "replay"]

_log = logging.getLogger("trainwatch.collector")
MIN_RUN = 8  # fast steps in a row worth a bulk pass (one costs ~20 us of numpy calls)
NO_RANKS = Ranks()
MIN_WINDOW, MAX_WINDOW = MIN_RUN, 1 << 16  # messages one bulk attempt may read (feed_batch)
# Rejects the user hears of (once per run and reason), beside the counts every summary has.
NOTED_REJECTS = {"over_budget": "the collector's memory budget (--max-held-mb) is full",
                 "world_size_over_limit": "the world size is over --max-world-size",
                 "epoch_out_of_order": "an epoch came after a later one of its rank"}


class Pipeline:
    """Feed it frames (``feed``, ``feed_batch``) and recorded controls; records go to ``sink``.

    ``recorder`` keeps what is accepted (a ``NullRecorder`` records nothing).
    """

    def __init__(self, profile: Profile, sink: Sink | None = None,
                 recorder: Recorder | None = None, epoch_timeout_s: float = 60.0,
                 limits: Limits | None = None) -> None:
        self.profile = profile
        self.sink: Sink = sink if sink is not None else NullSink()
        self.recorder: Recorder = recorder if recorder is not None else NullRecorder()
        self.epoch_timeout_s = epoch_timeout_s
        self.state = State(limits)
        self.health: dict[str, RunHealth] = {}
        self.accepted = 0
        self.bulk_accepted = 0  # of which taken by the bulk step path
        self.rejected: dict[str, int] = {}
        self.records_out = 0
        self.active: dict[str, tuple[str, ...]] = {}  # run -> rules raised at its last epoch
        self._pending_rejects: dict[str, dict[str, int]] = {}

    def warm_up(self) -> None:
        """Compile (or load from numba's cache) the kernels before the first epoch needs them."""
        from collector.analysis import kernels
        from collector.ingest import stepscan
        from collector.recording import scan as recordscan

        kernels.warm_up()
        stepscan.warm_up()
        recordscan.warm_up()

    # -- messages in ---------------------------------------------------------------
    def feed(self, frames: list) -> bool:
        """One message off the wire (or out of a recording). True if accepted."""
        try:
            msg = wire.decode(frames)
        except wire.DecodeError as exc:
            self._reject(exc.reason, exc.run)
            return False
        reason = self.state.admit(msg)
        if reason is not None:
            self._reject(reason, msg.run)
            return False
        self._record(frames)
        try:
            self._publish(self.state.apply(msg))
        except Exception:  # a bug must not take the collector down: count it, go on
            self._internal_error(1, msg.kind, msg.run)
            return False
        self.accepted += 1
        return True

    def feed_batch(self, b: Batch) -> None:
        """Messages in order; the same result as ``feed`` on each (see the module doc).

        Linear in the batch whatever it holds: a bulk attempt starts only at a step whose
        stream is known and whose sequence number rises (one look-up; anything else goes
        alone), and reads at most twice what the attempt before it took (``window``), so
        streams that keep cutting the bulk path short (new instances, duplicates) cost
        what the per-message path costs.
        """
        n = len(b.offs)
        if not n:
            return
        s = parse_steps(b.buf, b.offs, b.lens, b.nfr, self.state.limits.max_world_size)
        slow = np.flatnonzero(~s.fast).tolist() + [n]
        i = k = 0
        window = MAX_WINDOW
        while i < n:
            while slow[k] < i:
                k += 1
            end = slow[k]
            if end - i >= MIN_RUN and self._bulk_ready(b, s, i):
                j = self._fast_run(b, s, i, min(end, i + window))
                window = min(MAX_WINDOW, max(MIN_WINDOW, 2 * (j - i)))
                i = j
            elif i < end:  # a short stretch costs less one by one than in bulk
                stop = end if end - i < MIN_RUN else i + 1
                for j in range(i, stop):
                    self.feed(b.frames(j))
                i = stop
                continue
            if i < n:  # the message the bulk path stopped at, or does not vouch for
                self.feed(b.frames(i))
                i += 1

    def _bulk_ready(self, b: Batch, s: Steps, i: int) -> bool:
        """Whether fast step ``i`` is one the bulk path would take as it stands."""
        o, ln = s.run_at[i]
        st = self.state.stream(int(s.key[i]), b.buf[o:o + ln].tobytes())
        return st is not None and int(s.ints[i, SEQ]) > st.stream.counters.last_seq \
            and int(s.ints[i, WORLD]) == st.run.world_size

    def _fast_run(self, b: Batch, s: Steps, a: int, e: int) -> int:
        """Take fast steps ``a``, ``a+1``, ... up to ``e`` for as long as every one is
        accepted as it stands; return where that stopped."""
        keys = s.key[a:e]
        ukeys, first = np.unique(keys, return_index=True)
        streams: list[Stream | None] = []
        for key, f in zip(ukeys.tolist(), first.tolist(), strict=True):
            o, ln = s.run_at[a + f]
            st = self.state.stream(key, b.buf[o:o + ln].tobytes())
            if st is None:  # new or restarted: the per-message path registers it
                e = min(e, a + f)
            streams.append(st)
        if e == a:
            return a
        nkeys = s.names_key[a:e]
        unames, nfirst = np.unique(nkeys, return_index=True)
        names: list = []
        for f in nfirst.tolist():
            o, ln = s.names_at[a + f]
            try:  # the decoder keeps the last region it read: steps repeat their names
                nm = wire.step_names(b.buf[o:o + ln].tobytes(), int(s.comp_at[a + f, COUNT]))
            except wire.DecodeError:
                nm = None  # not utf-8: the per-message path rejects it
            if nm is None:
                e = min(e, a + f)
            names.append(nm)
        if e == a:
            return a
        sidx = np.searchsorted(ukeys, keys[:e - a])
        # A step of another world size than its run's goes alone (it earns a note).
        worlds = np.array([0 if st is None else st.run.world_size for st in streams], np.int64)
        off = np.flatnonzero(s.ints[a:e, WORLD] != worlds[sidx])
        if off.size:
            e = a + int(off[0])
            sidx = sidx[:e - a]
        e = a + admit(sidx, s.ints[a:e, SEQ], self.state.last_seqs(streams))
        if e == a:
            return a
        sidx = sidx[:e - a]
        cost = step_bytes_of(s, a, e)
        if not self.state.room(int(cost.sum())):
            return a  # over the budget: the per-message path refuses and counts them
        nidx = np.searchsorted(unames, nkeys[:e - a])
        self._flush_rejects()
        self.recorder.append_messages(b.buf, b.offs[a:e], b.lens[a:e])
        g = group_rows(s, a, sidx, nidx, len(streams))
        seg_ids = nidx[g.rows[g.changes] - a].tolist()
        cb = g.change_bounds.tolist()
        held = np.bincount(sidx, weights=cost, minlength=len(streams)).astype(np.int64)
        for j, st in enumerate(streams):
            if g.bounds[j + 1] > g.bounds[j] and st is not None:
                try:
                    self.state.apply_steps(st, g, j, [names[k] for k in seg_ids[cb[j]:cb[j + 1]]],
                                           s, b.buf, int(held[j]))
                except Exception:  # a bug must not take the collector down
                    self._internal_error(int(g.bounds[j + 1] - g.bounds[j]), wire.KIND_STEP,
                                         st.run.run)
        self.accepted += e - a
        self.bulk_accepted += e - a
        return e

    # -- facts -> analysis -> records ----------------------------------------------
    def _publish(self, facts: list[Fact]) -> None:
        for f in facts:
            if isinstance(f, EpochClosed):
                v = self.health[f.run].on_epoch(f.inp)
                self._emit_all(v.extra)
                self._emit(self._epoch_record(f.run, v, f.ranks, f.missing))
            elif isinstance(f, RunOpened):
                self.health[f.run] = RunHealth(f.run, self.profile)
                self._emit(RunRecord(f.run, f.world_size, f.env))
            elif isinstance(f, BadStep):
                ev = self.health[f.run].step_event(f.rank, f.step, f.loss, f.grad_norm)
                if ev is not None:
                    self._emit(EventRecord(f.run, f.epoch, f.step, f.rank, (ev,)))
            elif isinstance(f, ConfigSeen):
                self.health[f.run].on_config(f.config)
                self._emit(ConfigRecord(f.run, f.config))
            elif isinstance(f, DataChunk):
                health = self.health[f.run]
                if f.consts is not None:
                    health.on_data_constants(f.consts)
                health.on_data(f.chunk, f.dtype)
                if f.last:
                    self._emit(DataStatsRecord(f.run, health.data_metrics(f.channels, f.rows)))
            elif isinstance(f, LateValidation):
                for v in self.health[f.run].on_late_validation(f.epoch, f.validation):
                    self._emit_all(v.extra)
                    self._emit(self._epoch_record(f.run, v, amends=True))
            elif isinstance(f, RunFinished):
                self._emit_all(self.health[f.run].finish())  # before the summary ends it
                metrics = self.health[f.run].summary(f.counts)
                self._emit(SummaryRecord(f.run, f.last_closed, metrics, f.ended))
            elif isinstance(f, Note):
                self._emit(EventRecord(f.run, f.epoch, -1, -1,
                                       (Event(f.rule, RAISED, "warning", f.message),)))
            elif isinstance(f, RunEvicted):
                self.health.pop(f.run, None)
                self.active.pop(f.run, None)
            elif isinstance(f, StopDecided):
                self._emit(StopRecord(f.run, f.epoch, f.step, f.rule, f.seen, f.steps_per_s))

    def _epoch_record(self, run: str, v: EpochVerdict, ranks: Ranks = NO_RANKS,
                      missing: Ranks = NO_RANKS, amends: bool = False) -> EpochRecord:
        self.active[run] = v.raised
        return EpochRecord(run, v.epoch, v.metrics, tuple(v.events), v.raised, ranks, missing,
                           amends, v.profile)

    def _emit(self, record: Record) -> None:
        self.records_out += 1
        self.sink.write(record)

    def _emit_all(self, records: Iterable[Record]) -> None:
        """What the views draw besides the epoch rows (step curves, pictures), sent before
        the epoch's record, so a sink can show them in that epoch's row."""
        for record in records:
            self._emit(record)

    # -- rejects and recording -----------------------------------------------------
    def _internal_error(self, n: int, kind: int, run: str) -> None:
        count = self.rejected.get("internal_error", 0)
        if count < 3 or (count + n) // 1000 != count // 1000:
            _log.exception("internal error on %d %s message(s) of run %s (%d so far)", n,
                           wire.KINDS.get(kind), printable(run), count + n)
        self._reject("internal_error", run, n)

    def _record(self, frames: list) -> None:
        self._flush_rejects()
        self.recorder.append(MESSAGE, frames)

    def _reject(self, reason: str, run: str | None, n: int = 1) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + n
        self.state.reject(run, reason, n)
        self._note_reject(run, reason)
        per_run = self._pending_rejects.setdefault(run or "", {})
        per_run[reason] = per_run.get(reason, 0) + n

    def _note_reject(self, run: str | None, reason: str) -> None:
        """The first reject of a kind the user should hear of, in a run's own records (a
        replay says it where the recorded reject counts come in: the same place)."""
        rs = self.state.runs.get(run) if run else None
        said = reason in NOTED_REJECTS or reason == "run_finished"
        if rs is None or not said or f"reject {reason}" in rs.noted:
            return
        rs.noted.add(f"reject {reason}")
        if reason == "run_finished":  # its records are complete: said on the console only
            _log.warning("run %s has ended (its summary is written): later messages in its "
                         "name are refused and counted as run_finished; the id is free "
                         "again once the run is evicted (--evict-after)", printable(rs.run))
            return
        self._emit(EventRecord(rs.run, max(rs.last_closed, 0), -1, -1, (Event(
            f"ingest/{reason}", RAISED, "warning",
            f"messages refused: {NOTED_REJECTS[reason]}; the run's summary counts them"),)))

    def _flush_rejects(self) -> None:
        """Rejects reach the recording as one control, so a replay's counts agree."""
        if self._pending_rejects:
            ctl = {"op": "rejects", "counts": self._pending_rejects}
            self._pending_rejects = {}
            self.recorder.append(CONTROL, [msgpack.packb(ctl)])

    # -- decisions, replay, the end ------------------------------------------------
    def control(self, ctl: dict, record: bool = True) -> None:
        """Apply a decision (from the clock, or replayed from a CONTROL record)."""
        if record:
            self.recorder.append(CONTROL, [msgpack.packb(ctl)])
        if ctl.get("op") == "rejects":
            if record:  # live rejects were counted when they happened
                return
            for name, reason_counts in ctl["counts"].items():
                for reason, n in reason_counts.items():
                    self.rejected[reason] = self.rejected.get(reason, 0) + n
                    self._note_reject(name or None, reason)
        self._publish(self.state.control(ctl))

    def tick(self, now: float) -> None:
        """Live only: the clock's decisions, recorded before they are applied."""
        self._flush_rejects()
        for ctl in self.state.overdue(now, self.epoch_timeout_s):
            self.control(ctl)

    def feed_recording(self, path: str | Path, stats: ReadStats | None = None) -> ReadStats:
        """Push a whole recording through this pipeline, a stretch of messages at a time."""
        st = stats if stats is not None else ReadStats()
        raw = open_recording(path, st)
        if raw is None:
            return st
        for c in scan(raw, st):
            a = 0
            for k in [*np.flatnonzero(c.rtype != MESSAGE).tolist(), len(c.rtype)]:
                if k > a:
                    self.feed_batch(Batch(raw, c.first[a:k], c.first_len[a:k], c.n_frames[a:k],
                                          record_frames(raw, c.body[a:k], c.n_frames[a:k],
                                                         c.first[a:k])))
                if k < len(c.rtype) and c.rtype[k] == CONTROL:
                    self._replay_control(frames_of(raw, int(c.body[k]), int(c.n_frames[k]),
                                                   int(c.first[k])), st)
                a = k + 1
            self.sink.flush()
        return st

    def rebuild(self, path: str | Path, history: Sink | None = None,
                stats: ReadStats | None = None) -> int:
        """Bring the state back from an earlier session's recording: nothing is recorded
        again, and the records it rebuilds go to ``history`` (outputs that resume, e.g. a
        JSONL sink that keeps what it already holds), not to the live sink. Returns the
        records read (``stats``: all the counts, skipped records included)."""
        recorder, sink = self.recorder, self.sink
        self.recorder, self.sink = NullRecorder(), history if history is not None else NullSink()
        try:
            return self.feed_recording(path, stats).records
        finally:
            self.sink.flush()
            self.recorder, self.sink = recorder, sink

    def flush(self) -> None:
        """The recording first, then the sinks: no output gets ahead of the durable log."""
        self.recorder.flush()
        self.sink.flush()

    def _replay_control(self, frames: list, st: ReadStats) -> None:
        ctl = controls.parse(frames)  # checked like a message off the wire
        if ctl is None:
            st.bad_controls += 1
            return
        self.control(ctl.as_dict(), record=False)

    def finish(self, timeout_s: float = 120.0) -> None:
        """Close what is open: summaries for unfinished runs, then the recording and sinks."""
        self._flush_rejects()
        self._publish(self.state.finish_all())
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
