"""Gait cycles cut with plain numpy loops: what a test expects the collector to find.

A heel strike is a sample at or above the contact threshold after 3 samples below it,
followed by 3 samples at or above it; a window's first two bound its cycle, resampled at
51 points (0, 2, ..., 100 %).
"""

from __future__ import annotations

import numpy as np


def heel_strikes(grf: np.ndarray, threshold: float) -> list[int]:
    return [i for i in range(3, grf.size - 2)
            if (grf[i - 3:i] < threshold).all() and (grf[i:i + 3] >= threshold).all()]


def cycles(x: np.ndarray, grf: int, threshold: float, lo: float, hi: float
           ) -> tuple[np.ndarray, list[int], list[int]]:
    """Each window's first cycle if ``lo <= length <= hi``: the cycles, their windows and
    lengths."""
    out, rows, lengths = [], [], []
    for i, w in enumerate(x):
        hs = heel_strikes(w[:, grf], threshold)
        if len(hs) >= 2 and lo <= hs[1] - hs[0] <= hi:
            t = np.linspace(hs[0], hs[1], 51)
            out.append(np.stack([np.interp(t, np.arange(w.shape[0]), w[:, c])
                                 for c in range(w.shape[1])], axis=1))
            rows.append(i)
            lengths.append(hs[1] - hs[0])
    return np.array(out), rows, lengths
