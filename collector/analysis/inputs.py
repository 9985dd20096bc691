"""What the collector's state hands to the statistics and rules stage.

The state (``collector.ingest.state``) assembles these from decoded messages; the health
stage (``collector.analysis.health``) turns them into metrics and events. Plain numpy arrays,
no I/O: the same objects come out of a live socket and out of a replayed recording.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trainer_client import wire

# How many closed epochs late validation samples may still amend: the state keeps that
# many epochs' samples to pool a late rank's with, the health that many epochs' rule states.
AMEND_EPOCHS = 8

# How each float dtype of the wire is held raw (numpy has no bfloat16: its bit pattern).
RAW_DTYPES = dict(zip(wire.FLOAT_DTYPES, (np.float16, np.uint16, np.float32, np.float64),
                      strict=True))


def raw_array(t: wire.Tensor) -> np.ndarray:
    """A float tensor off the wire as the raw array the kernels read (no copy)."""
    return np.frombuffer(t.data, RAW_DTYPES[t.dtype]).reshape(t.shape)


@dataclass
class StepSeries:
    """One rank's steps within one epoch, in arrival order.

    ``loss`` and ``grad_norm`` may hold NaN/Inf (sent by a diverging run); ``grad_norm``
    and ``lr`` hold NaN where the client sent none. ``param_norms`` is ``[n_steps, n_params]``
    float32 (rows of NaN for steps that shipped none) or None when no step shipped any.
    """

    steps: np.ndarray  # int64 [n]
    loss: np.ndarray  # float64 [n]
    grad_norm: np.ndarray  # float64 [n]
    components: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64 [n]
    param_norms: np.ndarray | None = None
    lr: np.ndarray | None = None  # float64 [n]: the optimizer's learning rate at each step


@dataclass
class ValidationInput:
    """Generated samples of one validation epoch, pooled over the ranks that sent them.

    Each array is raw: float16/float32/float64, or for bfloat16 the uint16 bit pattern
    (``dtype == "bfloat16"``); the kernels widen. The last axis is the channel axis.
    """

    epoch: int
    dtype: str
    samples: list[np.ndarray]
    channel_names: list[str]


@dataclass
class EpochInput:
    """Everything the ranks of one run sent for one epoch."""

    run: str
    epoch: int
    world_size: int
    steps: dict[int, StepSeries]  # rank -> that rank's steps
    weights: dict[int, np.ndarray]  # rank -> float64[len(WEIGHT_FIELDS)]
    ema: dict[int, np.ndarray]  # rank -> float64[len(EMA_FIELDS)]
    param_names: list[str]
    missing: int = 0  # ranks of the world that did not report the epoch
    validation: ValidationInput | None = None


@dataclass
class DataConstants:
    """Per-channel normalisation constants given to ``log_data_stats``: physical = x*std+mean."""

    channel_names: list[str]
    mean: np.ndarray | None  # float64 [C]
    std: np.ndarray | None  # float64 [C]
