"""The report's validation panel: whatever the run's samples were measured by.

A gait run (knee/GRF figures present) gets the guide's figures with the profile's
thresholds; any other model gets a figure per statistic over the channels it sent
(``validation/<channel>_std``, ``_mean``); both get the fidelity (``_w1``) and the sample
diversity figures (``validation/sample_diversity``, ``validation/duplicate_frac``) when
the records have them, with the thresholds of the profile's rules on them. A run with
only the pooled figures (``validation/gen_*``) gets those.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from plotly.subplots import make_subplots

from collector.analysis.profile import Profile
from collector.report import figures as fg

__all__ = ["GAIT_KEYS", "validation_figure"]

GAIT_KEYS = ("validation/knee_r_std", "validation/grf_vz_r_std", "validation/knee_healthy",
             "validation/grf_healthy")
DIVERSITY = (("validation/sample_diversity", "validation/sample_diversity "
              "(across-sample spread / the data's)"),
             ("validation/duplicate_frac", "validation/duplicate_frac (near-duplicate pairs)"))
POOLED = ("validation/gen_std", "validation/gen_range", "validation/gen_mean")
_CHANNEL = re.compile(r"validation/(.+)_(std|mean|w1)")
_NOT_CHANNELS = {"gen", "knee_r", "grf_vz_r"}  # pooled and the gait figures' own names
MAX_CHANNELS = 12  # lines per figure; the rest are named in a note
ROW_PX = 190

Draw = Callable[..., bool]  # (fig, row) -> drew something


def _channels(epochs: fg.Epochs) -> dict[str, list[str]]:
    """Statistic ("std", "mean", "w1") -> channel names that have it, sorted."""
    out: dict[str, set[str]] = {}
    for metrics in epochs.values():
        for key in metrics:
            m = _CHANNEL.fullmatch(key)
            if m and m.group(1) not in _NOT_CHANNELS:
                out.setdefault(m.group(2), set()).add(m.group(1))
    return {stat: sorted(names) for stat, names in out.items()}


def _rule_lines(profile: Profile, metric: str) -> list[tuple[float, str]]:
    """(threshold, label) of the profile's threshold rules on exactly ``metric``."""
    return [(r.condition.threshold, f"{r.id}: {r.condition.op} {r.condition.threshold:g}")
            for r in profile.rules
            if r.condition.kind == "threshold" and metric in r.condition.metrics]


def _per_channel(epochs: fg.Epochs, stat: str, names: list[str], colors: dict[str, str],
                 shown: set[str]) -> Draw:
    """One line per channel, coloured and named by channel, one legend entry per channel
    across the panel's rows (``shown`` holds those already in the legend)."""
    def draw(fig, row: int) -> bool:
        drawn = False
        for name in names[:MAX_CHANNELS]:
            drawn |= fg.line(fig, row, epochs, f"validation/{name}_{stat}", name=name,
                             markers=True, color=colors[name],
                             legendgroup=name, showlegend=name not in shown)
            shown.add(name)
        if len(names) > MAX_CHANNELS:
            fg.empty_note(fig, row, f"{MAX_CHANNELS} of {len(names)} channels shown")
        return drawn
    return draw


def _has(epochs: fg.Epochs, key: str) -> bool:
    return bool(fg.series(epochs, key)[0])


def _recorded(epochs: fg.Epochs, key: str, fallback: dict[str, float]) -> float | None:
    """The threshold the run's records carry (its own profile's), else the report's."""
    for epoch in sorted(epochs, reverse=True):
        v = epochs[epoch].get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return fallback.get(key)


def _one(epochs: fg.Epochs, key: str, lines: list[tuple[float, str]]) -> Draw:
    def draw(fig, row: int) -> bool:
        drawn = fg.line(fig, row, epochs, key, markers=True)
        for value, label in lines:
            fg.threshold_line(fig, row, epochs, value, label)
        return drawn
    return draw


def _rows(epochs: fg.Epochs, profile: Profile) -> list[tuple[str, Draw]]:
    rows: list[tuple[str, Draw]] = []
    channels = _channels(epochs)
    # every channel keeps its colour across the statistics
    order = sorted({n for names in channels.values() for n in names})
    colors = {n: fg.PALETTE[i % len(fg.PALETTE)] for i, n in enumerate(order)}
    shown: set[str] = set()
    if any(_has(epochs, k) for k in GAIT_KEYS):
        for key, unit in (("knee_r_std", "rad"), ("grf_vz_r_std", "N")):
            thr = _recorded(epochs, f"threshold/{key}", profile.thresholds)
            lines = [] if thr is None else [(thr, f"threshold/{key} = {thr:g} {unit}")]
            rows.append((f"validation/{key} ({unit})", _one(epochs, f"validation/{key}", lines)))
        rows.append((
            "validation/knee_healthy, validation/grf_healthy",
            lambda fig, row: fg.flag_bars(fig, row, epochs, GAIT_KEYS[2:])))
    else:
        for stat, title in (("std", "per-channel std of the samples"),
                            ("mean", "per-channel mean of the samples")):
            if channels.get(stat):
                rows.append((f"validation/&lt;channel&gt;_{stat}: {title}",
                             _per_channel(epochs, stat, channels[stat], colors, shown)))
        if not rows:
            rows += [(key, _one(epochs, key, [])) for key in POOLED if _has(epochs, key)]
    if channels.get("w1"):
        rows.append(("validation/&lt;channel&gt;_w1: distance to the training data",
                     _per_channel(epochs, "w1", channels["w1"], colors, shown)))
    for key, title in DIVERSITY:
        if _has(epochs, key):
            rows.append((title, _one(epochs, key, _rule_lines(profile, key))))
    return rows


def validation_figure(epochs: fg.Epochs, div_id: str, profile: Profile) -> str | None:
    """The validation panel as HTML, or None when no validation figure was recorded."""
    rows = _rows(epochs, profile) if epochs else []
    if not rows:
        return None
    fig = make_subplots(rows=len(rows), cols=1, shared_xaxes=True,
                        vertical_spacing=min(0.08, 0.3 / len(rows)),
                        subplot_titles=[title for title, _ in rows])
    drawn = False
    for i, (_, draw) in enumerate(rows, start=1):
        drawn |= draw(fig, i)
    if not drawn:
        return None
    fig.update_layout(barmode="group")
    fg.epoch_axis(fig, min(epochs), max(epochs))
    fig.update_xaxes(title_text="epoch", row=len(rows), col=1)
    return fg.to_html(fig, div_id, ROW_PX * len(rows))
