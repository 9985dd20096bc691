"""Plain numpy (and math.fsum) reference implementations of every statistic trainwatch computes.

Slow and obvious on purpose: several passes, boolean masks, exactly rounded sums. The
kernel tests hold ``collector.analysis.kernels``, ``.datastats`` and ``.stats`` equal
to these.
"""

from __future__ import annotations

import math

import numpy as np

from collector.analysis.inputs import DataConstants, EpochInput
from trainer_client.wire import EMA_FIELDS, WEIGHT_FIELDS


def widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Raw values as float64; bfloat16 given as uint16 bit patterns."""
    raw = np.asarray(raw)
    if dtype == "bfloat16":
        with np.errstate(invalid="ignore"):  # signalling-NaN patterns
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(
                np.float64)
    return raw.astype(np.float64)


def moments(values: np.ndarray) -> tuple[int, float, float, float, float, int]:
    """(finite count, mean, M2, min, max, non-finite count) of float64 values."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    fin = v[np.isfinite(v)]
    if fin.size == 0:
        return 0, 0.0, 0.0, math.inf, -math.inf, int(v.size)
    mean = math.fsum(fin) / fin.size
    m2 = math.fsum((fin - mean) ** 2)
    return int(fin.size), mean, m2, float(fin.min()), float(fin.max()), int(v.size - fin.size)


def channel_moments(x2d: np.ndarray) -> list[tuple[int, float, float, float, float, int]]:
    return [moments(x2d[:, c]) for c in range(x2d.shape[1])]


def finite_median(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if v.size else math.nan


def data_stats(chunks: list[np.ndarray], dtype: str, names: list[str]) -> dict[str, float]:
    """data_stats/* over the concatenated chunks (last axis = channels)."""
    whole = np.concatenate([widen(c, dtype).reshape(-1, c.shape[-1]) for c in chunks])
    fin = whole[np.isfinite(whole)]
    out = {"data_stats/normalized_mean": float(fin.mean()),
           "data_stats/normalized_std": float(fin.std()),
           "data_stats/normalized_min": float(fin.min()),
           "data_stats/normalized_max": float(fin.max())}
    for c, name in enumerate(names):
        col = whole[:, c][np.isfinite(whole[:, c])]
        out[f"data_stats/{name}_mean"] = float(col.mean())
        out[f"data_stats/{name}_std"] = float(col.std())
    return out


def epoch_metrics(inp: EpochInput, consts: DataConstants | None, knee: str = "knee_angle_r",
                  grf: str = "grf_vz_r") -> dict[str, float]:
    """The seed's per-epoch metrics of one EpochInput, the obvious way."""
    out: dict[str, float] = {}
    ranks = sorted(inp.steps)
    # gradient norms: for each step, the lowest rank's value; NaN = none sent
    seen: dict[int, float] = {}
    for r in ranks:
        s = inp.steps[r]
        for step, g in zip(s.steps.tolist(), s.grad_norm.tolist(), strict=True):
            if not math.isnan(g) and step not in seen:
                seen[step] = g
    g = np.array([seen[k] for k in sorted(seen)], dtype=np.float64)
    g = g[np.isfinite(g)]
    if g.size:
        out.update({"train/grad_norm_mean": g.mean(), "train/grad_norm_std": g.std(),
                    "train/grad_norm_max": g.max(), "train/grad_norm_min": g.min()})
    losses = np.concatenate([inp.steps[r].loss for r in ranks]) if ranks else np.zeros(0)
    losses = losses[np.isfinite(losses)]
    if losses.size:
        out.update({"train/batch_loss_mean": losses.mean(), "train/batch_loss_std": losses.std(),
                    "train/batch_loss_max": losses.max(), "train/batch_loss_min": losses.min()})
        if losses.mean() != 0:
            out["train/batch_loss_cv"] = losses.std() / abs(losses.mean())
        if losses.size > 1:
            out["train/batch_loss_sem"] = losses.std(ddof=1) / math.sqrt(losses.size)
    if inp.weights:
        w = dict(zip(WEIGHT_FIELDS, inp.weights[min(inp.weights)].tolist(), strict=True))
        if all(math.isfinite(v) for v in w.values()) and w["count"] > 0:
            mean = w["sum"] / w["count"]
            out.update({"model/weight_mean": w["sum_abs"] / w["count"],
                        "model/weight_std": math.sqrt(max(w["sum_sq"] / w["count"] - mean**2, 0)),
                        "model/weight_max": w["max_abs"]})
    if inp.ema:
        e = dict(zip(EMA_FIELDS, inp.ema[min(inp.ema)].tolist(), strict=True))
        if all(math.isfinite(v) for v in e.values()) and e["count"] > 0:
            out["model/ema_diff"] = e["sum_abs_diff"] / e["count"]
    if losses.size:
        out["train/total_loss"] = losses.mean()
    names = sorted({n for r in ranks for n in inp.steps[r].components})
    means = {}
    for n in names:
        v = np.concatenate([inp.steps[r].components[n] for r in ranks
                            if n in inp.steps[r].components])
        v = v[np.isfinite(v)]
        if v.size:
            means[n] = v.mean()
    if means and sum(means.values()) != 0:
        out.update({f"loss_ratio/{n}": m / sum(means.values()) for n, m in means.items()})
    if inp.validation is not None:
        out.update(validation_metrics(inp, consts, knee, grf))
    return {k: float(v) for k, v in out.items()}


def validation_metrics(inp: EpochInput, consts: DataConstants | None, knee: str, grf: str
                       ) -> dict[str, float]:
    v = inp.validation
    assert v is not None
    x = np.concatenate([widen(a, v.dtype).reshape(-1, a.shape[-1]) for a in v.samples])
    fin = x[np.isfinite(x)]
    out = {"validation/gen_std": fin.std(), "validation/gen_mean": fin.mean(),
           "validation/gen_range": fin.max() - fin.min()}
    for key, flag, name, healthy in (("knee_r", "knee", knee, 0.1), ("grf_vz_r", "grf", grf, 10)):
        if not name or name not in v.channel_names:
            continue
        col = x[:, v.channel_names.index(name)]
        col = col[np.isfinite(col)]
        if consts is not None and consts.mean is not None and name in consts.channel_names:
            j = consts.channel_names.index(name)
            col = col * consts.std[j] + consts.mean[j]  # physical units
        out[f"validation/{key}_std"] = col.std()
        out[f"validation/{key}_mean"] = col.mean()
        out[f"validation/{flag}_healthy"] = float(col.std() > healthy)
    return out
