"""Whether generated samples differ from each other and look like the training data.

The guide's sample figures (``gen_std``, ``knee_r_std``) are spreads over time and samples
together, so one realistic window copied 64 times passes them. These figures compare the
samples with each other, and with a reference drawn once from the training data:

    ref = DataReference.build(chunks, "float32", window_len=64)   # log_data_stats' chunks
    figs = sample_diversity(samples, "bfloat16", ref)             # raw (N, T, C) samples
    figs.metrics(["knee_angle_r", ...])   # validation/sample_diversity, duplicate_frac, ...

Samples are raw arrays shaped (N, T, C), or (N, C) for T = 1 (axes between the first and
the last are flattened into T); float16/bfloat16 arrive as bit patterns and are widened by
``collector.analysis.kernels``. Non-finite values are left out of every figure. Definitions:

- across-sample std of channel c: the mean over t of the std over the N samples (ddof=1)
  of x[:, t, c]. ``diversity`` is the mean over channels of the samples' figure divided by
  the data windows' figure: ~1 for samples as varied as the data, 0 for copies of one.
- pair distance: the RMS over (t, c) of (x_i - x_j) / s_c, s_c the data channel's std.
  ``duplicate_frac`` is the share of compared pairs closer than ``duplicate_rms`` times the
  data windows' median pair distance: 1 for copies, ~0 for independent samples.
- ``w1``: per channel, the exact 1-D Wasserstein-1 distance between the empirical
  distributions of generated and training values (sorted-quantile form: the mean of
  |Q_gen(u) - Q_train(u)| over u, walked over both sorted sets);
  ``w1_norm`` is it over the training channel's std, so it is scale-free.

Costs are bounded: at most ``max_pairs`` pairs (evenly spaced over all N(N-1)/2 when there
are more) and ``max_values`` values per channel and side in the distances.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from collector.analysis.diversity_kernels import (
    across_sample_std,
    pair_rms_distances,
    sorted_finite,
    wasserstein1_sorted,
    widen_1d,
)
from collector.analysis.kernels import as_kernel_input, channel_moments

__all__ = ["DataReference", "DiversityConfig", "SampleFigures", "sample_diversity", "warm_up"]


# -- the collector's API -----------------------------------------------------------------
@dataclass(frozen=True)
class DiversityConfig:
    """Sizes that bound the cost, and the near-duplicate threshold (the profile's to set)."""

    max_windows: int = 256  # training windows in the reference (evenly spaced)
    max_pairs: int = 4096  # sample pairs compared (every pair while N(N-1)/2 <= this)
    max_values: int = 16384  # values per channel and side in W1 (whole samples/windows)
    duplicate_rms: float = 0.1  # near-duplicate: distance < this x data's median pair distance

    def __post_init__(self) -> None:
        if self.max_windows < 2 or self.max_pairs < 1 or self.max_values < 1:
            raise ValueError("max_windows must be >= 2, max_pairs and max_values >= 1")
        if not self.duplicate_rms > 0:
            raise ValueError(f"duplicate_rms must be > 0, got {self.duplicate_rms}")


def _as_3d(raw: np.ndarray) -> np.ndarray:
    """(N, ..., C) -> (N, T, C) without copying when contiguous."""
    if raw.ndim < 2:
        raise ValueError(f"samples must be (N, C) or (N, T, C), got shape {raw.shape}")
    return raw.reshape(raw.shape[0], -1, raw.shape[-1])


def _widened(view: np.ndarray) -> np.ndarray:
    """A kernel view (``as_kernel_input``) as a float64 array of the same shape."""
    x = np.ascontiguousarray(view)
    return widen_1d(x.reshape(-1)).reshape(x.shape)


def _w1_rows(n_rows: int, steps: int, max_values: int) -> np.ndarray:
    """Evenly spaced rows (samples or windows) whose values stand for a channel in W1."""
    keep = min(n_rows, max(1, max_values // max(steps, 1)))
    return (np.arange(keep) * n_rows) // keep


def _channel_values(x: np.ndarray, max_values: int) -> list[np.ndarray]:
    """Per channel, the sorted finite values of at most ``max_values`` (whole rows, and a
    stride within them only when one row alone is longer)."""
    rows = x[_w1_rows(x.shape[0], x.shape[1], max_values)]
    out = []
    for c in range(x.shape[2]):
        v = np.ascontiguousarray(rows[:, :, c]).reshape(-1)
        stride = max(1, math.ceil(v.size / max_values))
        out.append(sorted_finite(np.ascontiguousarray(v[::stride])))
    return out


def _finite_or_nan(values: np.ndarray) -> float:
    fin = values[np.isfinite(values)]
    return float(np.median(fin)) if fin.size else math.nan


@dataclass(frozen=True)
class DataReference:
    """What the figures compare samples with: a bounded, deterministic draw of training
    windows of the samples' length, and the data's own figures on them."""

    window_len: int
    windows: np.ndarray  # float64 (M, T, C)
    across_std: np.ndarray  # (C,) the windows' across-sample std
    channel_std: np.ndarray  # (C,) std of the windows' values
    pair_rms: float  # median pair distance between windows (in channel-std units)
    values: tuple[np.ndarray, ...]  # per channel: sorted finite values for W1

    @classmethod
    def build(cls, chunks: Sequence[np.ndarray], dtype: str, window_len: int,
              config: DiversityConfig = DiversityConfig()) -> DataReference:
        """From the raw training data as ``log_data_stats`` cut it: consecutive (rows, C)
        chunks in order. Windows start at multiples of ``window_len`` rows (each is one
        training window when the data was (N, window_len, C)), ``config.max_windows`` of
        them evenly spaced over the data."""
        if window_len < 1:
            raise ValueError(f"window_len must be >= 1, got {window_len}")
        parts = [np.asarray(as_kernel_input(c, dtype)) for c in chunks]
        parts = [p.reshape(-1, p.shape[-1] if p.ndim > 1 else 1) for p in parts if p.size]
        if not parts:
            raise ValueError("no training data")
        chans = parts[0].shape[1]
        if any(p.shape[1] != chans for p in parts):
            raise ValueError("training chunks have different channel counts")
        ends = np.cumsum([p.shape[0] for p in parts])
        n_windows = int(ends[-1]) // window_len
        if n_windows < 2:
            raise ValueError(f"{int(ends[-1])} rows hold fewer than 2 windows of {window_len}")
        m = min(config.max_windows, n_windows)
        raw = np.empty((m, window_len, chans), parts[0].dtype)
        for k, w in enumerate((np.arange(m) * n_windows) // m):
            raw[k] = _rows(parts, ends, int(w) * window_len, window_len)
        windows = _widened(raw)
        across, _ = across_sample_std(windows)
        n, _, m2, _, _, _ = channel_moments(windows.reshape(-1, chans))
        std = np.sqrt(m2 / np.maximum(n, 1))
        dist = pair_rms_distances(windows, _inverse(std), config.max_pairs)
        return cls(window_len, windows, across, std, _finite_or_nan(dist),
                   tuple(_channel_values(windows, config.max_values)))


def _rows(parts: list[np.ndarray], ends: np.ndarray, start: int, count: int) -> np.ndarray:
    """Rows [start, start + count) of the concatenated chunks (copies at most one window)."""
    i = int(np.searchsorted(ends, start, side="right"))
    first = start - (int(ends[i - 1]) if i else 0)
    piece = parts[i][first:first + count]
    while piece.shape[0] < count:
        i += 1
        piece = np.concatenate([piece, parts[i][:count - piece.shape[0]]])
    return piece


def _inverse(std: np.ndarray) -> np.ndarray:
    """1/std, 0 for a constant (or empty) channel: it then adds nothing to a distance."""
    with np.errstate(divide="ignore"):
        return np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0)


@dataclass(frozen=True)
class SampleFigures:
    """The figures of one validation's samples; NaN where a figure has no data."""

    n_samples: int
    window_len: int
    channel_mean: np.ndarray  # (C,) over all finite values, the samples' units
    channel_std: np.ndarray  # (C,)
    across_std: np.ndarray  # (C,) across-sample std (mean over t)
    diversity_by_channel: np.ndarray  # (C,) across_std / the data's; NaN without reference
    diversity: float  # mean of diversity_by_channel over channels that have it
    duplicate_frac: float
    pairs: int  # pairs compared with a finite distance
    w1: np.ndarray  # (C,) samples' units
    w1_norm: np.ndarray  # (C,) w1 / training channel std

    def metrics(self, channel_names: Sequence[str], scale: np.ndarray | None = None,
                offset: np.ndarray | None = None) -> dict[str, float]:
        """The collector's names; ``<channel>_std``/``_mean`` become physical with the
        run's constants (x * scale + offset) when given. NaN figures are left out."""
        names = [str(n) for n in channel_names]
        if len(names) != self.channel_std.size:
            raise ValueError(f"{len(names)} names for {self.channel_std.size} channels")
        out = {"validation/sample_diversity": self.diversity,
               "validation/duplicate_frac": self.duplicate_frac}
        sc = np.ones(len(names)) if scale is None else np.asarray(scale, np.float64)
        off = np.zeros(len(names)) if offset is None else np.asarray(offset, np.float64)
        for c, name in enumerate(names):
            out[f"validation/{name}_w1"] = float(self.w1_norm[c])
            out[f"validation/{name}_std"] = float(abs(sc[c]) * self.channel_std[c])
            out[f"validation/{name}_mean"] = float(off[c] + sc[c] * self.channel_mean[c])
        return {k: float(v) for k, v in out.items() if math.isfinite(v)}


def sample_diversity(samples: np.ndarray | Sequence[np.ndarray], dtype: str,
                     reference: DataReference | None = None,
                     config: DiversityConfig = DiversityConfig()) -> SampleFigures:
    """Diversity, near-duplicates and distance to the data of raw generated samples.

    ``samples``: one raw (N, T, C) / (N, C) array, or several (ranks) pooled on N. Without
    a reference only the samples' own figures exist: the duplicate test then scales by the
    samples' own channel std and takes sqrt(2) (independent samples) as the pair distance.
    """
    arrays = [samples] if isinstance(samples, np.ndarray) else list(samples)
    if not arrays:
        raise ValueError("no samples")
    raw = _as_3d(np.concatenate([_as_3d(np.asarray(a)) for a in arrays]) if len(arrays) > 1
                 else np.asarray(arrays[0]))
    x = _widened(as_kernel_input(raw, dtype))
    n_samples, steps, chans = x.shape
    if reference is not None and (reference.window_len != steps
                                  or reference.channel_std.size != chans):
        raise ValueError(f"samples are (T={steps}, C={chans}), the reference "
                         f"(T={reference.window_len}, C={reference.channel_std.size})")
    cnt, mean, m2, _, _, _ = channel_moments(x.reshape(-1, chans))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(cnt > 0, mean, np.nan)
        std = np.where(cnt > 0, np.sqrt(m2 / cnt), np.nan)
    across, _ = across_sample_std(x) if n_samples >= 2 else (np.full(chans, np.nan), None)
    nan = np.full(chans, np.nan)
    if reference is None:
        scale, pair_scale, div_c, w1, w1n = std, math.sqrt(2.0), nan, nan, nan
    else:
        scale, pair_scale = reference.channel_std, reference.pair_rms
        with np.errstate(invalid="ignore", divide="ignore"):
            div_c = np.where(reference.across_std > 0, across / reference.across_std, np.nan)
        mine = _channel_values(x, config.max_values)
        w1 = np.array([wasserstein1_sorted(a, b) for a, b in zip(mine, reference.values,
                                                                  strict=True)])
        with np.errstate(invalid="ignore", divide="ignore"):
            w1n = np.where(reference.channel_std > 0, w1 / reference.channel_std, np.nan)
    dup, pairs = math.nan, 0
    if n_samples >= 2:
        dist = pair_rms_distances(x, _inverse(np.nan_to_num(scale)), config.max_pairs)
        fin = dist[np.isfinite(dist)]
        pairs = int(fin.size)
        if pairs and math.isfinite(pair_scale):
            dup = float(np.mean(fin < config.duplicate_rms * pair_scale))
    fin_div = div_c[np.isfinite(div_c)]
    return SampleFigures(n_samples, steps, mean, std, across, div_c,
                         float(fin_div.mean()) if fin_div.size else math.nan, dup, pairs,
                         w1, w1n)


def warm_up() -> None:
    """Compiles (or loads from numba's on-disk cache) every specialization used here, so the
    first validation does not stall ingest; call it beside ``kernels.warm_up``."""
    for view in (np.zeros(2, np.float32), np.zeros(2, np.float64), np.zeros(2, np.int16),
                 np.zeros(2, np.uint16)):
        widen_1d(view)
    x = np.zeros((2, 2, 2), np.float64)
    across_sample_std(x)
    pair_rms_distances(x, np.ones(2), 1)
    v = sorted_finite(np.zeros(2))
    wasserstein1_sorted(v, v)
    channel_moments(x.reshape(-1, 2))
