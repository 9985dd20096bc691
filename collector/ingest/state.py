"""Per-run, per-rank, per-client-instance state: admitted messages in, what they complete out.

``admit`` says whether a message may be taken (and changes nothing); ``apply`` takes it
and returns the facts it completes (``facts``): a run opened, a config, a chunk of data, a
non-finite step, an epoch closed, a run finished, and notes for the user (a world size
that changed, two processes claiming one rank). The state builds no statistics and calls
nothing back: the pipeline acts on the facts, in order.

Every client instance (process) of a rank is a stream of its own: its sequence numbers,
open epoch and goodbye; a restarted rank is a new stream that starts afresh, and two live
ones on one rank keep true accounting each (the rank ends when both said goodbye, and an
epoch one closed is not the other's to close again). A step only appends to its stream's
open epoch; arrays are built once per epoch, when every rank of the run has closed it
(``EpochInput``). Epochs close strictly in order; a rank that never closes one is waited
for until the live clock says otherwise, a decision that comes back in as a control
(``close_epoch``) so that a replay decides the same. What the state holds is counted
against ``Limits.max_held_bytes``; what would exceed it is refused at ``admit``.

A stop decision (``[actions] stop_on``) reads each run's ``RunState.progress``: its highest
step and recent step rate, from each stream's ``StepClock``; the decision itself comes back
in as a control (``stop_run``), recorded like the clock's, and the state keeps the first
one per run.
"""

from __future__ import annotations

import math
import time

import numpy as np

from collector.analysis.inputs import (
    AMEND_EPOCHS,
    EpochInput,
    ValidationInput,
)
from collector.ingest.columns import StepColumns
from collector.ingest.facts import (
    BadStep,
    ConfigSeen,
    EpochClosed,
    Fact,
    LateValidation,
    Note,
    RunEvicted,
    RunFinished,
    RunOpened,
    StopDecided,
)
from collector.ingest.limits import RUN_BYTES, STREAM_BYTES, Limits
from collector.ingest.runs import RankState, RunState, Stream, StreamState, message_cost
from collector.ingest.stepscan import Groups, Steps, stream_key
from collector.records import Ranks, plain
from trainer_client import wire

__all__ = ["State"]


class State:
    """All runs seen: ``admit``, then ``apply``, each message; see the module docstring."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits if limits is not None else Limits()
        self.runs: dict[str, RunState] = {}
        self.streams: dict[int, Stream] = {}  # stream key -> stream, for ``apply_steps``
        self.held = 0  # bytes the budget counts, over every run

    # -- messages ------------------------------------------------------------------
    def admit(self, msg: wire.Message) -> str | None:
        """Why ``msg`` must be rejected, or None. Changes nothing.

        A stream's sequence numbers and epochs must rise; a run may claim up to
        ``max_world_size`` ranks; a new run, instance, step or sample must fit the budget;
        a run whose summary is written takes nothing more (every output ends there alike;
        its id is free again once the run is evicted).
        """
        lim = self.limits
        if msg.world_size > lim.max_world_size:
            return "world_size_over_limit"
        run = self.runs.get(msg.run)
        cost = message_cost(msg)
        if run is None:
            if len(self.runs) >= lim.max_runs:
                return "too_many_runs"
            cost += RUN_BYTES + STREAM_BYTES
        else:
            rank = run.ranks.get(msg.rank)
            st = rank.streams.get(msg.instance) if rank is not None else None
            if st is None:
                cost += STREAM_BYTES
            elif not st.counters.admit(msg.seq):
                return "duplicate_seq"  # the more telling reason, finished run or not
            elif msg.kind == wire.KIND_EPOCH and msg.epoch <= st.last_epoch:
                return "epoch_out_of_order"
            if run.finished:
                return "run_finished"
        if cost and self.held + cost > lim.max_held_bytes:
            return "over_budget"
        return None

    def room(self, nbytes: int) -> bool:
        """Whether the budget takes ``nbytes`` more (the bulk step path asks first)."""
        return self.held + nbytes <= self.limits.max_held_bytes

    def apply(self, msg: wire.Message) -> list[Fact]:
        """Take an admitted message; the facts it completes, in order."""
        out: list[Fact] = []
        run = self.runs.get(msg.run)
        if run is None:
            run = self.runs[msg.run] = RunState(msg.run, msg.world_size)
            self._hold(run, RUN_BYTES)
            # Every rank's launcher gave it the same WANDB_* environment: the first
            # hello (whichever rank) speaks for the run.
            env = plain(dict(msg.body.get("env", {}))) if msg.kind == wire.KIND_HELLO else {}
            run.wandb_id = env.get("WANDB_RUN_ID") if msg.kind == wire.KIND_HELLO else None
            out.append(RunOpened(run.run, msg.world_size, env))
        elif msg.world_size != run.world_size:
            self._note(run, f"world_size {msg.world_size}", out,
                       f"rank {msg.rank} says the world has {msg.world_size} ranks; the run "
                       f"started with {run.world_size}, which stays its world size")
        rank = run.ranks.get(msg.rank)
        if rank is None:
            rank = run.ranks[msg.rank] = RankState(msg.rank)
        st = rank.streams.get(msg.instance)
        if st is None:
            st = self._new_stream(run, rank, msg.instance)
        elif st is not rank.current:  # the rank's instance of its latest message speaks for it
            if not rank.current.finished:
                self._note(run, f"instances {msg.rank}", out,
                           f"two live processes claim rank {msg.rank}: {st.who()} and "
                           f"{rank.current.who()}; each is counted on its own, and the "
                           f"rank ends when both have")
                st.twin = rank.current.twin = True
            rank.current = st
            run.rank_done(rank.rank, rank.finished)
        st.counters.count(msg.kind, msg.seq, msg.dropped, msg.wall_time)
        run.messages += 1
        st.spoke_at = run.messages
        self._apply(run, rank, st, msg, out)
        return out

    def _new_stream(self, run: RunState, rank: RankState, instance: int) -> StreamState:
        """A client instance's first message: it starts afresh and speaks for the rank."""
        key = stream_key(run.run, rank.rank, instance)
        st = StreamState(instance, key, rank.counters.stream(instance))
        st.epoch_from = (run.messages, run.messages)
        rank.streams[instance] = st
        rank.current = st
        run.rank_done(rank.rank, False)
        self._hold(run, STREAM_BYTES)
        self.streams[key] = Stream(run, rank, st, run.run.encode())
        while len(rank.streams) > self.limits.max_streams_per_rank:  # fold the oldest
            old = next(iter(rank.streams.values()))
            self._drop_stream(run, rank, old)
        return st

    def _drop_stream(self, run: RunState, rank: RankState, st: StreamState) -> None:
        del rank.streams[st.instance]
        rank.counters.fold(st.instance)
        self.streams.pop(st.key, None)
        run.unclosed_steps += st.open_steps.rows()
        self._hold(run, -STREAM_BYTES - st.open_bytes)

    def stream(self, key: int, run_bytes: bytes) -> Stream | None:
        """The current stream behind a bulk step key, or None (the message then goes alone:
        a new instance registers there, an old one's note is given there, and a finished
        run's refusal is counted there)."""
        s = self.streams.get(key)
        if s is None or s.rank.current is not s.stream or s.run_bytes != run_bytes \
                or s.run.finished:
            return None
        return s

    @staticmethod
    def last_seqs(streams: list[Stream | None]) -> np.ndarray:
        """Each stream's last sequence number (-1 for None), for the bulk admit."""
        return np.array([-1 if s is None else s.stream.counters.last_seq for s in streams],
                        np.int64)

    def apply_steps(self, s: Stream, g: Groups, j: int, seg_names: list[list[str]],
                    steps: Steps, buf: np.ndarray, nbytes: int) -> None:
        """Take stream ``j`` of a regrouped stretch of admitted fast steps: what ``apply``
        does for each, at once (fast steps are finite and of the run's world size: they
        complete nothing). ``nbytes``: what they hold, as ``step_bytes`` counts it."""
        n = int(g.bounds[j + 1] - g.bounds[j])
        s.stream.counters.count_many(wire.KIND_STEP, n, int(g.last_seq[j]),
                                     int(g.max_dropped[j]), float(g.last_wall[j]))
        s.run.messages += n
        s.stream.spoke_at = s.run.messages
        s.stream.open_steps.extend(g, j, seg_names, steps, buf)
        s.stream.clock.note(int(g.step[g.bounds[j + 1] - 1]), float(g.last_wall[j]))
        s.stream.open_bytes += nbytes
        self._hold(s.run, nbytes)

    def _apply(self, run: RunState, rank: RankState, st: StreamState, msg: wire.Message,
               out: list[Fact]) -> None:
        kind = msg.kind
        if kind == wire.KIND_STEP:
            st.open_steps.add(msg)
            st.clock.note(msg.step, msg.wall_time)
            cost = message_cost(msg)
            st.open_bytes += cost
            self._hold(run, cost)
            loss, gn = msg.body[0], msg.body[1]
            if not math.isfinite(loss) or (gn is not None and not math.isfinite(gn)):
                out.append(BadStep(run.run, msg.epoch, msg.step, msg.rank, float(loss),
                                   None if gn is None else float(gn)))
        elif kind == wire.KIND_EPOCH:
            self._rank_epoch(run, rank, st, msg, out)
        elif kind == wire.KIND_HELLO:
            st.host = str(msg.body.get("host", "?"))[:256]
            st.pid = str(msg.body.get("pid", "?"))[:32]
            self._hello_env(run, msg, out)
        elif kind == wire.KIND_VALIDATION:
            self._validation_msg(run, msg, out)
        elif kind == wire.KIND_CONFIG:
            if not run.config_seen:
                run.config_seen = True
                cfg = dict(msg.body["config"])
                if msg.body.get("num_params") is not None:
                    cfg["num_params"] = msg.body["num_params"]
                out.append(ConfigSeen(run.run, plain(cfg)))
        elif kind == wire.KIND_DATA:
            chunk = run.data_chunk(msg)
            if chunk is not None:
                out.append(chunk)
        elif kind == wire.KIND_BYE:
            st.finished = True
            self._bye_twins(rank, st)
            ended = msg.body.get("ended")
            st.ended = ended[:64] if isinstance(ended, str) and ended else "finished"
            run.unclosed_steps += st.open_steps.rows()
            self._hold(run, -st.open_bytes)
            st.open_steps, st.open_bytes = StepColumns(), 0
            run.rank_done(rank.rank, rank.finished)  # its sender is the current instance
            self._close_ready(run, out)
            if not run.finished and len(run.finished_ranks) == run.world_size:
                self._finish(run, "finished", out)

    @staticmethod
    def _bye_twins(rank: RankState, st: StreamState) -> None:
        """Which twins of a stream that says bye the rank still waits for: those that
        spoke during its latest epoch. One silent all through it (a process that died
        without a bye, or a forged hello in the run's name) is not waited for."""
        since = st.epoch_from[0]
        for other in rank.streams.values():
            if other.twin and not other.finished and other.spoke_at <= since:
                other.twin = False

    def _hello_env(self, run: RunState, msg: wire.Message, out: list[Fact]) -> None:
        """Only the run's first hello says which wandb run it is; another that asks for a
        different one is a note, not a redirection."""
        asked = plain(dict(msg.body.get("env", {}))).get("WANDB_RUN_ID")
        if asked is not None and run.wandb_id is not None and asked != run.wandb_id:
            self._note(run, f"wandb {asked}", out,
                       f"rank {msg.rank} asks for wandb run {asked!r}; the run writes to "
                       f"{run.wandb_id!r}, set by its first hello")

    def _rank_epoch(self, run: RunState, rank: RankState, st: StreamState, msg: wire.Message,
                    out: list[Fact]) -> None:
        steps, held = st.open_steps, st.open_bytes
        st.open_steps, st.open_bytes = StepColumns(), 0
        st.last_epoch = msg.epoch
        st.epoch_from = (st.epoch_from[1], run.messages)
        if msg.body.get("param_names"):
            run.param_names = list(msg.body["param_names"])
        if msg.epoch <= rank.last_epoch:  # another process on this rank closed it first
            self._hold(run, -held)
            return
        rank.last_epoch = msg.epoch
        if msg.epoch <= run.last_closed:
            run.late_epochs += 1  # closed without this rank after a timeout
            self._hold(run, -held)
            return
        if not run.pending.get(msg.epoch):
            run.pending_since[msg.epoch] = time.monotonic()
        run.add_pending(msg.epoch, msg.rank, (steps, msg.body, held))
        self._close_ready(run, out)

    def _close_ready(self, run: RunState, out: list[Fact]) -> None:
        """Close complete epochs in order; an incomplete earlier epoch holds later ones."""
        while run.pending:
            epoch = min(run.pending)
            if not run.pending[epoch] or run.awaited(epoch):
                return
            self._close(run, epoch, out)

    def _close(self, run: RunState, epoch: int, out: list[Fact]) -> None:
        present = run.pop_pending(epoch)
        run.last_closed = max(run.last_closed, epoch)
        steps, weights, ema = {}, {}, {}
        for r in sorted(present):
            msgs, body, held = present[r]
            self._hold(run, -held)
            steps[r] = msgs.series()
            if body.get("weights") is not None:
                weights[r] = np.asarray(body["weights"], dtype=np.float64)
            if body.get("ema") is not None:
                ema[r] = np.asarray(body["ema"], dtype=np.float64)
        missing = Ranks.missing(list(present), run.world_size)
        inp = EpochInput(run.run, epoch, run.world_size, steps, weights, ema,
                         list(run.param_names), missing.count, self._validation(run, epoch))
        out.append(EpochClosed(run.run, inp, Ranks.of(list(present)), missing))

    def _validation_msg(self, run: RunState, msg: wire.Message, out: list[Fact]) -> None:
        epoch = msg.body.get("epoch", msg.epoch)
        entry = (epoch, msg.rank, msg.tensors["samples"], msg.body.get("channels"))
        self._hold(run, message_cost(msg))
        if epoch > run.last_closed:
            run.validations.append(entry)  # joins its epoch when that closes
            return
        if epoch < run.last_closed - AMEND_EPOCHS:
            self._hold(run, -message_cost(msg))
            return  # too late to amend; the health stage could not judge it again either
        pooled = run.judged_samples.setdefault(epoch, [])  # that epoch is written: amend it
        pooled.append(entry)
        out.append(LateValidation(run.run, epoch, run.pool(pooled)))

    def _validation(self, run: RunState, epoch: int) -> ValidationInput | None:
        """The samples sent for this epoch (and any sent for epochs that never closed)."""
        for old in [e for e in run.judged_samples if e < epoch - AMEND_EPOCHS]:
            self._hold(run, -sum(len(v[2].data) for v in run.judged_samples.pop(old)))
        ready = [v for v in run.validations if v[0] <= epoch]
        if not ready:
            return None
        run.validations = [v for v in run.validations if v[0] > epoch]
        run.judged_samples[epoch] = ready
        return run.pool(ready)

    def _note(self, run: RunState, key: str, out: list[Fact], message: str) -> None:
        if key not in run.noted and len(run.noted) < 100:  # once each, and a few at most
            run.noted.add(key)
            out.append(Note(run.run, max(run.last_closed, 0), "ingest/" + key.split()[0],
                            message))

    def _hold(self, run: RunState, nbytes: int) -> None:
        run.held += nbytes
        self.held += nbytes

    # -- decisions and the end -----------------------------------------------------
    def reject(self, run: str | None, reason: str, n: int = 1) -> None:
        rs = self.runs.get(run) if run else None
        if rs is not None:
            rs.rejected[reason] = rs.rejected.get(reason, 0) + n

    def overdue(self, now: float, timeout_s: float) -> list[dict]:
        """Controls the live clock calls for: epochs waited on too long, silent runs, and
        finished runs held long enough."""
        return [ctl for run in self.runs.values()
                for ctl in run.overdue(now, timeout_s, self.limits.evict_after_s)]

    def control(self, ctl: dict) -> list[Fact]:
        """Apply a decision (from the clock, or replayed); the facts it completes."""
        out: list[Fact] = []
        op = ctl.get("op")
        if op == "rejects":
            for name, reasons in ctl["counts"].items():
                for reason, n in reasons.items():
                    self.reject(name or None, reason, n)
            return out
        if op == "limits":
            self.limits = Limits.from_control(ctl)
            return out
        run = self.runs.get(ctl.get("run", ""))
        if run is None:
            return out
        if op == "evict_run" and run.finished:
            self._evict(run, out)
        if run.finished:
            return out
        if op == "close_epoch" and ctl["epoch"] in run.pending:
            # Everything before it closes first (in order), then it, then what follows.
            for epoch in sorted(e for e in run.pending if e <= ctl["epoch"]):
                self._close(run, epoch, out)
            self._close_ready(run, out)
        elif op == "finish_run":
            self._finish(run, "went quiet", out)
        elif op == "stop_run" and run.stop is None:
            run.stop = (ctl["step"], ctl["rule"])
            out.append(StopDecided(run.run, max(run.last_closed, 0), ctl["step"], ctl["rule"],
                                   ctl["seen"], ctl["rate"]))
        return out

    def _evict(self, run: RunState, out: list[Fact]) -> None:
        del self.runs[run.run]
        for rank in run.ranks.values():
            for st in rank.streams.values():
                self.streams.pop(st.key, None)
        self.held -= run.held
        out.append(RunEvicted(run.run))

    def _finish(self, run: RunState, ended: str, out: list[Fact]) -> None:
        for epoch in sorted(run.pending):
            self._close(run, epoch, out)
        run.finished = True
        told = sorted({st.ended for rank in run.ranks.values() for st in rank.streams.values()
                       if st.ended not in ("", "finished")})
        if ended == "finished" and told:
            ended = ", ".join(told)  # e.g. "interrupted": a rank's client said so
        for rank in run.ranks.values():
            for st in rank.streams.values():
                run.unclosed_steps += st.open_steps.rows()
                self._hold(run, -st.open_bytes)
                st.open_steps, st.open_bytes = StepColumns(), 0
        counts = {
            "dropped": sum(r.counters.reported_drops for r in run.ranks.values()),
            "seq_gaps": sum(r.counters.seq_gaps for r in run.ranks.values()),
            "rejected": sum(run.rejected.values()),
            "late_epochs": run.late_epochs,
            "unclosed_steps": run.unclosed_steps,
            "missing_ranks": run.world_size - len(run.finished_ranks),
        }
        out.append(RunFinished(run.run, run.last_closed if run.last_closed >= 0 else None,
                               counts, ended))

    def finish_all(self, ended: str = "unfinished") -> list[Fact]:
        out: list[Fact] = []
        for run in list(self.runs.values()):
            if not run.finished:
                self._finish(run, ended, out)
        return out

    def all_finished(self) -> bool:
        return bool(self.runs) and all(r.finished for r in self.runs.values())

    def rank_table(self) -> dict[str, dict[int, dict]]:
        return {name: {r: rs.counters.as_dict() for r, rs in sorted(run.ranks.items())}
                for name, run in self.runs.items()}

    def run_status(self) -> dict[str, dict]:
        """Per run, what the live view shows of the state."""
        return {name: run.status() for name, run in self.runs.items()}
