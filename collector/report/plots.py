"""The health report's plots: the seed's four dashboard panels and the findings timeline.

Each builder takes one run's per-epoch metrics and returns an HTML fragment (a plotly
``<div>`` whose data plotly escapes) or ``None`` when the panel has nothing to show, so the
page can say so instead. plotly.js itself is embedded once by the page, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from collector.analysis.profile import Profile
from collector.report import figures as fg
from collector.report.model import Finding, spans
from collector.report.validation import validation_figure

__all__ = ["PANEL_TITLES", "findings_timeline", "panel_figure"]

PANEL_TITLES = ("Training health", "Validation quality", "Mode-collapse detection",
                "Loss components")
SEVERITY_COLORS = {"critical": "#b3261e", "error": "#b3261e", "warning": "#d97706",
                   "warn": "#d97706", "info": "#64748b"}
CLEARED_COLOR = "#475569"


def _three(titles: tuple[str, str, str]) -> go.Figure:
    return make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                         subplot_titles=titles)


def _panel_training(epochs: fg.Epochs, profile: Profile) -> tuple[go.Figure, bool]:
    fig = _three(("train/total_loss", "train/grad_norm_mean", "train/is_improving"))
    drawn = fg.line(fig, 1, epochs, "train/total_loss")
    drawn |= fg.line(fig, 2, epochs, "train/grad_norm_mean")
    _, grads = fg.series(epochs, "train/grad_norm_mean")
    # exploding and vanishing differ by orders of magnitude: log when they span some
    if grads and min(grads) > 0 and max(grads) >= 10 * min(grads):
        fig.update_yaxes(type="log", row=2, col=1)
    drawn |= fg.flag_bars(fig, 3, epochs, ["train/is_improving"])
    return fig, drawn


def _panel_collapse(epochs: fg.Epochs, profile: Profile) -> tuple[go.Figure, bool]:
    fig = _three(("train/batch_loss_cv", "validation/gen_std", "model/ema_diff"))
    drawn = fg.line(fig, 1, epochs, "train/batch_loss_cv")
    drawn |= fg.line(fig, 2, epochs, "validation/gen_std", markers=True)
    drawn |= fg.line(fig, 3, epochs, "model/ema_diff")
    return fig, drawn


def _panel_components(epochs: fg.Epochs, profile: Profile) -> tuple[go.Figure, bool]:
    fig = go.Figure()
    names = {k.split("/", 1)[1] for m in epochs.values() for k in m if k.startswith("loss_ratio/")}
    terms = profile.loss_terms
    ordered = [n for n in terms if n in names] + sorted(names - set(terms))
    drawn = False
    for name in ordered:
        xs, ys = fg.series(epochs, f"loss_ratio/{name}")
        if xs:
            drawn = True
            fig.add_trace(go.Scatter(x=xs, y=ys, name=fg.text(f"loss_ratio/{name}"),
                                     mode="lines", stackgroup="ratios", line={"width": 0.5}))
    fig.update_layout(title={"text": "loss_ratio/* (stacked)", "font": {"size": 14}},
                      yaxis={"range": [0, 1.02], "title": "share of total loss"})
    return fig, drawn


_BUILDERS = {0: _panel_training, 2: _panel_collapse, 3: _panel_components}


def panel_figure(index: int, epochs: fg.Epochs, div_id: str, profile: Profile) -> str | None:
    """Panel ``index`` (0-3, in ``PANEL_TITLES`` order) as HTML, or None when it has no data."""
    if not epochs:
        return None
    if index == 1:
        return validation_figure(epochs, div_id, profile)
    fig, drawn = _BUILDERS[index](epochs, profile)
    if not drawn:
        return None
    fg.epoch_axis(fig, min(epochs), max(epochs))
    if index == 3:
        fig.update_xaxes(title_text="epoch")
    else:
        fig.update_xaxes(title_text="epoch", row=3, col=1)
    return fg.to_html(fig, div_id, 210 if index == 3 else 560)


def findings_timeline(findings: Sequence[Finding], epochs: Sequence[int],
                      div_id: str) -> str | None:
    """Each rule and diagnosis down, epochs across: a bar over every epoch it was raised at
    (coloured by severity), a mark where it cleared; the latest message on hover."""
    if not findings:
        return None
    fig = go.Figure()
    by_severity: dict[str, list[Finding]] = {}
    for f in findings:
        by_severity.setdefault(f.severity.lower(), []).append(f)
    for severity, group in by_severity.items():
        xs: list[float | None] = []
        ys: list[str | None] = []
        hover: list[str | None] = []
        for f in group:
            raised = spans(f.epochs)
            for a, b in raised:  # a bar from the start of epoch a to the end of epoch b
                xs += [a - 0.4, b + 0.4, None]
                ys += [fg.text(f.key)] * 2 + [None]
                what = f"raised at epochs {a}–{b}" if b > a else f"raised at epoch {a}"
                hover += [f"{what}<br>{fg.text(f.message)}"] * 2 + [None]
        if not xs:
            continue
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines", name=fg.text(f"raised ({severity})"), text=hover,
            line={"color": SEVERITY_COLORS.get(severity, "#7c3aed"), "width": 9},
            hovertemplate="%{y}<br>%{text}<extra></extra>"))
    marks = [(e, f.key, "raised between epochs") for f in findings
             for e in f.raised_events if e not in f.epochs]
    marks += [(e, f.key, "cleared") for f in findings for e in f.cleared_at]
    for what, symbol in (("raised between epochs", "diamond"), ("cleared", "x-thin")):
        at = [(e, k) for e, k, w in marks if w == what]
        if at:
            fig.add_trace(go.Scatter(
                x=[e for e, _ in at], y=[fg.text(k) for _, k in at], mode="markers",
                name=what, marker={"color": CLEARED_COLOR, "size": 9, "symbol": symbol,
                                   "line": {"width": 2, "color": CLEARED_COLOR}},
                hovertemplate=f"%{{y}}<br>{what} at epoch %{{x}}<extra></extra>"))
    rules = [fg.text(f.key) for f in findings]
    fig.update_yaxes(categoryorder="array", categoryarray=list(reversed(rules)),
                     range=[-0.6, len(rules) - 0.4])
    seen = [*epochs, *(e for f in findings for e in f.epochs + f.raised_events + f.cleared_at)]
    lo, hi = min(seen, default=0), max(seen, default=0)
    fg.epoch_axis(fig, lo, hi)
    fig.update_xaxes(title_text="epoch", range=[lo - 0.6, hi + 0.6])
    return fg.to_html(fig, div_id, 40 + 30 * len(rules), hovermode="closest")
