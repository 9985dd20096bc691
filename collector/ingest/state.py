"""Per-run, per-rank state: admitted messages in, what they complete out.

``admit`` says whether a message may be taken (and changes nothing); ``apply`` takes it
and returns the facts it completes (``facts``): a run opened, a config, a chunk of data,
a non-finite step, an epoch closed, a run finished. The state builds no statistics and
calls nothing back: the pipeline acts on the facts, in order.

A step only appends to its rank's open epoch; arrays are built once per epoch, when every
rank of the run has closed it (``EpochInput``). Epochs close strictly in order. A rank
that never closes an epoch is waited for until the live collector's clock says otherwise;
that decision comes back in as a control (``close_epoch``) so that a replay decides the
same.
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from collector.analysis.inputs import (
    AMEND_EPOCHS,
    DataConstants,
    EpochInput,
    ValidationInput,
    raw_array,
)
from collector.ingest.columns import StepColumns
from collector.ingest.counters import RankCounters
from collector.ingest.facts import (
    BadStep,
    ConfigSeen,
    DataChunk,
    EpochClosed,
    Fact,
    LateValidation,
    RunFinished,
    RunOpened,
)
from collector.ingest.stepscan import Groups, Steps, stream_key
from collector.records import plain
from trainer_client import wire

__all__ = ["RankState", "RunState", "State", "Stream"]


class RankState:
    __slots__ = ("counters", "open_steps", "last_epoch", "finished", "ended", "host", "rank")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.counters = RankCounters()
        self.open_steps = StepColumns()
        self.last_epoch = -1
        self.finished = False
        self.ended = ""  # how the rank's client said it ended ("finished", "interrupted", ...)
        self.host = ""


class Stream(NamedTuple):
    """A client instance of a rank, as the bulk step path finds it by its key."""

    run: RunState
    rank: RankState
    instance: int
    run_bytes: bytes


class RunState:
    def __init__(self, run: str, world_size: int) -> None:
        self.run = run
        self.world_size = world_size
        self.ranks: dict[int, RankState] = {}
        self.pending: dict[int, dict[int, tuple]] = {}  # epoch -> rank -> (steps, body)
        self.pending_since: dict[int, float] = {}  # epoch -> monotonic time first seen
        self.last_closed = -1
        self.validations: list[tuple[int, int, wire.Tensor, list[str] | None]] = []
        # The samples the last AMEND_EPOCHS closed epochs were judged with: a late rank's
        # are pooled with them, so an amended epoch reads as if all had come in time.
        self.judged_samples: dict[int, list[tuple]] = {}
        self.param_names: list[str] = []
        self.config_seen = False
        self.data_rank: int | None = None
        self.data_count = 0  # chunks announced by chunk 0
        self.data_seen: set[int] = set()  # never sized by the sender's claim
        self.data_channels: list[str] = []
        self.finished = False
        self.rejected: dict[str, int] = {}
        self.late_epochs = 0
        self.unclosed_steps = 0  # steps of ranks that ended before closing their epoch
        self.seen = (0, time.monotonic())  # (messages, when that count was first seen)

    def missing(self, epoch: int) -> list[int]:
        present = self.pending.get(epoch, {})
        return [r for r in range(self.world_size) if r not in present]


class State:
    """All runs seen: ``admit``, then ``apply``, each message; see the module docstring."""

    def __init__(self) -> None:
        self.runs: dict[str, RunState] = {}
        self.streams: dict[int, Stream] = {}  # stream key -> stream, for ``apply_steps``

    # -- messages ------------------------------------------------------------------
    def admit(self, msg: wire.Message) -> str | None:
        """Why ``msg`` must be rejected, or None. Changes nothing.

        A rank's messages must rise in sequence per client instance, and its epochs must
        rise; a new instance (a restarted process) starts afresh.
        """
        run = self.runs.get(msg.run)
        rank = run.ranks.get(msg.rank) if run is not None else None
        if rank is None or msg.instance != rank.counters.instance:
            return None
        if msg.seq <= rank.counters.last_seq:
            return "duplicate_seq"
        if msg.kind == wire.KIND_EPOCH and msg.epoch <= rank.last_epoch:
            return "epoch_out_of_order"
        return None

    def apply(self, msg: wire.Message) -> list[Fact]:
        """Take an admitted message; the facts it completes, in order."""
        out: list[Fact] = []
        run = self.runs.get(msg.run)
        if run is None:
            run = self.runs[msg.run] = RunState(msg.run, msg.world_size)
            # Every rank's launcher gave it the same WANDB_* environment: the first
            # hello (whichever rank) speaks for the run.
            env = msg.body.get("env", {}) if msg.kind == wire.KIND_HELLO else {}
            out.append(RunOpened(run.run, msg.world_size, plain(dict(env))))
        elif msg.world_size > run.world_size:
            run.world_size = msg.world_size
        rank = run.ranks.get(msg.rank)
        if rank is None:
            rank = run.ranks[msg.rank] = RankState(msg.rank)
        if msg.instance != rank.counters.instance:
            if rank.counters.instance is not None:  # a restarted process starts afresh
                rank.last_epoch = -1
                rank.open_steps = StepColumns()
                rank.finished = False
            rank.counters.admit(msg.instance, msg.seq)
            self.streams[stream_key(run.run, rank.rank, msg.instance)] = Stream(
                run, rank, msg.instance, run.run.encode())
        rank.counters.count(msg.kind, msg.seq, msg.dropped, msg.wall_time)
        self._apply(run, rank, msg, out)
        return out

    def stream(self, key: int, run_bytes: bytes) -> Stream | None:
        """The live stream behind a bulk step key, or None (then the message goes alone)."""
        st = self.streams.get(key)
        if st is None or st.rank.counters.instance != st.instance or st.run_bytes != run_bytes:
            return None
        return st

    @staticmethod
    def last_seqs(streams: list[Stream | None]) -> np.ndarray:
        """Each stream's last sequence number (-1 for None), for the bulk admit."""
        return np.array([-1 if st is None else st.rank.counters.last_seq for st in streams],
                        np.int64)

    def apply_steps(self, st: Stream, g: Groups, j: int, seg_names: list[list[str]],
                    s: Steps, buf: np.ndarray) -> None:
        """Take stream ``j`` of a regrouped stretch of admitted fast steps: what ``apply``
        does for each, at once (fast steps are finite: they complete nothing)."""
        run, rank = st.run, st.rank
        world = int(g.max_world[j])
        if world > run.world_size:
            run.world_size = world
        rank.counters.count_many(wire.KIND_STEP, int(g.bounds[j + 1] - g.bounds[j]),
                                 int(g.last_seq[j]), int(g.max_dropped[j]),
                                 float(g.last_wall[j]))
        rank.open_steps.extend(g, j, seg_names, s, buf)

    def _apply(self, run: RunState, rank: RankState, msg: wire.Message, out: list[Fact]
               ) -> None:
        kind = msg.kind
        if kind == wire.KIND_STEP:
            rank.open_steps.add(msg)
            loss, gn = msg.body[0], msg.body[1]
            if not math.isfinite(loss) or (gn is not None and not math.isfinite(gn)):
                out.append(BadStep(run.run, msg.epoch, msg.step, msg.rank, float(loss),
                                   None if gn is None else float(gn)))
        elif kind == wire.KIND_EPOCH:
            self._rank_epoch(run, rank, msg, out)
        elif kind == wire.KIND_HELLO:
            rank.host = str(msg.body.get("host", ""))
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
            self._data(run, msg, out)
        elif kind == wire.KIND_BYE:
            rank.finished = True
            ended = msg.body.get("ended")
            rank.ended = ended[:64] if isinstance(ended, str) and ended else "finished"
            run.unclosed_steps += rank.open_steps.rows()
            rank.open_steps = StepColumns()
            self._close_ready(run, out)
            if all(r in run.ranks and run.ranks[r].finished for r in range(run.world_size)):
                self._finish(run, "finished", out)

    def _rank_epoch(self, run: RunState, rank: RankState, msg: wire.Message,
                    out: list[Fact]) -> None:
        steps, rank.open_steps = rank.open_steps, StepColumns()
        rank.last_epoch = msg.epoch
        if msg.body.get("param_names"):
            run.param_names = list(msg.body["param_names"])
        if msg.epoch <= run.last_closed:
            run.late_epochs += 1  # closed without this rank after a timeout
            return
        slot = run.pending.setdefault(msg.epoch, {})
        if not slot:
            run.pending_since[msg.epoch] = time.monotonic()
        slot[msg.rank] = (steps, msg.body)
        self._close_ready(run, out)

    def _close_ready(self, run: RunState, out: list[Fact]) -> None:
        """Close complete epochs in order; an incomplete earlier epoch holds later ones."""
        while run.pending:
            epoch = min(run.pending)
            present = run.pending[epoch]
            alive = [r for r in range(run.world_size)
                     if not (r in run.ranks and run.ranks[r].finished and r not in present)]
            if not all(r in present for r in alive) or not present:
                return
            self._close(run, epoch, out)

    def _close(self, run: RunState, epoch: int, out: list[Fact]) -> None:
        missing = tuple(run.missing(epoch))
        present = run.pending.pop(epoch, {})
        run.pending_since.pop(epoch, None)
        run.last_closed = max(run.last_closed, epoch)
        steps, weights, ema = {}, {}, {}
        for r in sorted(present):
            msgs, body = present[r]
            steps[r] = msgs.series()
            if body.get("weights") is not None:
                weights[r] = np.asarray(body["weights"], dtype=np.float64)
            if body.get("ema") is not None:
                ema[r] = np.asarray(body["ema"], dtype=np.float64)
        inp = EpochInput(run.run, epoch, run.world_size, steps, weights, ema,
                         list(run.param_names), list(missing), self._validation(run, epoch))
        out.append(EpochClosed(run.run, inp, tuple(sorted(present)), missing))

    def _validation_msg(self, run: RunState, msg: wire.Message, out: list[Fact]) -> None:
        epoch = msg.body.get("epoch", msg.epoch)
        entry = (epoch, msg.rank, msg.tensors["samples"], msg.body.get("channels"))
        if epoch > run.last_closed:
            run.validations.append(entry)  # joins its epoch when that closes
            return
        if epoch < run.last_closed - AMEND_EPOCHS:
            return  # too late to amend; the health stage could not judge it again either
        pooled = run.judged_samples.setdefault(epoch, [])  # that epoch is written: amend it
        pooled.append(entry)
        out.append(LateValidation(run.run, epoch, self._pool(run, pooled)))

    def _validation(self, run: RunState, epoch: int) -> ValidationInput | None:
        """The samples sent for this epoch (and any sent for epochs that never closed)."""
        for old in [e for e in run.judged_samples if e < epoch - AMEND_EPOCHS]:
            del run.judged_samples[old]
        ready = [v for v in run.validations if v[0] <= epoch]
        if not ready:
            return None
        run.validations = [v for v in run.validations if v[0] > epoch]
        run.judged_samples[epoch] = ready
        return self._pool(run, ready)

    @staticmethod
    def _pool(run: RunState, ready: list[tuple]) -> ValidationInput:
        """Pool one epoch's samples over the ranks (one dtype and channel count)."""
        first = ready[-1]
        same = [v for v in ready if v[0] == first[0] and v[2].dtype == first[2].dtype
                and v[2].shape[-1] == first[2].shape[-1]]
        names = first[3] or run.data_channels or [f"ch{i}" for i in range(first[2].shape[-1])]
        return ValidationInput(first[0], first[2].dtype, [raw_array(v[2]) for v in same],
                               list(names))

    def _data(self, run: RunState, msg: wire.Message, out: list[Fact]) -> None:
        body = msg.body
        consts = None
        if run.data_rank is None and body["index"] == 0:
            run.data_rank = msg.rank
            run.data_count = body["count"]
            run.data_channels = list(body["channels"])
            c = {k: np.frombuffer(msg.tensors[k].data, np.float64).copy()
                 if k in msg.tensors else None for k in ("mean", "std")}
            consts = DataConstants(run.data_channels, c["mean"], c["std"])
        if msg.rank != run.data_rank or body["index"] in run.data_seen \
                or body["index"] >= run.data_count or body["channels"] != run.data_channels:
            return  # another rank's copy, a repeat, or a chunk that contradicts chunk 0
        run.data_seen.add(body["index"])
        t = msg.tensors["chunk"]
        out.append(DataChunk(run.run, raw_array(t), t.dtype, run.data_channels, consts,
                             len(run.data_seen) == run.data_count))

    # -- decisions and the end -----------------------------------------------------
    def reject(self, run: str | None, reason: str, n: int = 1) -> None:
        rs = self.runs.get(run) if run else None
        if rs is not None:
            rs.rejected[reason] = rs.rejected.get(reason, 0) + n

    def overdue(self, now: float, timeout_s: float) -> list[dict]:
        """Controls the live clock calls for: epochs waited on too long, silent runs."""
        out = []
        for run in self.runs.values():
            if run.finished:
                continue
            for epoch, since in sorted(run.pending_since.items()):
                if now - since >= timeout_s:
                    out.append({"op": "close_epoch", "run": run.run, "epoch": epoch,
                                "missing": run.missing(epoch)})
            # Some ranks said goodbye and the rest went quiet: they died. All quiet for
            # much longer: the whole job died. (Quiet = no new message since a tick.)
            msgs = sum(r.counters.messages for r in run.ranks.values())
            if msgs != run.seen[0]:
                run.seen = (msgs, now)
            quiet = now - run.seen[1]
            done = any(r.finished for r in run.ranks.values())
            if quiet >= (timeout_s if done else 5 * timeout_s):
                out.append({"op": "finish_run", "run": run.run})
        return out

    def control(self, ctl: dict) -> list[Fact]:
        """Apply a decision (from the clock, or replayed); the facts it completes."""
        out: list[Fact] = []
        if ctl.get("op") == "rejects":
            for name, reasons in ctl["counts"].items():
                for reason, n in reasons.items():
                    self.reject(name or None, reason, n)
            return out
        run = self.runs.get(ctl.get("run", ""))
        if run is None or run.finished:
            return out
        if ctl["op"] == "close_epoch" and ctl["epoch"] in run.pending:
            # Everything before it closes first (in order), then it, then what follows.
            for epoch in sorted(e for e in run.pending if e <= ctl["epoch"]):
                self._close(run, epoch, out)
            self._close_ready(run, out)
        elif ctl["op"] == "finish_run":
            self._finish(run, "went quiet", out)
        return out

    def _finish(self, run: RunState, ended: str, out: list[Fact]) -> None:
        for epoch in sorted(run.pending):
            self._close(run, epoch, out)
        run.finished = True
        told = sorted({r.ended for r in run.ranks.values() if r.ended not in ("", "finished")})
        if ended == "finished" and told:
            ended = ", ".join(told)  # e.g. "interrupted": a rank's client said so
        for r in run.ranks.values():
            run.unclosed_steps += r.open_steps.rows()
        counts = {
            "dropped": sum(r.counters.reported_drops for r in run.ranks.values()),
            "seq_gaps": sum(r.counters.seq_gaps for r in run.ranks.values()),
            "rejected": sum(run.rejected.values()),
            "late_epochs": run.late_epochs,
            "unclosed_steps": run.unclosed_steps,
            "missing_ranks": sum(1 for r in range(run.world_size) if r not in run.ranks
                                 or not run.ranks[r].finished),
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
        return {name: {
            "epoch": run.last_closed if run.last_closed >= 0 else None,
            "ranks_connected": sum(1 for r in run.ranks.values() if not r.finished),
            "world_size": run.world_size,
            "messages": sum(r.counters.messages for r in run.ranks.values()),
            "dropped": sum(r.counters.reported_drops for r in run.ranks.values()),
            "rejected": sum(run.rejected.values()),
            "finished": run.finished,
        } for name, run in self.runs.items()}
