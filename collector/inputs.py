"""What the collector's state hands to the statistics and rules stage.

The state (``collector/state.py``) assembles these from decoded messages; the health
stage (``collector/health.py``) turns them into metrics and events. Plain numpy arrays,
no I/O: the same objects come out of a live socket and out of a replayed recording.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Layout of the per-epoch weight summary a rank ships (float64, on-device sums).
WEIGHT_FIELDS = ("count", "sum_abs", "sum", "sum_sq", "max_abs")
# Layout of the per-epoch EMA summary: element count and sum of |w_ema - w|.
EMA_FIELDS = ("count", "sum_abs_diff")


@dataclass
class StepSeries:
    """One rank's steps within one epoch, in arrival order.

    ``loss`` and ``grad_norm`` may hold NaN/Inf (sent by a diverging run); ``grad_norm``
    holds NaN where the client had no norm. ``param_norms`` is ``[n_steps, n_params]``
    float32 (rows of NaN for steps that shipped none) or None when no step shipped any.
    """

    steps: np.ndarray  # int64 [n]
    loss: np.ndarray  # float64 [n]
    grad_norm: np.ndarray  # float64 [n]
    components: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64 [n]
    param_norms: np.ndarray | None = None


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
    missing_ranks: list[int] = field(default_factory=list)
    validation: ValidationInput | None = None


@dataclass
class DataConstants:
    """Per-channel normalisation constants given to ``log_data_stats``: physical = x*std+mean."""

    channel_names: list[str]
    mean: np.ndarray | None  # float64 [C]
    std: np.ndarray | None  # float64 [C]
