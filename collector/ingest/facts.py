"""What the state found in an admitted message: typed facts for the pipeline to act on.

The state only keeps runs, ranks and open epochs; it returns these, and the pipeline turns
each into analysis calls and records, in order. Plain data, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collector.analysis.inputs import DataConstants, EpochInput, ValidationInput
from collector.records import Ranks

__all__ = ["BadStep", "ConfigSeen", "DataChunk", "EpochClosed", "Fact", "LateValidation",
           "Note", "RunEvicted", "RunFinished", "RunOpened", "StopDecided"]


@dataclass(frozen=True, slots=True)
class RunOpened:
    run: str
    world_size: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConfigSeen:
    run: str
    config: dict  # already plain (``records.plain``)


@dataclass(frozen=True, slots=True)
class DataChunk:
    """One accepted chunk of the training data; ``consts`` with the first, ``last`` with
    the one that completes the set."""

    run: str
    chunk: np.ndarray  # raw: float16/32/64, or bfloat16 as uint16
    dtype: str
    channels: list[str]
    consts: DataConstants | None
    last: bool
    rows: tuple[int, int] | None = None  # (rows the data had, rows sent), when the client said


@dataclass(frozen=True, slots=True)
class BadStep:
    """A step with a non-finite loss or gradient norm: its rule is raised at once."""

    run: str
    epoch: int
    step: int
    rank: int
    loss: float
    grad_norm: float | None


@dataclass(frozen=True, slots=True)
class EpochClosed:
    run: str
    inp: EpochInput
    ranks: Ranks
    missing: Ranks


@dataclass(frozen=True, slots=True)
class LateValidation:
    """Validation samples for an epoch that had already closed: they amend that epoch."""

    run: str
    epoch: int
    validation: ValidationInput


@dataclass(frozen=True, slots=True)
class RunFinished:
    run: str
    last_closed: int | None
    counts: dict[str, int]
    ended: str  # "finished": every rank said goodbye; otherwise why it was finished


@dataclass(frozen=True, slots=True)
class Note:
    """Something about the stream the user should know (``rule``: ``ingest/<what>``): a
    world size that changed, two processes claiming one rank, a message over a limit."""

    run: str
    epoch: int
    rule: str
    message: str


@dataclass(frozen=True, slots=True)
class RunEvicted:
    """A finished run's state is gone (held long enough): its messages start a new run."""

    run: str


@dataclass(frozen=True, slots=True)
class StopDecided:
    """A ``stop_run`` control took effect: the run stops at ``step`` (see ``StopRecord``)."""

    run: str
    epoch: int
    step: int
    rule: str
    seen: int
    steps_per_s: float


Fact = (RunOpened | ConfigSeen | DataChunk | BadStep | EpochClosed | LateValidation
        | RunFinished | Note | RunEvicted | StopDecided)
