"""Gait cycles cut out of windows: heel strike to heel strike, resampled to 0-100 %.

A window (``[T, channels]``, physical units) holds a complete cycle when its vertical
ground reaction force rises through the contact threshold twice: a heel strike is a
sample at or above ``threshold`` after at least ``MIN_PHASE`` samples below it, followed
by at least ``MIN_PHASE`` samples at or above it (so noise around the threshold is not a
step). The window's first two heel strikes bound its cycle, which every channel is
linearly resampled over, at ``CYCLE_POINTS`` points from 0 to 100 % of the cycle::

    thr = contact_threshold(training_grf)              # CONTACT_FRACTION of its p95
    cycles, rows, lengths = cut_cycles(windows, grf_col, thr, (lo, hi))
"""

from __future__ import annotations

import numpy as np

__all__ = ["CONTACT_FRACTION", "CYCLE_POINTS", "CYCLE_SPAN", "MIN_PHASE", "contact_threshold",
           "cut_cycles", "heel_strikes"]

CONTACT_FRACTION = 0.2  # contact: GRF >= this share of the training GRF's 95th percentile
MIN_PHASE = 3  # samples of swing before, and of stance after, a heel strike
CYCLE_POINTS = 51  # 0, 2, ..., 100 % of the cycle
CYCLE_SPAN = (0.5, 2.0)  # a generated cycle's length, in training cycles' median lengths


def contact_threshold(grf: np.ndarray) -> float | None:
    """The contact threshold for these GRF values (None: no finite positive force)."""
    finite = grf[np.isfinite(grf)]
    if finite.size == 0:
        return None
    top = float(np.quantile(finite, 0.95))
    return CONTACT_FRACTION * top if top > 0 else None


def heel_strikes(grf: np.ndarray, threshold: float) -> np.ndarray:
    """The samples of ``grf`` (1-D) that are heel strikes (see the module docstring)."""
    on = np.asarray(grf >= threshold)  # NaN compares False: no contact
    n, k = on.size, MIN_PHASE
    if n < 2 * k:
        return np.zeros(0, np.int64)
    # below[i]: samples i-k..i-1 all off; above[i]: samples i..i+k-1 all on
    off_run = np.convolve(~on, np.ones(k, np.int64), "valid") == k  # starts at j: j..j+k-1
    on_run = np.convolve(on, np.ones(k, np.int64), "valid") == k
    idx = np.arange(k, n - k + 1)
    return idx[off_run[idx - k] & on_run[idx]]


def cut_cycles(windows: np.ndarray, grf_col: int, threshold: float,
               span: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each window's first complete cycle no shorter than ``span[0]`` and no longer than
    ``span[1]`` samples: (cycles ``[k, CYCLE_POINTS, channels]``, the windows they come
    from, their lengths in samples)."""
    at = np.linspace(0.0, 1.0, CYCLE_POINTS)
    cycles, rows, lengths = [], [], []
    for i, w in enumerate(windows):
        hs = heel_strikes(w[:, grf_col], threshold)
        if hs.size < 2:
            continue
        a, b = int(hs[0]), int(hs[1])
        if not span[0] <= b - a <= span[1]:
            continue
        t = a + at * (b - a)
        cycles.append(np.stack([np.interp(t, np.arange(w.shape[0]), w[:, c])
                                for c in range(w.shape[1])], axis=1))
        rows.append(i)
        lengths.append(b - a)
    if not cycles:
        return np.zeros((0, CYCLE_POINTS, windows.shape[-1])), np.zeros(0, np.int64), \
            np.zeros(0, np.int64)
    return np.stack(cycles), np.asarray(rows, np.int64), np.asarray(lengths, np.int64)
