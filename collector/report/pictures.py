"""Figures of what a model generates beside its training data, from the records' pictures.

One builder per kind of ``SamplesPictureRecord`` (see ``collector.analysis.pictures``),
each taking the record's ``picture`` (its JSON form) and returning a plotly figure: the
report draws them inline, the wandb sink logs them as ``wandb.Plotly`` (no browser, no
image library). ``epochs_figure`` joins one kind's figures of several validation epochs
into one with a slider, the last epoch shown::

    fig = picture_figure("gait", record["picture"], epoch=12)
    html = epochs_html({4: pic4, 8: pic8, 12: pic12}, "gait", "run-1-pictures")
"""

from __future__ import annotations

import math
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from collector.report.figures import text

__all__ = ["KIND_TITLES", "MAX_SLIDER_EPOCHS", "epochs_figure", "epochs_html",
           "picture_figure"]

Picture = dict[str, Any]
KIND_TITLES = {"gait": "Generated vs training gait curves",
               "images": "Generated vs training images",
               "histograms": "Generated vs training values per channel"}
GENERATED, TRAINING = "#2563eb", "#475569"
BANDS = {GENERATED: "rgba(37,99,235,0.18)", TRAINING: "rgba(71,85,105,0.18)"}
MAX_SLIDER_EPOCHS = 12  # validation epochs a report figure lets one step through
HIST_COLUMNS = 4
GRID_COLUMNS = 4  # images per row of a grid
ROW_PX = 250
_CONFIG = {"displaylogo": False, "responsive": True, "displayModeBar": "hover"}


# -- gait ------------------------------------------------------------------------------------
def _view(p: Picture, side: Picture | None) -> tuple[Picture | None, bool]:
    """What a side draws: its gait cycles when it has some, else its windows."""
    if side is None:
        return None, False
    cycles = side.get("cycles")
    if "cycle_x" in p and cycles and cycles.get("count"):
        return {**cycles, "band_count": cycles["count"]}, True
    return side, False


def _gait_side(fig: go.Figure, view: Picture, x: list, channels: list[str], col: int,
               color: str, what: str, band: tuple[float, float]) -> None:
    unit = "cycle" if view.get("windows") is not None else "sample"
    for row, ch in enumerate(channels, start=1):
        first = row == 1
        fig.add_trace(go.Scatter(x=x, y=view["high"][ch], mode="lines", line={"width": 0},
                                 name=f"{what}: band top", hoverinfo="skip", showlegend=False,
                                 legendgroup=f"{what}b"), row=row, col=col)
        fig.add_trace(go.Scatter(x=x, y=view["low"][ch], mode="lines", line={"width": 0},
                                 fill="tonexty", fillcolor=BANDS[color],
                                 name=f"{what}: {band[0]:.0%}–{band[1]:.0%} band",
                                 legendgroup=f"{what}b", showlegend=first, hoverinfo="skip"),
                      row=row, col=col)
        for i, curve in enumerate(view["curves"][ch]):
            fig.add_trace(go.Scatter(x=x, y=curve, mode="lines",
                                     line={"color": color, "width": 1}, opacity=0.55,
                                     name=f"{what}: {len(view['curves'][ch])} {unit}s",
                                     legendgroup=f"{what}c", showlegend=first and i == 0,
                                     hovertemplate=f"{what} {unit} {view['rows'][i]}: "
                                                   "%{y}<extra></extra>"), row=row, col=col)
        fig.add_trace(go.Scatter(x=x, y=view["mean"][ch], mode="lines",
                                 line={"color": color, "width": 3},
                                 name=f"{what}: mean of {view['band_count']}",
                                 legendgroup=f"{what}m", showlegend=first,
                                 hovertemplate=f"{what} mean: %{{y}}<extra></extra>"),
                      row=row, col=col)


def _gait_title(ch: str, what: str, side: Picture | None, cycles: bool, cut: bool) -> str:
    if side is None:
        return f"{ch}: no {what} windows kept"
    n = side["count"]
    items = "samples" if what == "generated" else "windows"
    if cycles:
        return f"{ch}: {what}, {side['cycles']['count']} gait cycles in {n} {items}"
    return f"{ch}: {what} ({n} {items}" + ("; no complete gait cycle)" if cut else ")")


def _gait(p: Picture, title: str) -> go.Figure:
    channels = p["channels"]
    gen, real = p["generated"], p.get("training")
    (gview, gcyc), (rview, rcyc) = _view(p, gen), _view(p, real)
    cut = "cycle_x" in p
    titles = []
    for ch, phys in zip(channels, p.get("physical", [False] * len(channels)), strict=False):
        name = text(ch) + ("" if phys else " (normalised)")
        titles += [_gait_title(name, "generated", gen, gcyc, cut),
                   _gait_title(name, "training", real, rcyc, cut)]
    fig = make_subplots(rows=len(channels), cols=2, shared_yaxes="rows", shared_xaxes=True,
                        horizontal_spacing=0.04, vertical_spacing=0.12, subplot_titles=titles)
    band = tuple(p.get("band", (0.1, 0.9)))
    for col, view, is_cycle, color, what in ((1, gview, gcyc, GENERATED, "generated"),
                                             (2, rview, rcyc, TRAINING, "training")):
        if view is None:
            continue
        x = p["cycle_x"] if is_cycle else p["x"]
        _gait_side(fig, view, x, channels, col, color, what, band)
        fig.update_xaxes(title_text="% of gait cycle (heel strike to heel strike)"
                         if is_cycle else "sample in window", row=len(channels), col=col)
    fig.update_layout(title={"text": text(title), "font": {"size": 14}},
                      height=90 + ROW_PX * len(channels) + 90)
    return fig


# -- images ----------------------------------------------------------------------------------
def _grid(images: list, grey: bool) -> list:
    """Images (``[h][w][c]`` 0-255) as one RGB mosaic, GRID_COLUMNS a row, 2 px apart."""
    if not images:
        return [[[255, 255, 255]]]
    h, w = len(images[0]), len(images[0][0])
    cols = min(GRID_COLUMNS, len(images))
    rows = math.ceil(len(images) / cols)
    pad = 2
    out = [[[255, 255, 255] for _ in range(cols * (w + pad) - pad)]
           for _ in range(rows * (h + pad) - pad)]
    for k, img in enumerate(images):
        r0, c0 = (k // cols) * (h + pad), (k % cols) * (w + pad)
        for y in range(h):
            for x in range(w):
                px = img[y][x]
                out[r0 + y][c0 + x] = [px[0]] * 3 if grey else list(px[:3])
    return out


def _images(p: Picture, title: str) -> go.Figure:
    gen, real = p["generated"], p.get("training")
    grey = p.get("mode") != "rgb"
    h, w, c = p["shape"]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.04, subplot_titles=[
        f"generated ({len(gen['images'])} of {gen['count']})",
        f"training ({len(real['images'])} of {real['count']})" if real
        else "no training images kept"])
    fig.add_trace(go.Image(z=_grid(gen["images"], grey), name="generated",
                           hoverinfo="skip"), row=1, col=1)
    if real:
        fig.add_trace(go.Image(z=_grid(real["images"], grey), name="training",
                               hoverinfo="skip"), row=1, col=2)
    fig.update_xaxes(showticklabels=False, showgrid=False)
    fig.update_yaxes(showticklabels=False, showgrid=False)
    lo, hi = p.get("range", [0, 1])
    fig.update_layout(title={"text": text(f"{title} — {h}×{w}×{c} shown at "
                                          f"{p['size'][0]}×{p['size'][1]}, "
                                          f"values {lo:.3g}..{hi:.3g} → 0..255"),
                             "font": {"size": 14}},
                      height=110 + 2 * ROW_PX, showlegend=False)
    return fig


# -- histograms -------------------------------------------------------------------------------
def _histograms(p: Picture, title: str) -> go.Figure:
    chans = p["channels"]
    cols = min(HIST_COLUMNS, max(1, len(chans)))
    rows = max(1, math.ceil(len(chans) / cols))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[text(c["name"]) for c in chans],
                        horizontal_spacing=0.05, vertical_spacing=0.16)
    for i, ch in enumerate(chans):
        edges = [e for e in ch["edges"]]
        if any(e is None for e in edges):
            continue
        centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
        width = edges[1] - edges[0]
        for key, color, n_key in (("training", TRAINING, "training_n"),
                                  ("generated", GENERATED, "generated_n")):
            counts, n = ch.get(key), ch.get(n_key) or 0
            if counts is None or n == 0:
                continue
            fig.add_trace(go.Bar(x=centers, y=[c / (n * width) for c in counts], width=width,
                                 marker={"color": color}, opacity=0.5, name=key,
                                 legendgroup=key, showlegend=i == 0, customdata=counts,
                                 hovertemplate=f"{key}: %{{y:.3g}} (%{{customdata}} values)"
                                               "<extra></extra>"),
                          row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(barmode="overlay", bargap=0, height=110 + 200 * rows,
                      title={"text": text(f"{title} — density of {p['count']} samples' values "
                                          "against the training data's"),
                             "font": {"size": 14}})
    return fig


_BUILDERS = {"gait": _gait, "images": _images, "histograms": _histograms}


def picture_figure(kind: str, picture: Picture, epoch: int | None = None) -> go.Figure:
    """The figure of one picture record (``kind`` and ``picture`` as the record has them)."""
    title = KIND_TITLES.get(kind, kind) + (f", epoch {epoch}" if epoch is not None else "")
    fig = _BUILDERS[kind](picture, title)
    fig.update_layout(title={"y": 1, "yref": "container", "yanchor": "top", "x": 0.01,
                             "xanchor": "left", "pad": {"t": 12}},
                      template="plotly_white", font={"size": 12},
                      margin={"l": 64, "r": 20, "t": 70, "b": 90},
                      legend={"orientation": "h", "yref": "container", "y": 0,
                              "yanchor": "bottom", "x": 0, "xanchor": "left"})
    return fig


def _shown(epochs: list[int]) -> list[int]:
    """At most MAX_SLIDER_EPOCHS of the epochs, evenly spread, the first and last kept."""
    if len(epochs) <= MAX_SLIDER_EPOCHS:
        return epochs
    k = MAX_SLIDER_EPOCHS
    return [epochs[round(i * (len(epochs) - 1) / (k - 1))] for i in range(k)]


def epochs_figure(pictures: dict[int, Picture], kind: str) -> go.Figure:
    """One kind's pictures of several validation epochs in one figure, a slider to pick the
    epoch; the last epoch is shown."""
    epochs = _shown(sorted(pictures))
    figs = [picture_figure(kind, pictures[e], e) for e in epochs]
    fig = figs[-1]
    if len(figs) == 1:
        return fig
    traces, owner = [], []
    for i, f in enumerate(figs):
        traces += list(f.data)
        owner += [i] * len(f.data)
    fig = go.Figure(data=traces, layout=figs[-1].layout)
    steps = []
    for i, e in enumerate(epochs):
        steps.append({"label": str(e), "method": "update",
                      "args": [{"visible": [o == i for o in owner]},
                               {"title.text": figs[i].layout.title.text}]})
    for t, o in zip(fig.data, owner, strict=True):
        t.visible = o == len(figs) - 1
    fig.update_layout(sliders=[{"active": len(figs) - 1, "steps": steps, "x": 0, "len": 1.0,
                                "y": 1.0, "yanchor": "bottom", "pad": {"t": 0, "b": 40},
                                "currentvalue": {"prefix": "validation epoch ",
                                                 "font": {"size": 12}}}],
                      margin={"t": 150}, height=fig.layout.height + 80)
    return fig


def epochs_html(pictures: dict[int, Picture], kind: str, div_id: str) -> str:
    """``epochs_figure`` as a ``<div>`` (plotly.js is embedded once by the page)."""
    return pio.to_html(epochs_figure(pictures, kind), full_html=False, include_plotlyjs=False,
                       div_id=div_id, config=_CONFIG)
