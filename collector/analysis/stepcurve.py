"""A run's per-step curve of loss and gradient norm, bounded whatever the run's length.

Built once per closed epoch from the steps the epoch already hands over (no per-step work
at ingest). Steps fall into fixed-width buckets, ``step // width``, ``width`` a power of
two starting at 1; when the buckets would exceed ``max_buckets`` the width doubles and
neighbours merge (counts and sums add, minima and maxima combine), so a spike stays
visible in its bucket's maximum and memory stays bounded. Pure and deterministic: the
same epochs give the same points, live and in replay::

    curve = StepCurve(max_buckets=1024)
    points = curve.add_epoch(epoch_input)      # the points that became final
    points += curve.finish()                   # the run ended: its last, partial bucket

A bucket is final once a later step has been seen (or its last step was); the one holding
the latest step waits, so each step's values are in exactly one point. Points are never
rewritten: a point's ``width`` is the width when it was handed out, and it lies inside one
bucket of every later width, so re-bucketing all points at ``width``
(``StepPoint.step // width``) rebuilds exactly the curve this holds. A run's points add
up to at most ``max_buckets * (1 + doublings / 2) + doublings`` (1024 buckets: about 5.6k
points for 10^6 steps).

Losses are pooled over ranks (each rank's loss is a value); a gradient norm counts once per
step, from the lowest rank that sent one (under DDP they are identical), as the epoch
statistics do. NaN in a step's gradient norm means none was sent. An epoch whose steps
start at or before the previous epoch's first step (a loop whose counter restarts each
epoch) is placed after the curve's end, in its own order.
"""

from __future__ import annotations

import math

import numpy as np

from collector.analysis.inputs import EpochInput
from collector.records import StepPoint

__all__ = ["MAX_BUCKETS", "StepCurve"]

MAX_BUCKETS = 1024  # buckets a run's curve keeps: the points a view draws at most
_STEP_LIMIT = 2**62

# accumulator columns
_N, _SUM, _MIN, _MAX, _GN, _GSUM, _GMIN, _GMAX, _BAD, _FIRST = range(10)
_WIDTH = 10
_ADD = (_N, _SUM, _GN, _GSUM, _BAD)
_LOW = (_MIN, _GMIN, _FIRST)
_HIGH = (_MAX, _GMAX)


def _rows(steps: np.ndarray, values: np.ndarray, grad: bool) -> np.ndarray:
    """One accumulator row per value (a loss, or a gradient norm)."""
    ok = np.isfinite(values)
    acc = np.zeros((steps.size, _WIDTH))
    acc[:, [_MIN, _GMIN, _FIRST]] = math.inf
    acc[:, [_MAX, _GMAX]] = -math.inf
    n, s, lo, hi = (_GN, _GSUM, _GMIN, _GMAX) if grad else (_N, _SUM, _MIN, _MAX)
    acc[:, n] = ok
    acc[:, s] = np.where(ok, values, 0.0)
    acc[:, lo] = np.where(ok, values, math.inf)
    acc[:, hi] = np.where(ok, values, -math.inf)
    acc[:, _BAD] = ~ok
    acc[:, _FIRST] = steps
    return acc


def _group(idx: np.ndarray, acc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with the same bucket index combined, in index order."""
    if idx.size == 0:
        return idx, acc
    order = np.argsort(idx, kind="stable")
    idx, acc = idx[order], acc[order]
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    out = np.empty((starts.size, _WIDTH))
    out[:, _ADD] = np.add.reduceat(acc[:, _ADD], starts, axis=0)
    out[:, _LOW] = np.minimum.reduceat(acc[:, _LOW], starts, axis=0)
    out[:, _HIGH] = np.maximum.reduceat(acc[:, _HIGH], starts, axis=0)
    return idx[starts], out


def _point(row: np.ndarray, width: int) -> StepPoint:
    def mean(n: int, s: int) -> float | None:
        return float(row[s] / row[n]) if row[n] else None

    def bound(n: int, k: int) -> float | None:
        return float(row[k]) if row[n] else None

    return StepPoint(int(row[_FIRST]), width, int(row[_N]), mean(_N, _SUM), bound(_N, _MIN),
                     bound(_N, _MAX), int(row[_GN]), mean(_GN, _GSUM), bound(_GN, _GMIN),
                     bound(_GN, _GMAX), int(row[_BAD]))


def epoch_values(inp: EpochInput) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(loss steps, losses, norm steps, norms) of one epoch: every rank's losses, and each
    step's gradient norm once (the lowest rank that sent one)."""
    ranks = [inp.steps[r] for r in sorted(inp.steps) if inp.steps[r].steps.size]
    if not ranks:
        empty = np.zeros(0)
        return empty.astype(np.int64), empty, empty.astype(np.int64), empty
    loss_steps = np.concatenate([s.steps for s in ranks]).astype(np.int64)
    losses = np.concatenate([np.asarray(s.loss, np.float64) for s in ranks])
    g_steps = np.concatenate([s.steps[~np.isnan(s.grad_norm)] for s in ranks]).astype(np.int64)
    g_vals = np.concatenate([np.asarray(s.grad_norm[~np.isnan(s.grad_norm)], np.float64)
                             for s in ranks])
    g_steps, first = np.unique(g_steps, return_index=True)  # first: the lowest rank's
    return loss_steps, losses, g_steps, g_vals[first]


class StepCurve:
    """One run's per-step curve; see the module docstring."""

    def __init__(self, max_buckets: int = MAX_BUCKETS) -> None:
        if max_buckets < 2:
            raise ValueError("max_buckets must be >= 2")
        self.max_buckets = max_buckets
        self.width = 1
        self.idx = np.zeros(0, np.int64)  # the kept buckets, ascending
        self.acc = np.zeros((0, _WIDTH))
        self._pending: np.ndarray | None = None  # values of the latest bucket, not yet out
        self._first: int | None = None  # the previous epoch's first step (as placed)
        self._last: int | None = None  # the latest step seen (as placed)
        self.emitted = 0  # points handed out so far

    def add_epoch(self, inp: EpochInput) -> list[StepPoint]:
        """The epoch's steps into the curve; returns the points that became final."""
        steps, losses, g_steps, g_vals = epoch_values(inp)
        if steps.size == 0 and g_steps.size == 0:
            return []
        every = np.concatenate([steps, g_steps])
        lo, hi = int(every.min()), int(every.max())
        if self._first is not None and self._last is not None and lo <= self._first:
            shift = self._last + 1 - lo  # a counter that restarted: after the curve's end
            if hi + shift < _STEP_LIMIT:  # (step numbers near int64's end stay as sent)
                steps, g_steps, hi, lo = steps + shift, g_steps + shift, hi + shift, lo + shift
        self._first = lo
        self._last = hi if self._last is None else max(self._last, hi)
        new = np.concatenate([_rows(steps, losses, False), _rows(g_steps, g_vals, True)])
        new_steps = np.concatenate([steps, g_steps])
        self._fit(new_steps)
        idx, acc = _group(new_steps // self.width, new)
        self.idx, self.acc = _group(np.r_[self.idx, idx], np.concatenate([self.acc, acc]))
        if self._pending is not None:  # the latest bucket so far: its values join the new
            idx = np.r_[int(self._pending[_FIRST]) // self.width, idx]
            acc = np.concatenate([self._pending[None], acc])
            idx, acc = _group(idx, acc)
            self._pending = None
        latest = self._last // self.width
        if (self._last + 1) % self.width and idx.size and idx[-1] == latest:
            self._pending, idx, acc = acc[-1], idx[:-1], acc[:-1]  # more steps may join it
        return self._out(acc)

    def finish(self) -> list[StepPoint]:
        """The run ended: the latest bucket's values, if any are still held."""
        if self._pending is None:
            return []
        acc, self._pending = self._pending[None], None
        return self._out(acc)

    def _out(self, acc: np.ndarray) -> list[StepPoint]:
        self.emitted += len(acc)
        return [_point(row, self.width) for row in acc]

    def _fit(self, new_steps: np.ndarray) -> None:
        """Doubles the width (merging neighbours) until the kept and the new buckets fit."""
        while np.union1d(self.idx, new_steps // self.width).size > self.max_buckets:
            self.width *= 2
            self.idx, self.acc = _group(self.idx // 2, self.acc)

    def points(self) -> list[StepPoint]:
        """The kept curve, one point per bucket of the current width (what views draw)."""
        return [_point(row, self.width) for row in self.acc]
