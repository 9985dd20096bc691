"""The health report's plots: the seed's four dashboard panels and the events timeline.

Each builder takes one run's per-epoch metrics and returns an HTML fragment (a plotly
``<div>`` whose data plotly escapes) or ``None`` when the panel has nothing to show, so the
page can say so instead. plotly.js itself is embedded once by the page, not here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from collector.analysis.profile import Profile

__all__ = ["PANEL_TITLES", "events_timeline", "panel_figure"]

Epochs = dict[int, dict[str, Any]]  # epoch -> that epoch's metrics

PANEL_TITLES = ("Training health", "Validation quality", "Mode-collapse detection",
                "Loss components")
SEVERITY_COLORS = {"critical": "#b3261e", "error": "#b3261e", "warning": "#d97706",
                   "warn": "#d97706", "info": "#64748b"}
GOOD, BAD, LINE, THRESHOLD = "#1b7f3b", "#b3261e", "#2563eb", "#b3261e"
_CONFIG = {"displaylogo": False, "responsive": True,
           "modeBarButtonsToRemove": ["select2d", "lasso2d"]}


def _number(value: Any) -> float | None:
    """A finite float, or None (missing, NaN and Inf leave a gap in the line)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _text(value: Any) -> str:
    """Text from a record as plotly shows it: plotly reads a subset of HTML in labels."""
    return html.escape(str(value), quote=False)


def _series(epochs: Epochs, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for epoch in sorted(epochs):
        if key in epochs[epoch]:
            y = _number(epochs[epoch][key])
            if y is not None:
                xs.append(epoch)
                ys.append(float(f"{y:.6g}"))  # plenty for a plot; halves the page's data
    return xs, ys


def _html(fig: go.Figure, div_id: str) -> str:
    fig.update_layout(template="plotly_white", margin={"l": 60, "r": 20, "t": 40, "b": 40},
                      legend={"orientation": "h", "y": -0.08, "x": 0},
                      hovermode="x unified", font={"size": 12})
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id,
                       config=_CONFIG)


def _empty_note(fig: go.Figure, row: int, text: str) -> None:
    xref = "x domain" if row == 1 else f"x{row} domain"
    yref = "y domain" if row == 1 else f"y{row} domain"
    fig.add_annotation(text=text, xref=xref, yref=yref, x=0.5, y=0.5, showarrow=False,
                       font={"color": "#64748b"})


def _line(fig: go.Figure, row: int, epochs: Epochs, key: str, name: str | None = None,
          markers: bool = False) -> bool:
    xs, ys = _series(epochs, key)
    if not xs:
        _empty_note(fig, row, f"no {key} yet")
        return False
    fig.add_trace(go.Scatter(x=xs, y=ys, name=name or key, line={"color": LINE},
                             mode="lines+markers" if markers or len(xs) < 3 else "lines"),
                  row=row, col=1)
    return True


def _flag_bars(fig: go.Figure, row: int, epochs: Epochs, keys: Sequence[str]) -> bool:
    """0/1 flags as bars: green where the flag is 1, red where it is 0."""
    drawn = False
    for i, key in enumerate(keys):
        xs, ys = _series(epochs, key)
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
        _empty_note(fig, row, "no " + " / ".join(keys) + " yet")
    fig.update_yaxes(range=[0, 1.05], tickvals=[0, 1], row=row, col=1)
    return drawn


def _threshold(fig: go.Figure, row: int, epochs: Epochs, profile: Profile, key: str,
               label: str) -> None:
    """The profile's threshold as a dashed line across the run's epochs (wandb's constant)."""
    if key not in profile.thresholds:
        return
    lo, hi = min(epochs), max(epochs)
    value = profile.thresholds[key]
    fig.add_trace(go.Scatter(x=[lo, hi if hi > lo else lo + 1], y=[value, value], mode="lines",
                             name=f"{key} = {value:g} {label}",
                             line={"color": THRESHOLD, "dash": "dash", "width": 1.5}),
                  row=row, col=1)


def _panel_training(epochs: Epochs, profile: Profile) -> tuple[go.Figure, bool]:
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("train/total_loss", "train/grad_norm_mean",
                                        "train/is_improving"))
    drawn = _line(fig, 1, epochs, "train/total_loss")
    drawn |= _line(fig, 2, epochs, "train/grad_norm_mean")
    _, grads = _series(epochs, "train/grad_norm_mean")
    if grads and min(grads) > 0:  # exploding and vanishing differ by orders of magnitude
        fig.update_yaxes(type="log", row=2, col=1)
    drawn |= _flag_bars(fig, 3, epochs, ["train/is_improving"])
    return fig, drawn


def _panel_validation(epochs: Epochs, profile: Profile) -> tuple[go.Figure, bool]:
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("validation/knee_r_std (rad)",
                                        "validation/grf_vz_r_std (N)",
                                        "validation/knee_healthy, validation/grf_healthy"))
    drawn = _line(fig, 1, epochs, "validation/knee_r_std", markers=True)
    _threshold(fig, 1, epochs, profile, "threshold/knee_r_std", "rad")
    drawn |= _line(fig, 2, epochs, "validation/grf_vz_r_std", markers=True)
    _threshold(fig, 2, epochs, profile, "threshold/grf_vz_r_std", "N")
    drawn |= _flag_bars(fig, 3, epochs, ["validation/knee_healthy", "validation/grf_healthy"])
    fig.update_layout(barmode="group")
    return fig, drawn


def _panel_collapse(epochs: Epochs, profile: Profile) -> tuple[go.Figure, bool]:
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=("train/batch_loss_cv", "validation/gen_std",
                                        "model/ema_diff"))
    drawn = _line(fig, 1, epochs, "train/batch_loss_cv")
    drawn |= _line(fig, 2, epochs, "validation/gen_std", markers=True)
    drawn |= _line(fig, 3, epochs, "model/ema_diff")
    return fig, drawn


def _panel_components(epochs: Epochs, profile: Profile) -> tuple[go.Figure, bool]:
    fig = go.Figure()
    names = {k.split("/", 1)[1] for m in epochs.values() for k in m if k.startswith("loss_ratio/")}
    terms = profile.loss_terms
    ordered = [n for n in terms if n in names] + sorted(names - set(terms))
    drawn = False
    for name in ordered:
        xs, ys = _series(epochs, f"loss_ratio/{name}")
        if xs:
            drawn = True
            fig.add_trace(go.Scatter(x=xs, y=ys, name=_text(f"loss_ratio/{name}"), mode="lines",
                                     stackgroup="ratios", line={"width": 0.5}))
    fig.update_layout(title={"text": "loss_ratio/* (stacked)", "font": {"size": 14}},
                      yaxis={"range": [0, 1.02], "title": "share of total loss"})
    return fig, drawn


_BUILDERS = (_panel_training, _panel_validation, _panel_collapse, _panel_components)


def panel_figure(index: int, epochs: Epochs, div_id: str, profile: Profile) -> str | None:
    """Panel ``index`` (0-3, in ``PANEL_TITLES`` order) as HTML, or None when it has no data."""
    if not epochs:
        return None
    fig, drawn = _BUILDERS[index](epochs, profile)
    if not drawn:
        return None
    fig.update_layout(height=300 if index == 3 else 620, showlegend=True)
    fig.update_xaxes(title_text="epoch", row=3 if index < 3 else None)
    return _html(fig, div_id)


def events_timeline(events: Sequence[tuple[int, dict[str, Any]]], div_id: str) -> str | None:
    """Events as points: epoch across, rule down, coloured by severity, message on hover."""
    if not events:
        return None
    rules: list[str] = []
    for _, event in events:
        if _text(event.get("rule")) not in rules:
            rules.append(_text(event.get("rule")))
    fig = go.Figure()
    by_severity: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for epoch, event in events:
        by_severity.setdefault(str(event.get("severity", "warning")), []).append((epoch, event))
    for severity, items in by_severity.items():
        fig.add_trace(go.Scatter(
            x=[e for e, _ in items], y=[_text(ev.get("rule")) for _, ev in items],
            mode="markers", name=_text(severity),
            marker={"color": SEVERITY_COLORS.get(severity.lower(), "#7c3aed"), "size": 10,
                    "symbol": "diamond" if severity.lower() in ("critical", "error") else "circle"},
            text=[_text(ev.get("message", "")) for _, ev in items],
            hovertemplate="epoch %{x}<br>%{y}<br>%{text}<extra>" + _text(severity)
            + "</extra>"))
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(rules)))
    fig.update_xaxes(title_text="epoch")
    fig.update_layout(height=140 + 26 * len(rules), hovermode="closest")
    return _html(fig, div_id)
