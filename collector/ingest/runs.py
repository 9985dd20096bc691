"""What the state keeps of each run, rank and client instance: the records the ingest
state (``collector.ingest.state``) updates, and the epoch bookkeeping that lets an epoch
of any world size be known ready in O(1).

A run has ranks; a rank has client instances (streams, one per process that claimed it:
a restart or a twin is a stream of its own); each stream holds its open epoch's steps.
Epochs every rank closed wait in ``pending`` until they close, strictly in order.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from collector.analysis.inputs import DataConstants, ValidationInput, raw_array
from collector.ingest.columns import StepColumns
from collector.ingest.counters import RankCounters, StepClock, StreamCounters
from collector.ingest.facts import DataChunk
from collector.ingest.limits import RUN_BYTES, STEP_BYTES
from trainer_client import wire

__all__ = ["RankState", "RunState", "Stream", "StreamState", "message_cost", "step_bytes"]


def step_bytes(n_values: int, n_norms: int) -> int:
    """What one step holds until its epoch closes, as the budget counts it."""
    return STEP_BYTES + 8 * n_values + 4 * max(n_norms, 0)


class StreamState:
    """One client instance of a rank."""

    __slots__ = ("instance", "key", "counters", "open_steps", "open_bytes", "last_epoch",
                 "finished", "ended", "host", "pid", "clock", "twin", "spoke_at", "epoch_from")

    def __init__(self, instance: int, key: int, counters: StreamCounters) -> None:
        self.instance, self.key, self.counters = instance, key, counters
        self.open_steps = StepColumns()
        self.open_bytes = 0  # what its open epoch holds
        self.last_epoch = -1
        self.finished = False
        self.ended = ""  # how its client said it ended ("finished", "interrupted", ...)
        self.host, self.pid = "?", "?"
        self.clock = StepClock()  # its highest step and step rate (for a stop decision)
        # Seen live beside another instance of its rank (each spoke while the other had
        # not said bye): the rank is done only once both are. A process that went silent
        # before its successor's first message (a restart) is never a twin, and one silent
        # through the other's whole last epoch is one no longer (``State._bye_twins``).
        self.twin = False
        # Positions in the run's message order (``RunState.messages``), so that liveness is
        # judged by what a replay sees too: its latest message, and the start of its
        # latest epoch (where the previous one closed, or its first message).
        self.spoke_at = 0
        self.epoch_from = (0, 0)  # (start of its latest closed epoch, start of its open one)

    def who(self) -> str:
        return f"{self.host} pid {self.pid} (instance {self.instance})"


class RankState:
    __slots__ = ("rank", "counters", "streams", "current", "last_epoch")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.counters = RankCounters()
        self.streams: dict[int, StreamState] = {}
        self.current: StreamState | None = None  # the instance of its latest message
        self.last_epoch = -1  # the latest epoch an instance of it closed for the run

    @property
    def finished(self) -> bool:
        """Its latest instance said bye, and so did every twin of it."""
        cur = self.current
        return cur is not None and cur.finished and \
            all(s.finished for s in self.streams.values() if s.twin)


class Stream(NamedTuple):
    """The current client instance of a rank, as the bulk step path finds it by its key."""

    run: RunState
    rank: RankState
    stream: StreamState
    run_bytes: bytes


class RunState:
    def __init__(self, run: str, world_size: int) -> None:
        self.run = run
        self.world_size = world_size  # the first message's: a later change is a note
        self.ranks: dict[int, RankState] = {}
        self.pending: dict[int, dict[int, tuple]] = {}  # epoch -> rank -> (steps, body, bytes)
        # per pending epoch: [ranks of the world present, of which finished]: whether an
        # epoch can close is then O(1), however many ranks the world has
        self.tally: dict[int, list[int]] = {}
        self.pending_since: dict[int, float] = {}  # epoch -> monotonic time first seen
        self.last_closed = -1
        self.validations: list[tuple[int, int, wire.Tensor, list[str] | None]] = []
        # The samples the last AMEND_EPOCHS closed epochs were judged with: a late rank's
        # are pooled with them, so an amended epoch reads as if all had come in time.
        self.judged_samples: dict[int, list[tuple]] = {}
        self.param_names: list[str] = []
        self.config_seen = False
        self.wandb_id: str | None = None  # the first hello's WANDB_RUN_ID
        self.data_rank: int | None = None
        self.data_count = 0  # chunks announced by chunk 0
        self.data_seen: set[int] = set()  # never sized by the sender's claim
        self.data_channels: list[str] = []
        self.data_rows: tuple[int, int] | None = None  # chunk 0's rows_total, rows_sent
        self.finished = False
        self.finished_seen: float | None = None  # live clock: when a tick first saw it
        self.finished_ranks: set[int] = set()  # of range(world_size): their current said bye
        self.rejected: dict[str, int] = {}
        self.late_epochs = 0
        self.unclosed_steps = 0  # steps of ranks that ended before closing their epoch
        self.messages = 0
        self.held = RUN_BYTES
        self.noted: set[str] = set()  # notes already given (once each)
        self.seen = (0, time.monotonic())  # (messages, when that count was first seen)
        self.stop: tuple[int, str] | None = None  # (step, rule) once a stop was decided

    def awaited(self, epoch: int) -> bool:
        """Whether a rank of the world that has not finished has not closed ``epoch``."""
        present, finished_present = self.tally.get(epoch, (0, 0))
        return present + len(self.finished_ranks) - finished_present < self.world_size

    def rank_done(self, rank: int, done: bool) -> None:
        """A rank of the world finished (its current instance said bye), or restarted."""
        if rank >= self.world_size or (rank in self.finished_ranks) == done:
            return
        (self.finished_ranks.add if done else self.finished_ranks.discard)(rank)
        for epoch, slot in self.pending.items():
            if rank in slot:
                self.tally[epoch][1] += 1 if done else -1

    def add_pending(self, epoch: int, rank: int, entry: tuple) -> None:
        self.pending.setdefault(epoch, {})[rank] = entry
        t = self.tally.setdefault(epoch, [0, 0])
        if rank < self.world_size:
            t[0] += 1
            t[1] += rank in self.finished_ranks

    def pop_pending(self, epoch: int) -> dict[int, tuple]:
        self.tally.pop(epoch, None)
        self.pending_since.pop(epoch, None)
        return self.pending.pop(epoch, {})

    def pool(self, ready: list[tuple]) -> ValidationInput:
        """Pool one epoch's samples over the ranks (one dtype and channel count)."""
        first = ready[-1]
        same = [v for v in ready if v[0] == first[0] and v[2].dtype == first[2].dtype
                and v[2].shape[-1] == first[2].shape[-1]]
        same.sort(key=lambda v: v[1])  # by rank: the figures do not depend on arrival order
        names = first[3] or self.data_channels or [f"ch{i}" for i in range(first[2].shape[-1])]
        return ValidationInput(first[0], first[2].dtype, [raw_array(v[2]) for v in same],
                               list(names))

    def overdue(self, now: float, timeout_s: float, evict_after_s: float) -> list[dict]:
        """The controls the live clock calls for on this run (see ``State.overdue``)."""
        if self.finished:
            if self.finished_seen is None:
                self.finished_seen = now
            elif now - self.finished_seen >= evict_after_s:
                return [{"op": "evict_run", "run": self.run}]
            return []
        out = [{"op": "close_epoch", "run": self.run, "epoch": epoch}
               for epoch, since in sorted(self.pending_since.items()) if now - since >= timeout_s]
        # Some ranks said goodbye and the rest went quiet: they died. All quiet for much
        # longer: the whole job died. (Quiet = no new message since a tick.)
        if self.messages != self.seen[0]:
            self.seen = (self.messages, now)
        if now - self.seen[1] >= (timeout_s if self.finished_ranks else 5 * timeout_s):
            out.append({"op": "finish_run", "run": self.run})
        return out

    def data_chunk(self, msg: wire.Message) -> DataChunk | None:
        """A chunk of the training data's sample, or None for another rank's copy, a repeat
        or a chunk that contradicts chunk 0 (whose constants and channels it keeps)."""
        body = msg.body
        consts = None
        if self.data_rank is None and body["index"] == 0:
            self.data_rank = msg.rank
            self.data_count = body["count"]
            self.data_channels = list(body["channels"])
            c = {k: np.frombuffer(msg.tensors[k].data, np.float64).copy()
                 if k in msg.tensors else None for k in ("mean", "std")}
            consts = DataConstants(self.data_channels, c["mean"], c["std"])
            if body.get("rows_total") is not None:
                self.data_rows = (body["rows_total"], body["rows_sent"])
        if msg.rank != self.data_rank or body["index"] in self.data_seen \
                or body["index"] >= self.data_count or body["channels"] != self.data_channels:
            return None
        self.data_seen.add(body["index"])
        t = msg.tensors["chunk"]
        return DataChunk(self.run, raw_array(t), t.dtype, self.data_channels, consts,
                         len(self.data_seen) == self.data_count, self.data_rows)

    def progress(self) -> tuple[int, float, float] | None:
        """(highest step, steps per second, wall time of that step) over the current
        streams of its ranks; None once finished or before any step. The rate is the
        fastest rank's: a margin from it is never too short."""
        clocks = [] if self.finished else \
            [r.current.clock for r in self.ranks.values() if r.current is not None]
        clocks = [c for c in clocks if c.step >= 0]
        if not clocks:
            return None
        return (max(c.step for c in clocks), max(c.rate() for c in clocks),
                max(c.wall for c in clocks))

    def status(self) -> dict:
        """What the live view shows of the run."""
        return {
            "epoch": self.last_closed if self.last_closed >= 0 else None,
            "ranks_connected": sum(1 for r in self.ranks.values() if not r.finished),
            "world_size": self.world_size,
            "messages": self.messages,
            "dropped": sum(r.counters.reported_drops for r in self.ranks.values()),
            "rejected": sum(self.rejected.values()),
            "held_bytes": self.held,
            "finished": self.finished,
        }


def message_cost(msg: wire.Message) -> int:
    """What a message makes the state hold until its epoch closes (steps and samples)."""
    if msg.kind == wire.KIND_STEP:
        pn = msg.tensors.get("param_norms") if msg.tensors else None
        return step_bytes(len(msg.body[3]), pn.shape[0] if pn is not None else 0)
    if msg.kind == wire.KIND_VALIDATION:
        return len(msg.tensors["samples"].data)
    return 0
