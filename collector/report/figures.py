"""What every report figure shares: series from the epochs, whole-epoch axes, legends below.

Legends sit under the plot area, below the x axis's tick labels and title, in a bottom
margin sized for them, so they never cover an axis label; epoch axes tick whole epochs
only. A figure becomes an HTML ``<div>`` (plotly escapes its data); plotly.js is embedded
once by the page.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

__all__ = ["BAD", "GOOD", "LINE", "PALETTE", "THRESHOLD", "Epochs", "empty_note", "epoch_axis",
           "flag_bars", "line", "number", "series", "text", "threshold_line", "to_html"]

Epochs = dict[int, dict[str, Any]]  # epoch -> that epoch's metrics

GOOD, BAD, LINE, THRESHOLD = "#1b7f3b", "#b3261e", "#2563eb", "#b3261e"
PALETTE = ("#d97706", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d",
           "#9333ea", "#ea580c", "#0d9488", "#4f46e5", "#be123c")  # one per channel
_CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": "hover",
           "modeBarButtonsToRemove": ["select2d", "lasso2d"]}
AXIS_PX = 58  # tick labels and the axis title under the plot area
LEGEND_ROW_PX = 21
LEGEND_WIDTH_PX = 440  # legend room in the narrowest card (the grid: 560px columns)
NICE_STEPS = (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000)


def number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN and Inf leave a gap in the line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def text(value: Any) -> str:
    """Text from a record as plotly shows it: plotly reads a subset of HTML in labels."""
    return html.escape(str(value), quote=False)


def series(epochs: Epochs, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for epoch in sorted(epochs):
        if key in epochs[epoch]:
            y = number(epochs[epoch][key])
            if y is not None:
                xs.append(epoch)
                ys.append(float(f"{y:.6g}"))  # plenty for a plot; halves the page's data
    return xs, ys


def epoch_axis(fig: go.Figure, lo: int, hi: int, **where: Any) -> None:
    """Whole-epoch ticks over ``lo..hi``: about eight of them, at a round step."""
    span = max(1, hi - lo)
    step = next((s for s in NICE_STEPS if span / s <= 8), NICE_STEPS[-1])
    fig.update_xaxes(tickmode="linear", tick0=0, dtick=step, tickformat="d", **where)


def _legend_rows(names: Iterable[str]) -> int:
    """How many rows a horizontal legend of ``names`` takes at the narrowest width."""
    rows, used = 1, 0.0
    for name in names:
        width = 44 + 6.6 * len(name)  # the symbol, the gap and the text at 12px
        if used and used + width > LEGEND_WIDTH_PX:
            rows, used = rows + 1, 0.0
        used += width
    return rows


def to_html(fig: go.Figure, div_id: str, height: int, hovermode: str = "x unified") -> str:
    """The figure as a ``<div>``: ``height`` px of plot area, legend and axes below it."""
    names = [t.name for t in fig.data if t.name and t.showlegend is not False]
    legend_px = LEGEND_ROW_PX * _legend_rows(names) + 8 if names else 0
    bottom = AXIS_PX + legend_px
    fig.update_layout(
        template="plotly_white", height=height + 60 + bottom, showlegend=bool(names),
        margin={"l": 64, "r": 20, "t": 60, "b": bottom},
        # in the container's own coordinates: the band under the axis title, never on it
        legend={"orientation": "h", "yref": "container", "y": 0, "yanchor": "bottom",
                "x": 0, "xanchor": "left", "font": {"size": 12}},
        hovermode=hovermode, font={"size": 12})
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id,
                       config=_CONFIG)


def empty_note(fig: go.Figure, row: int, note: str) -> None:
    xref = "x domain" if row == 1 else f"x{row} domain"
    yref = "y domain" if row == 1 else f"y{row} domain"
    fig.add_annotation(text=text(note), xref=xref, yref=yref, x=0.5, y=0.5, showarrow=False,
                       font={"color": "#64748b"})


def line(fig: go.Figure, row: int, epochs: Epochs, key: str, name: str | None = None,
         markers: bool = False, color: str = LINE, **trace: Any) -> bool:
    """``key`` over the epochs in subplot ``row``; a note in its place when never reported."""
    xs, ys = series(epochs, key)
    if not xs:
        empty_note(fig, row, f"{key} not reported")
        return False
    fig.add_trace(go.Scatter(x=xs, y=ys, name=text(name or key), line={"color": color},
                             mode="lines+markers" if markers or len(xs) < 3 else "lines",
                             hovertemplate=f"{text(key)}=%{{y}}<extra></extra>", **trace),
                  row=row, col=1)
    return True


def flag_bars(fig: go.Figure, row: int, epochs: Epochs, keys: Sequence[str]) -> bool:
    """0/1 flags as bars: green where the flag is 1, red where it is 0."""
    drawn = False
    for i, key in enumerate(keys):
        xs, ys = series(epochs, key)
        if not xs:
            continue
        drawn = True
        colors = [GOOD if y >= 0.5 else BAD for y in ys]
        # A zero flag still gets a visible stub, so "0" reads as red, not as missing.
        heights = [1.0 if y >= 0.5 else 0.15 for y in ys]
        fig.add_trace(go.Bar(x=xs, y=heights, name=key, marker={"color": colors},
                             customdata=ys, hovertemplate=f"{key}=%{{customdata}}<extra></extra>",
                             opacity=1.0 - 0.35 * i), row=row, col=1)
    if not drawn:
        empty_note(fig, row, " / ".join(keys) + " not reported")
    fig.update_yaxes(range=[0, 1.05], tickvals=[0, 1], row=row, col=1)
    return drawn


def threshold_line(fig: go.Figure, row: int, epochs: Epochs, value: float, name: str) -> None:
    """A threshold as a dashed line across the run's epochs (wandb's constant series)."""
    lo, hi = min(epochs), max(epochs)
    fig.add_trace(go.Scatter(x=[lo, hi if hi > lo else lo + 1], y=[value, value], mode="lines",
                             name=text(name),
                             line={"color": THRESHOLD, "dash": "dash", "width": 1.5}),
                  row=row, col=1)
