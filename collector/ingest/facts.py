"""What the state found in an admitted message: typed facts for the pipeline to act on.

The state only keeps runs, ranks and open epochs; it returns these, and the pipeline turns
each into analysis calls and records, in order. Plain data, no behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from collector.analysis.inputs import DataConstants, EpochInput, ValidationInput

__all__ = ["BadStep", "ConfigSeen", "DataChunk", "EpochClosed", "Fact", "LateValidation",
           "RunFinished", "RunOpened"]


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
    ranks: tuple[int, ...]
    missing: tuple[int, ...]


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


Fact = (RunOpened | ConfigSeen | DataChunk | BadStep | EpochClosed | LateValidation
        | RunFinished)
