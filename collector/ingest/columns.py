"""One rank's open epoch, column by column: what its steps add until the epoch closes."""

from __future__ import annotations

import numpy as np

from collector.analysis.inputs import StepSeries
from collector.ingest.stepscan import AT, COUNT, Groups, Steps, gather_pnorms
from trainer_client import wire

__all__ = ["StepColumns"]

_NAN = float("nan")


class StepColumns:
    """One rank's open epoch, column by column.

    Rows from the bulk path arrive as numpy blocks; rows from the per-message path wait
    in lists and are sealed into a block before the next bulk append, so blocks stay in
    row order. Floats, ints and arrays are not tracked by Python's cycle collector, so a
    long epoch costs no garbage-collection time; a tuple or list per step would
    (quadratically).
    """

    __slots__ = ("step", "loss", "grad_norm", "lr", "comp_values", "blocks", "sealed",
                 "comp_segments", "pnorms", "pn_blocks")

    def __init__(self) -> None:
        self.step: list[int] = []
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.lr: list[float] = []
        self.comp_values: list[float] = []  # flat, row by row
        self.blocks: list[tuple[np.ndarray, ...]] = []  # (step, loss, grad_norm, lr, comps)
        self.sealed = 0  # rows in blocks
        self.comp_segments: list = []  # [first_row, names] each time the names change
        self.pnorms: dict[int, bytes] = {}  # row -> float32 bytes
        self.pn_blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, float32 matrix)

    def add(self, msg: wire.Message) -> None:
        loss, gn, names, values, lr = msg.body
        row = self.sealed + len(self.loss)
        self.step.append(msg.step)
        self.loss.append(loss)
        self.grad_norm.append(_NAN if gn is None else gn)
        self.lr.append(_NAN if lr is None else lr)
        segs = self.comp_segments
        if not segs or names != segs[-1][1]:
            segs.append([row, names])
        self.comp_values.extend(values)
        pn = msg.tensors.get("param_norms") if msg.tensors else None
        if pn is not None:
            self.pnorms[row] = bytes(pn.data)

    def _seal(self) -> None:
        if self.loss:
            self.blocks.append((np.asarray(self.step, np.int64), np.asarray(self.loss, np.float64),
                                np.asarray(self.grad_norm, np.float64),
                                np.asarray(self.lr, np.float64),
                                np.asarray(self.comp_values, np.float64)))
            self.sealed += len(self.loss)
            self.step, self.loss, self.grad_norm, self.lr, self.comp_values = [], [], [], [], []

    def extend(self, g: Groups, j: int, seg_names: list[list[str]], s: Steps,
               buf: np.ndarray) -> None:
        """Append stream ``j`` of a regrouped stretch of fast steps (``stepscan``) at once;
        the same result as ``add`` on each. ``seg_names``: the names at each of its
        ``changes``."""
        self._seal()
        row0 = self.sealed
        lo, hi = g.bounds[j], g.bounds[j + 1]
        self.blocks.append((g.step[lo:hi].copy(), g.loss[lo:hi].copy(),
                            g.grad_norm[lo:hi].copy(), g.lr[lo:hi].copy(),
                            g.comps[g.comp_bounds[j]:g.comp_bounds[j + 1]].copy()))
        self.sealed += hi - lo
        segs = self.comp_segments
        starts = g.changes[g.change_bounds[j]:g.change_bounds[j + 1]].tolist()
        for p, nm in zip(starts, seg_names, strict=True):
            if not segs or nm != segs[-1][1]:
                segs.append([row0 + p - lo, nm])
        if not g.pn_rows[j]:
            return
        rows = g.rows[lo:hi]
        width = s.pn_at[rows, COUNT]
        has = np.flatnonzero(width >= 0)  # not empty: pn_rows[j] > 0
        if (width[has] == width[has[0]]).all():
            self.pn_blocks.append((row0 + has, gather_pnorms(buf, s.pn_at, rows[has],
                                                             int(width[has[0]]))))
            return
        for k in has.tolist():  # mixed widths in one batch: rare, row by row
            o = int(s.pn_at[rows[k], AT])
            self.pnorms[row0 + k] = buf[o:o + 4 * int(width[k])].tobytes()

    def rows(self) -> int:
        return self.sealed + len(self.loss)

    def series(self) -> StepSeries:
        self._seal()
        n = self.sealed
        cols = [np.concatenate([b[k] for b in self.blocks]) if self.blocks
                else np.empty(0, np.int64 if k == 0 else np.float64) for k in range(5)]
        comps: dict[str, np.ndarray] = {}
        flat = cols[4]
        # one bound per segment; an epoch with no steps has no segment
        bounds = [seg[0] for seg in self.comp_segments[1:]] + [n] if self.comp_segments else []
        off = 0
        for (start, names), stop in zip(self.comp_segments, bounds, strict=True):
            k = len(names)
            block = flat[off:off + (stop - start) * k].reshape(stop - start, k)
            off += (stop - start) * k
            for j, name in enumerate(names):
                arr = comps.get(name)
                if arr is None:
                    arr = comps[name] = np.full(n, np.nan)
                arr[start:stop] = block[:, j]
        pn = None
        widths = {len(b) // 4 for b in self.pnorms.values()}
        widths.update(m.shape[1] for _, m in self.pn_blocks)
        if len(widths) == 1:
            pn = np.full((n, widths.pop()), np.nan, dtype=np.float32)
            for row, b in self.pnorms.items():
                pn[row] = np.frombuffer(b, np.float32)
            for rows, m in self.pn_blocks:
                pn[rows] = m
        return StepSeries(cols[0], cols[1], cols[2], comps, pn, lr=cols[3])
