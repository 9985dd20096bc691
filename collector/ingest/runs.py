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

from collector.ingest.columns import StepColumns
from collector.ingest.counters import RankCounters, StepClock, StreamCounters
from collector.ingest.limits import RUN_BYTES, STEP_BYTES
from trainer_client import wire

__all__ = ["RankState", "RunState", "Stream", "StreamState", "step_bytes"]


def step_bytes(n_values: int, n_norms: int) -> int:
    """What one step holds until its epoch closes, as the budget counts it."""
    return STEP_BYTES + 8 * n_values + 4 * max(n_norms, 0)


class StreamState:
    """One client instance of a rank."""

    __slots__ = ("instance", "key", "counters", "open_steps", "open_bytes", "last_epoch",
                 "finished", "ended", "host", "pid", "clock")

    def __init__(self, instance: int, key: int, counters: StreamCounters) -> None:
        self.instance, self.key, self.counters = instance, key, counters
        self.open_steps = StepColumns()
        self.open_bytes = 0  # what its open epoch holds
        self.last_epoch = -1
        self.finished = False
        self.ended = ""  # how its client said it ended ("finished", "interrupted", ...)
        self.host, self.pid = "?", "?"
        self.clock = StepClock()  # its highest step and step rate (for a stop decision)

    def who(self) -> str:
        return f"{self.host} pid {self.pid} (instance {self.instance})"


class RankState:
    __slots__ = ("rank", "counters", "streams", "current")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.counters = RankCounters()
        self.streams: dict[int, StreamState] = {}
        self.current: StreamState | None = None  # the instance of its latest message

    @property
    def finished(self) -> bool:
        return self.current is not None and self.current.finished


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
