"""The report's per-step curve: loss and gradient norm over the trainer's steps.

Rebuilt from a run's "steps" records alone: every point re-bucketed at the width of the
run's latest record (``step // width``; see ``collector.analysis.stepcurve``), which gives
exactly the curve the collector kept, then drawn as the bucket means with a min-max band,
so a one-step spike shows as the band's top::

    curve = step_curve(records_of_one_run)      # None without steps records
    html = step_figure(curve, "run-1-steps")
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from collector.report import figures as fg

__all__ = ["StepCurve", "step_curve", "step_figure"]

_COLUMNS = ("step", "n", "loss", "loss_min", "loss_max", "grad_n", "grad_norm",
            "grad_norm_min", "grad_norm_max", "nonfinite")
BAND_FILL = "rgba(37,99,235,0.18)"


@dataclass
class StepCurve:
    """One run's curve, a bucket a row; NaN where a bucket had no finite value."""

    width: int
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.columns["step"].size)


def _floats(values: list[Any]) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values], np.float64)


def step_curve(records: Iterable[dict[str, Any]]) -> StepCurve | None:
    """The curve of one run's records (other types are skipped)."""
    parts, width = [], 1
    for r in records:
        if r.get("type") != "steps" or not isinstance(r.get("points"), dict):
            continue
        width = max(width, int(r.get("width") or 1))
        parts.append(r["points"])
    if not parts:
        return None
    cols = {k: np.concatenate([_floats(p.get(k, [])) for p in parts]) for k in _COLUMNS}
    if cols["step"].size == 0:
        return None
    cols["loss_sum"] = np.nan_to_num(cols["loss"]) * cols["n"]
    cols["grad_sum"] = np.nan_to_num(cols["grad_norm"]) * cols["grad_n"]
    bucket = np.floor_divide(cols["step"], width)
    uniq, inv = np.unique(bucket, return_inverse=True)
    out: dict[str, np.ndarray] = {}
    for key in ("n", "grad_n", "nonfinite", "loss_sum", "grad_sum"):
        out[key] = np.bincount(inv, cols[key], uniq.size)
    for key, fn, fill in (("step", np.minimum, math.inf), ("loss_min", np.minimum, math.inf),
                          ("grad_norm_min", np.minimum, math.inf),
                          ("loss_max", np.maximum, -math.inf),
                          ("grad_norm_max", np.maximum, -math.inf)):
        acc = np.full(uniq.size, fill)
        fn.at(acc, inv, np.where(np.isnan(cols[key]), fill, cols[key]))
        out[key] = np.where(np.isfinite(acc), acc, math.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        out["loss"] = np.where(out["n"] > 0, out["loss_sum"] / out["n"], math.nan)
        out["grad_norm"] = np.where(out["grad_n"] > 0, out["grad_sum"] / out["grad_n"],
                                    math.nan)
    return StepCurve(width, out)


def _band(fig: go.Figure, row: int, x: list, mean: np.ndarray, lo: np.ndarray,
          hi: np.ndarray, name: str, color: str) -> bool:
    if not np.isfinite(mean).any():
        fg.empty_note(fig, row, f"{name}: no finite value")
        return False

    def plain(a: np.ndarray) -> list:
        return [float(f"{v:.6g}") if math.isfinite(v) else None for v in a.tolist()]

    fig.add_trace(go.Scatter(x=x, y=plain(hi), mode="lines", line={"width": 0},
                             name=f"{name}: max", hoverinfo="skip", showlegend=False),
                  row=row, col=1)
    fig.add_trace(go.Scatter(x=x, y=plain(lo), mode="lines", line={"width": 0},
                             fill="tonexty", fillcolor=BAND_FILL, name=f"{name}: min–max",
                             hoverinfo="skip"), row=row, col=1)
    fig.add_trace(go.Scatter(x=x, y=plain(mean), mode="lines", line={"color": color},
                             name=f"{name}: mean", customdata=np.c_[plain(lo), plain(hi)],
                             hovertemplate=f"{name} %{{y}} (min %{{customdata[0]}}, max "
                                           "%{customdata[1]})<extra>step %{x}</extra>"),
                  row=row, col=1)
    lo_f, hi_f = lo[np.isfinite(lo)], hi[np.isfinite(hi)]
    if lo_f.size and hi_f.size and lo_f.min() > 0 and hi_f.max() >= 10 * lo_f.min():
        fig.update_yaxes(type="log", dtick="D2", row=row, col=1)  # a spike far above
    return True


def step_figure(curve: StepCurve | None, div_id: str) -> str | None:
    """The curve as a ``<div>``, or None when there is none."""
    if curve is None or len(curve) == 0:
        return None
    c = curve.columns
    bad = int(c["nonfinite"].sum())
    note = f"; {bad} non-finite value(s)" if bad else ""
    per = "step" if curve.width == 1 else f"{curve.width} steps"
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=(f"loss per {per} (every rank's){note}",
                                        f"gradient norm per {per}"))
    x = [int(s) for s in c["step"]]
    drawn = _band(fig, 1, x, c["loss"], c["loss_min"], c["loss_max"], "loss", fg.LINE)
    drawn |= _band(fig, 2, x, c["grad_norm"], c["grad_norm_min"], c["grad_norm_max"],
                   "grad norm", "#059669")
    if not drawn:
        return None
    fig.update_xaxes(tickformat="d")
    fig.update_xaxes(title_text="trainer step", row=2, col=1)
    return fg.to_html(fig, div_id, 420)
