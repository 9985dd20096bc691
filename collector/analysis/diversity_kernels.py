"""The numba kernels of the sample figures (``diversity``): widening, across-sample std,
pair distances, a radix sort and the 1-D Wasserstein-1 distance. Pure functions over numpy
arrays, each held equal to a numpy reference in tests/test_diversity.py."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from collector.analysis.kernels import widen

__all__ = ["across_sample_std", "pair_rms_distances", "sorted_finite", "wasserstein1_sorted",
           "widen_1d"]


@njit(cache=True)
def widen_1d(x):
    """Raw values (float32/float64, or float16/bfloat16 bit patterns) as float64."""
    out = np.empty(x.shape[0], np.float64)
    for i in range(np.uint64(x.shape[0])):
        out[i] = widen(x[i])
    return out


@njit(cache=True)
def across_sample_std(x):
    """Per channel of a float64 (N, T, C) array: (mean over t of the std over n, cells).

    The std (ddof=1) of each (t, c) cell is over its finite values, two passes over the
    (small) array; cells with fewer than two finite values are skipped, and ``cells[c]``
    counts those used (the figure is NaN where it is 0).
    """
    n_samples, steps, chans = x.shape
    flat = x.reshape(n_samples, steps * chans)
    width = np.uint64(steps * chans)
    cnt = np.zeros(steps * chans, np.int64)
    total = np.zeros(steps * chans, np.float64)
    for n in range(n_samples):
        row = flat[n]
        for k in range(width):
            v = row[k]
            ok = v - v == 0.0  # False for NaN and +-Inf
            cnt[k] += ok
            total[k] += v if ok else 0.0
    mean = total / np.maximum(cnt, 1)
    m2 = np.zeros(steps * chans, np.float64)
    for n in range(n_samples):
        row = flat[n]
        for k in range(width):
            d = row[k] - mean[k]
            m2[k] += d * d if d - d == 0.0 else 0.0
    std_sum = np.zeros(chans, np.float64)
    cells = np.zeros(chans, np.int64)
    for t in range(steps):
        for c in range(chans):
            k = t * chans + c
            if cnt[k] >= 2:
                std_sum[c] += math.sqrt(m2[k] / (cnt[k] - 1))
                cells[c] += 1
    out = np.full(chans, np.nan)
    for c in range(chans):
        if cells[c]:
            out[c] = std_sum[c] / cells[c]
    return out, cells


@njit(cache=True, fastmath={"reassoc"})
def _sq_dist(a, b):
    """sum((a - b)^2); reassoc only (vector lanes), so a NaN/Inf still makes it non-finite."""
    acc = 0.0
    for k in range(np.uint64(a.shape[0])):
        d = a[k] - b[k]
        acc += d * d
    return acc


@njit(cache=True)
def pair_rms_distances(x, inv_scale, max_pairs):
    """RMS distances of pairs of rows of a float64 (N, T, C) array, channels scaled.

    Distance of (i, j): sqrt(mean over (t, c) of ((x_i - x_j) * inv_scale[c])^2), NaN when
    either holds a non-finite value (or the sum overflows). All N(N-1)/2 pairs i < j in
    order when there are at most ``max_pairs``, else ``max_pairs`` evenly spaced over it.
    """
    n_samples, steps, chans = x.shape
    width = steps * chans
    y = np.empty((n_samples, width), np.float64)  # scaled once: the pair loop is a plain diff
    for n in range(n_samples):
        for t in range(steps):
            for c in range(chans):
                y[n, t * chans + c] = x[n, t, c] * inv_scale[c]
    total = n_samples * (n_samples - 1) // 2
    count = min(total, max_pairs)
    out = np.empty(count, np.float64)
    i = 0
    row_start = 0  # linear index of the pair (i, i + 1)
    for k in range(count):
        p = (k * total) // count
        while p >= row_start + (n_samples - 1 - i):
            row_start += n_samples - 1 - i
            i += 1
        j = i + 1 + (p - row_start)
        acc = _sq_dist(y[i], y[j])
        out[k] = math.sqrt(acc / width) if acc - acc == 0.0 else np.nan
    return out


_DIGIT_BITS = 11  # radix-sort digit: 2048 counters stay in L1; 6 passes cover 64 bits
_SIGN = np.uint64(1 << 63)


@njit(cache=True)
def sorted_finite(values):
    """The finite values of a float64 array, sorted (LSD radix sort on order-preserving keys).

    A pass whose digit is the same for every value is skipped: values widened from
    float32/16 have all-zero low mantissa bits, so they take about four passes.
    """
    n = 0
    for v in values:
        n += v - v == 0.0
    keys = np.empty(n, np.uint64)
    bits = values.view(np.uint64)
    k = 0
    for i in range(values.shape[0]):
        v = values[i]
        if v - v == 0.0:  # negatives: all bits flipped; positives: the sign bit set
            b = bits[i]
            keys[k] = ~b if b & _SIGN else b | _SIGN
            k += 1
    digits = (64 + _DIGIT_BITS - 1) // _DIGIT_BITS
    radix = 1 << _DIGIT_BITS
    mask = np.uint64(radix - 1)
    counts = np.zeros((digits, radix + 1), np.int64)
    for key in keys:
        for d in range(digits):
            counts[d, ((key >> np.uint64(d * _DIGIT_BITS)) & mask) + 1] += 1
    tmp = np.empty_like(keys)
    for d in range(digits):
        row = counts[d]
        if row.max() == n:
            continue  # one digit value for all: the order is already right
        for r in range(radix):
            row[r + 1] += row[r]
        shift = np.uint64(d * _DIGIT_BITS)
        for key in keys:
            slot = (key >> shift) & mask
            tmp[row[slot]] = key
            row[slot] += 1
        keys, tmp = tmp, keys
    out = np.empty(n, np.uint64)
    for i in range(n):
        b = keys[i]
        out[i] = b & ~_SIGN if b & _SIGN else ~b
    return out.view(np.float64)


@njit(cache=True)
def wasserstein1_sorted(a, b):
    """Exact W1 between the empirical distributions of two sorted finite arrays (NaN if
    either is empty): the integral over u in (0, 1) of |Q_a(u) - Q_b(u)|, walked over the
    quantile breakpoints k/n and l/m in integer arithmetic. Which side steps next depends
    on n and m only, not on the values, so the loop has no unpredictable branch."""
    n, m = a.shape[0], b.shape[0]
    if n == 0 or m == 0:
        return np.nan
    i = j = 0
    prev = 0
    total = 0.0
    while i < n and j < m:  # breakpoints scaled by n * m: (i + 1) / n -> (i + 1) * m
        next_a = (i + 1) * m
        next_b = (j + 1) * n
        nxt = min(next_a, next_b)
        total += abs(a[i] - b[j]) * (nxt - prev)
        prev = nxt
        i += next_a == nxt
        j += next_b == nxt
    return total / (n * m)
