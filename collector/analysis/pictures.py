"""Pictures of a validation epoch's generated samples beside the training data, as small,
bounded payloads of plain lists (what ``SamplesPictureRecord`` carries to every view).

The kind follows the samples (channels last, as they arrive):

- "gait": ``(N, T, C)`` samples with the profile's knee or GRF channel. Per channel, a few
  generated samples and a few training windows as curves over the window (at most
  ``MAX_CURVE_POINTS`` positions, evenly decimated), and per side the mean and the
  ``BAND`` quantiles at each position over at most ``MAX_BAND_ROWS`` samples or windows;
  in physical units where ``log_data_stats`` gave constants (x * std + mean). With the
  GRF channel, the same over gait cycles (``cycles``: each window's first heel strike to
  the next, 0-100 %, ``collector.analysis.gaitcycles``), the contact threshold taken from
  the training windows' force, generated cycles kept within ``CYCLE_SPAN`` of the
  training cycles' median length.
- "images": ``(N, H, W, C)``. A few generated and training images, block-averaged down to
  at most ``MAX_IMAGE_SIDE`` pixels a side, scaled to 0-255 by one range (the training
  images' min and max, else the generated ones'); RGB from the first three channels, else
  grey from the first.
- "histograms": anything else with a channel axis. Per channel (at most
  ``MAX_HIST_CHANNELS``), ``HIST_BINS`` bins over the range both sides span, counts of at
  most ``MAX_HIST_VALUES`` finite values a side.

Training windows and images are the kept training rows (``TrainingSubsample.windows``) cut
at the samples' length, so they are whole training windows when the data was shipped as
``(N, T, C)`` (or images as ``(N, H, W, C)``) and not row-sampled. Rows shown are evenly
spaced, ``(arange(k) * n) // k``; values are rounded to 6 significant digits. Pure and
deterministic::

    kind, picture = sample_picture(validation, subsample, consts, profile) or (None, None)
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from collector.analysis.gaitcycles import (
    CYCLE_POINTS,
    CYCLE_SPAN,
    MIN_PHASE,
    contact_threshold,
    cut_cycles,
)
from collector.analysis.inputs import DataConstants, ValidationInput
from collector.analysis.profile import Profile
from collector.analysis.samples import TrainingSubsample, physical_units

__all__ = ["BAND", "HIST_BINS", "MAX_BAND_ROWS", "MAX_CURVES", "MAX_CURVE_POINTS",
           "MAX_HIST_CHANNELS", "MAX_HIST_VALUES", "MAX_IMAGES", "MAX_IMAGE_SIDE",
           "even_rows", "positions", "sample_picture", "widen"]

MAX_CURVES = 6  # samples and training windows drawn as curves, per side
MAX_CURVE_POINTS = 256  # positions along the window a curve keeps
MAX_BAND_ROWS = 1024  # samples (windows) the mean and the band are taken over
BAND = (0.1, 0.9)  # the band's quantiles
MAX_IMAGES = 8  # per side
MAX_IMAGE_SIDE = 32  # pixels
HIST_BINS = 32
MAX_HIST_CHANNELS = 16
MAX_HIST_VALUES = 65536  # values per channel and side
_DIGITS = 6

Picture = dict[str, Any]


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw values (bfloat16 as its uint16 bit pattern) as float64."""
    if dtype == "bfloat16":
        return (np.asarray(raw).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return np.asarray(raw, dtype=np.float64)


def even_rows(n: int, k: int) -> np.ndarray:
    """``min(n, k)`` evenly spaced indices of ``range(n)``."""
    k = min(n, k)
    return (np.arange(k) * n) // k if k > 0 else np.zeros(0, np.int64)


def positions(t: int) -> np.ndarray:
    """The window positions a curve keeps: all, or ``MAX_CURVE_POINTS`` evenly spread."""
    if t <= MAX_CURVE_POINTS:
        return np.arange(t)
    return np.unique(np.linspace(0, t - 1, MAX_CURVE_POINTS).round().astype(np.int64))


def _plain(a: np.ndarray) -> list:
    """Nested lists of 6-digit floats, None where not finite."""
    if a.ndim > 1:
        return [_plain(x) for x in a]
    return [float(f"{x:.{_DIGITS}g}") if math.isfinite(x) else None for x in a.tolist()]


def _take(arrays: list[np.ndarray], rows: np.ndarray, index: Any = ...) -> np.ndarray:
    """Rows of the arrays taken as one (pooled over ranks), each cut by ``index``, without
    joining or copying more than that."""
    bounds = np.cumsum([0] + [a.shape[0] for a in arrays])
    which = np.searchsorted(bounds, rows, side="right") - 1
    return np.stack([arrays[w][r - bounds[w]][index] for w, r in zip(which, rows, strict=True)])


def sample_picture(v: ValidationInput, data: TrainingSubsample | None,
                   consts: DataConstants | None, profile: Profile) -> tuple[str, Picture] | None:
    """(kind, picture) of the samples, or None when they have no channel axis (1-D)."""
    arrays = [a for a in v.samples if a.ndim >= 2 and a.shape[0] > 0]
    if not arrays:
        return None
    shape = arrays[0].shape[1:]
    arrays = [a for a in arrays if a.shape[1:] == shape]
    names = list(v.channel_names) if len(v.channel_names) == shape[-1] else [
        f"ch{i}" for i in range(shape[-1])]
    keep = data if data is not None and data.dtype is not None and \
        data.channels == shape[-1] else None
    gait = [c for c in (profile.knee_channel, profile.grf_channel) if c and c in names]
    if len(shape) == 2 and gait and shape[0] >= 2:
        return "gait", _gait(arrays, v.dtype, names, gait, profile.grf_channel, keep, consts)
    if len(shape) == 3:
        return "images", _images(arrays, v.dtype, keep)
    return "histograms", _histograms(arrays, v.dtype, names, keep)


# -- gait: curves over the window, a mean and a band ------------------------------------------
def _stats(x: np.ndarray, names: list[str]) -> Picture:
    """Per channel the mean and the BAND quantiles over the rows of ``x`` [rows, at, ch]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a position with no finite value
        mean = np.nanmean(x, axis=0)
        low, high = np.nanquantile(x, BAND, axis=0)
    return {"mean": {n: _plain(mean[:, i]) for i, n in enumerate(names)},
            "low": {n: _plain(low[:, i]) for i, n in enumerate(names)},
            "high": {n: _plain(high[:, i]) for i, n in enumerate(names)}}


def _side(band: np.ndarray, count: int, index: np.ndarray, names: list[str]) -> Picture:
    """Curves and band of one side; ``band`` is physical ``[band rows, positions, channels]``
    and ``index`` numbers its rows as the side does (sample or window)."""
    shown = even_rows(band.shape[0], MAX_CURVES)
    return {"count": count, "band_count": int(band.shape[0]), "rows": index[shown].tolist(),
            "curves": {n: _plain(band[shown][:, :, i]) for i, n in enumerate(names)},
            **_stats(band, names), "cycles": None}


def _cycles(band: np.ndarray, index: np.ndarray, grf: int, threshold: float,
            span: tuple[float, float], names: list[str]) -> Picture:
    """The side's complete gait cycles (``collector.analysis.gaitcycles``): a few as curves,
    the mean and band over all of them."""
    cycles, rows, lengths = cut_cycles(band, grf, threshold, span)
    out: Picture = {"count": int(rows.size), "windows": int(band.shape[0])}
    if rows.size:
        shown = even_rows(rows.size, MAX_CURVES)
        out.update(median_length=float(np.median(lengths)), rows=index[rows[shown]].tolist(),
                   curves={n: _plain(cycles[shown][:, :, i]) for i, n in enumerate(names)},
                   **_stats(cycles, names))
    return out


def _gait(arrays: list[np.ndarray], dtype: str, names: list[str], shown: list[str],
          grf_channel: str, keep: TrainingSubsample | None,
          consts: DataConstants | None) -> Picture:
    t = arrays[0].shape[1]
    cols = [names.index(c) for c in shown]
    scale, offset = physical_units(consts, shown)
    at = positions(t)
    n = sum(a.shape[0] for a in arrays)
    band = even_rows(n, MAX_BAND_ROWS)
    cut = np.ix_(at, cols)
    gen = widen(_take(arrays, band, cut), dtype) * scale + offset
    out: Picture = {"window_len": t, "x": at.tolist(), "band": list(BAND), "channels": shown,
                    "physical": [bool(consts is not None and c in consts.channel_names
                                      and consts.std is not None) for c in shown],
                    "generated": _side(gen, n, band, shown), "training": None}
    windows = keep.windows(t) if keep is not None else []
    real = None
    if windows:
        rows = even_rows(len(windows), MAX_BAND_ROWS)
        real = widen(np.stack([windows[i][cut] for i in rows]), keep.dtype) * scale + offset
        out["training"] = _side(real, len(windows), rows, shown)
    if grf_channel not in shown:
        return out
    grf = shown.index(grf_channel)
    threshold = contact_threshold((real if real is not None else gen)[:, :, grf])
    if threshold is None:
        return out
    span = (2.0 * MIN_PHASE, float(at.size))
    out["cycle_x"] = np.linspace(0.0, 100.0, CYCLE_POINTS).tolist()
    out["contact_threshold"] = float(f"{threshold:.{_DIGITS}g}")
    if real is not None:
        out["training"]["cycles"] = c = _cycles(real, rows, grf, threshold, span, shown)
        if c["count"]:
            span = (CYCLE_SPAN[0] * c["median_length"], CYCLE_SPAN[1] * c["median_length"])
    out["generated"]["cycles"] = _cycles(gen, band, grf, threshold, span, shown)
    return out


# -- images: a small grid ---------------------------------------------------------------------
def _shrink(x: np.ndarray) -> np.ndarray:
    """``[k, H, W, c]`` block-averaged to at most ``MAX_IMAGE_SIDE`` a side."""
    _, h, w, c = x.shape
    fh, fw = -(-h // MAX_IMAGE_SIDE), -(-w // MAX_IMAGE_SIDE)
    h2, w2 = h // fh, w // fw
    blocks = x[:, :h2 * fh, :w2 * fw].reshape(x.shape[0], h2, fh, w2, fw, c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a block with no finite value
        return np.nanmean(blocks, axis=(2, 4))


def _images(arrays: list[np.ndarray], dtype: str, keep: TrainingSubsample | None) -> Picture:
    h, w, c = arrays[0].shape[1:]
    chans = [0, 1, 2] if c >= 3 else [0]
    n = sum(a.shape[0] for a in arrays)
    rows = even_rows(n, MAX_IMAGES)
    gen = _shrink(widen(_take(arrays, rows)[..., chans], dtype))
    real = None
    windows = keep.windows(h * w) if keep is not None else []
    if windows:
        real_rows = even_rows(len(windows), MAX_IMAGES)
        real = _shrink(widen(np.stack([windows[i] for i in real_rows]), keep.dtype)
                       .reshape(-1, h, w, c)[..., chans])
    ref = real if real is not None and np.isfinite(real).any() else gen
    finite = ref[np.isfinite(ref)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0

    def pixels(x: np.ndarray) -> list:
        q = np.round(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255.0)
        return np.where(np.isfinite(q), q, 0).astype(np.int64).tolist()

    out: Picture = {"shape": [h, w, c], "size": list(gen.shape[1:3]),
                    "mode": "rgb" if len(chans) == 3 else "grey", "channels": chans,
                    "range": [lo, hi],
                    "generated": {"count": n, "rows": rows.tolist(), "images": pixels(gen)},
                    "training": None}
    if real is not None:
        out["training"] = {"count": len(windows), "rows": real_rows.tolist(),
                           "images": pixels(real)}
    return out


# -- anything else: per-channel histograms ----------------------------------------------------
def _histograms(arrays: list[np.ndarray], dtype: str, names: list[str],
                keep: TrainingSubsample | None) -> Picture:
    shape = arrays[0].shape[1:]
    c = shape[-1]
    per_row = max(1, int(np.prod(shape[:-1])))
    n = sum(a.shape[0] for a in arrays)
    rows = even_rows(n, max(1, MAX_HIST_VALUES // per_row))
    gen = widen(_take(arrays, rows), dtype).reshape(-1, c)[:MAX_HIST_VALUES]
    real = widen(keep.kept_rows(MAX_HIST_VALUES), keep.dtype) if keep is not None else None
    channels = []
    for i in range(min(c, MAX_HIST_CHANNELS)):
        g = gen[:, i][np.isfinite(gen[:, i])]
        r = real[:, i][np.isfinite(real[:, i])] if real is not None else np.zeros(0)
        both = np.concatenate([g, r])
        lo, hi = (float(both.min()), float(both.max())) if both.size else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, HIST_BINS + 1)
        channels.append({
            "name": names[i], "edges": _plain(edges),
            "generated": np.histogram(g, HIST_BINS, (lo, hi))[0].tolist(),
            "generated_n": int(g.size), "generated_nonfinite": int(gen.shape[0] - g.size),
            "training": np.histogram(r, HIST_BINS, (lo, hi))[0].tolist()
            if real is not None else None,
            "training_n": int(r.size)})
    return {"bins": HIST_BINS, "count": n, "channel_count": c, "channels": channels}
