"""Per-channel statistics of a tensor that arrives in chunks: the data baseline, validation.

Chunks are reduced by the ``channel_moments`` kernel (float64 accumulation) and merged with
Chan's formula, so the result does not depend on how the tensor was cut:

    acc = DataStatsAccumulator()
    for chunk in chunks:                      # raw (N, C) or (..., C) arrays
        acc.add(chunk, "bfloat16")            # bfloat16 as its uint16 bit pattern
    acc.metrics(["knee_angle_r", "grf_vz_r"]) # data_stats/normalized_mean, ..._std, ...
"""

from __future__ import annotations

import math

import numpy as np

from collector.analysis.kernels import (
    as_kernel_input,
    channel_moments,
    merge_channel_moments,
    reduce_moments,
)

__all__ = ["ChannelMoments", "DataStatsAccumulator"]


class ChannelMoments:
    """Per-channel (count, mean, M2, min, max, non-finite count) arrays of equal length."""

    __slots__ = ("count", "mean", "m2", "lo", "hi", "bad")

    def __init__(self, count: np.ndarray, mean: np.ndarray, m2: np.ndarray, lo: np.ndarray,
                 hi: np.ndarray, bad: np.ndarray) -> None:
        self.count, self.mean, self.m2, self.lo, self.hi, self.bad = count, mean, m2, lo, hi, bad

    def std(self, c: int) -> float:
        return math.sqrt(self.m2[c] / self.count[c])

    def pooled(self) -> tuple[int, float, float, float, float]:
        """(count, mean, std, min, max) over every channel's finite values; count may be 0."""
        n, mean, m2 = reduce_moments(self.count, self.mean, self.m2)
        if n == 0:
            return 0, math.nan, math.nan, math.nan, math.nan
        return int(n), float(mean), math.sqrt(m2 / n), float(self.lo.min()), float(self.hi.max())


class DataStatsAccumulator:
    """Streams (N, C) chunks of float16/float32/float64/bfloat16 into per-channel moments."""

    def __init__(self) -> None:
        self._m: ChannelMoments | None = None

    def add(self, chunk: np.ndarray, dtype: str) -> None:
        """Adds a chunk; the last axis is the channel axis (a 1-D chunk is one channel)."""
        raw = as_kernel_input(chunk, dtype)
        chans = raw.shape[-1] if raw.ndim > 1 else 1
        if raw.size == 0:
            return
        x = np.ascontiguousarray(raw.reshape(-1, chans))
        m = ChannelMoments(*channel_moments(x))
        if self._m is None:
            self._m = m
            return
        if chans != self._m.count.size:
            raise ValueError(f"chunk has {chans} channels, earlier chunks had "
                             f"{self._m.count.size}")
        old = self._m
        n, mean, m2 = merge_channel_moments(old.count, old.mean, old.m2, m.count, m.mean, m.m2)
        self._m = ChannelMoments(n, mean, m2, np.minimum(old.lo, m.lo), np.maximum(old.hi, m.hi),
                                 old.bad + m.bad)

    @property
    def moments(self) -> ChannelMoments | None:
        return self._m

    def metrics(self, channel_names: list[str]) -> dict[str, float]:
        """The seed's data_stats/* figures; channels beyond the names given are "ch<i>"."""
        m = self._m
        if m is None:
            return {}
        out: dict[str, float] = {}
        n, mean, std, lo, hi = m.pooled()
        if n:
            out.update({"data_stats/normalized_mean": mean, "data_stats/normalized_std": std,
                        "data_stats/normalized_min": lo, "data_stats/normalized_max": hi})
        for c in range(m.count.size):
            if m.count[c] == 0:
                continue
            name = channel_names[c] if c < len(channel_names) else f"ch{c}"
            out[f"data_stats/{name}_mean"] = float(m.mean[c])
            out[f"data_stats/{name}_std"] = m.std(c)
        return out
