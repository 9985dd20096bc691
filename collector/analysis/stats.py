"""One closed epoch -> the seed's per-epoch metrics, plus the facts the rules need.

Pure functions over an ``EpochInput``: no history (loss_decrease and the rules live in
``health.py``), no I/O. Under DDP, gradient norms, parameter norms and weight summaries
are identical across ranks after all-reduce, so they are used once (for each step, the
lowest rank that sent it) and any rank that disagrees is reported as desynchronised.

    st = epoch_stats(inp, consts, profile)
    st.metrics["train/grad_norm_mean"], st.nonfinite_total, st.desync
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from collector.analysis.datastats import DataStatsAccumulator
from collector.analysis.inputs import DataConstants, EpochInput, ValidationInput
from collector.analysis.kernels import channel_moments, moments_1d, reduce_moments
from collector.analysis.profile import Profile
from trainer_client.wire import EMA_FIELDS, WEIGHT_FIELDS

__all__ = ["EpochStats", "epoch_stats", "validation_metrics"]

_W = {name: i for i, name in enumerate(WEIGHT_FIELDS)}
_E = {name: i for i, name in enumerate(EMA_FIELDS)}


@dataclass
class EpochStats:
    metrics: dict[str, float] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)  # what -> non-finite values
    nonfinite_ranks: set[int] = field(default_factory=set)
    nonfinite_steps: dict[int, set[int]] = field(default_factory=dict)  # rank -> steps
    ranks_compared: int = 0  # ranks whose all-reduced values could be compared
    desync: dict[int, list[str]] = field(default_factory=dict)  # rank -> what differed
    largest_params: list[tuple[str, float]] = field(default_factory=list)
    smallest_params: list[tuple[str, float]] = field(default_factory=list)
    validation_keys: list[str] = field(default_factory=list)  # the validation metrics
    validation_bad: int = 0  # non-finite generated values

    @property
    def nonfinite_total(self) -> int:
        return sum(self.nonfinite.values())

    @property
    def nonfinite_step_numbers(self) -> list[int]:
        """Steps with a non-finite loss or gradient norm on any rank, in order."""
        return sorted(set().union(*self.nonfinite_steps.values())) if self.nonfinite_steps \
            else []

    def count_nonfinite(self, what: str, n: int, rank: int | None = None) -> None:
        if n:
            self.nonfinite[what] = self.nonfinite.get(what, 0) + int(n)
            if rank is not None:
                self.nonfinite_ranks.add(rank)

    def bad_steps(self, rank: int, steps: np.ndarray) -> None:
        """Steps of ``rank`` whose loss or gradient norm was not finite."""
        if steps.size:
            self.nonfinite_steps.setdefault(rank, set()).update(int(x) for x in steps)


def _f64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)


def _differs(a: np.ndarray, b: np.ndarray, tol: float) -> np.ndarray:
    """Element-wise: do all-reduced values disagree? (both finite: relative; else: not equal)."""
    fin = np.isfinite(a) & np.isfinite(b)
    with np.errstate(invalid="ignore"):
        rel = np.abs(a - b) > tol * np.maximum(np.abs(a), np.abs(b))
    return np.where(fin, rel, ~((a == b) | (np.isnan(a) & np.isnan(b))))


def _pool(parts: list[tuple]) -> tuple[int, float, float]:
    """Chan-merges per-rank (count, mean, M2, ...) accumulators in one kernel call."""
    if not parts:
        return 0, 0.0, 0.0
    n, mean, m2 = reduce_moments(np.array([p[0] for p in parts], dtype=np.int64),
                                 np.array([p[1] for p in parts]), np.array([p[2] for p in parts]))
    return int(n), float(mean), float(m2)


def _losses(inp: EpochInput, st: EpochStats) -> None:
    """Per-step losses of every rank, pooled with per-rank moments merged by Chan."""
    parts = []
    for rank in sorted(inp.steps):
        s = inp.steps[rank]
        if s.loss.size:
            parts.append(moments_1d(_f64(s.loss)))
            st.count_nonfinite("loss", parts[-1][5], rank)
            if parts[-1][5]:
                st.bad_steps(rank, s.steps[~np.isfinite(s.loss)])
    n, mean, m2 = _pool(parts)
    if n == 0:
        return
    std = math.sqrt(m2 / n)
    st.metrics.update({"train/batch_loss_mean": mean, "train/batch_loss_std": std,
                       "train/batch_loss_max": float(max(p[4] for p in parts)),
                       "train/batch_loss_min": float(min(p[3] for p in parts))})
    if n > 1:  # the standard error of the epoch's mean loss (sample std, ddof=1)
        st.metrics["train/batch_loss_sem"] = math.sqrt(m2 / (n - 1) / n)
    if mean != 0:
        st.metrics["train/batch_loss_cv"] = std / abs(mean)


def _grad_norms(inp: EpochInput, st: EpochStats, tol: float) -> None:
    """Each step's norm once (lowest rank that sent one); NaN means no norm was sent."""
    ranks = [r for r in sorted(inp.steps) if inp.steps[r].steps.size]
    steps, vals, owner = [], [], []
    for r in ranks:
        s = inp.steps[r]
        keep = ~np.isnan(s.grad_norm)
        steps.append(s.steps[keep])
        vals.append(_f64(s.grad_norm[keep]))
        owner.append(np.full(int(keep.sum()), r))
    if not steps or sum(v.size for v in vals) == 0:
        return
    all_steps, all_vals = np.concatenate(steps), np.concatenate(vals)
    uniq, first = np.unique(all_steps, return_index=True)  # first: the lowest rank's value
    ref, ref_owner = all_vals[first], np.concatenate(owner)[first]
    n, mean, m2, lo, hi, bad = moments_1d(_f64(ref))
    bad = ~np.isfinite(ref)
    bad_owner = ref_owner[bad]
    for r in np.unique(bad_owner).tolist():
        st.count_nonfinite("grad_norm", int(np.sum(bad_owner == r)), int(r))
        st.bad_steps(int(r), uniq[bad][bad_owner == r])
    with_norms = sum(1 for v in vals if v.size)
    if with_norms > 1:
        st.ranks_compared = max(st.ranks_compared, with_norms)
        for r, s_steps, v in zip(ranks, steps, vals, strict=True):
            diff = _differs(v, ref[np.searchsorted(uniq, s_steps)], tol)
            if diff.any():
                step = int(s_steps[np.argmax(diff)])
                st.desync.setdefault(r, []).append(f"grad_norm from step {step}")
    if n:
        st.metrics.update({"train/grad_norm_mean": float(mean),
                           "train/grad_norm_std": math.sqrt(m2 / n),
                           "train/grad_norm_max": float(hi), "train/grad_norm_min": float(lo)})


def _weights(inp: EpochInput, st: EpochStats, tol: float) -> None:
    ranks = sorted(inp.weights)
    if not ranks:
        return
    ref_rank = ranks[0]
    w = _f64(inp.weights[ref_rank])
    if len(ranks) > 1:
        st.ranks_compared = max(st.ranks_compared, len(ranks))
        for r in ranks[1:]:
            if _differs(_f64(inp.weights[r]), w, tol).any():
                st.desync.setdefault(r, []).append("weight summary")
    bad = int(np.sum(~np.isfinite(w)))
    st.count_nonfinite("weights", bad, ref_rank)
    count = w[_W["count"]]
    if bad or count <= 0:
        return
    mean = w[_W["sum"]] / count
    var = max(w[_W["sum_sq"]] / count - mean * mean, 0.0)
    st.metrics.update({"model/weight_mean": float(w[_W["sum_abs"]] / count),
                       "model/weight_std": math.sqrt(var),
                       "model/weight_max": float(w[_W["max_abs"]])})


def _ema(inp: EpochInput, st: EpochStats) -> None:
    if not inp.ema:
        return
    rank = min(inp.ema)
    e = _f64(inp.ema[rank])
    bad = int(np.sum(~np.isfinite(e)))
    st.count_nonfinite("ema", bad, rank)
    if not bad and e[_E["count"]] > 0:
        st.metrics["model/ema_diff"] = float(e[_E["sum_abs_diff"]] / e[_E["count"]])


def _loss_ratios(inp: EpochInput, st: EpochStats) -> None:
    """loss_ratio/<term>: the term's epoch mean over the sum of all terms' epoch means."""
    parts: dict[str, list[tuple]] = {}
    for rank in sorted(inp.steps):
        for name in sorted(inp.steps[rank].components):
            comp = inp.steps[rank].components[name]
            parts.setdefault(name, []).append(moments_1d(_f64(comp)))
    pooled = {name: _pool(p) for name, p in sorted(parts.items())}
    means = {name: mean for name, (n, mean, _) in pooled.items() if n > 0}
    total = sum(means.values())
    if means and total != 0 and math.isfinite(total):
        st.metrics.update({f"loss_ratio/{name}": m / total for name, m in means.items()})


def _learning_rate(inp: EpochInput, st: EpochStats) -> None:
    """train/lr (the epoch's last rate), _min and _max, from the lowest rank that sent one:
    the rate an optimizer had, which remedies quote beside the config's."""
    for rank in sorted(inp.steps):
        s = inp.steps[rank]
        if s.lr is None or s.lr.size == 0:
            continue
        sent = s.lr[np.isfinite(s.lr)]
        if sent.size:
            st.metrics.update({"train/lr": float(sent[-1]), "train/lr_min": float(sent.min()),
                               "train/lr_max": float(sent.max())})
            return


def _param_ranking(inp: EpochInput, st: EpochStats, k: int) -> None:
    """Parameters by their mean gradient norm this epoch (lowest rank that shipped norms)."""
    for rank in sorted(inp.steps):
        pn = inp.steps[rank].param_norms
        if pn is None or pn.ndim != 2 or pn.shape[1] != len(inp.param_names):
            continue
        n, mean, _, _, _, _ = channel_moments(np.ascontiguousarray(pn))
        idx = np.flatnonzero(n > 0)
        if idx.size == 0:
            continue
        order = idx[np.argsort(-mean[idx], kind="stable")]
        st.largest_params = [(inp.param_names[i], float(mean[i])) for i in order[:k]]
        st.smallest_params = [(inp.param_names[i], float(mean[i])) for i in order[::-1][:k]]
        return


def _physical(consts: DataConstants | None, channel: str) -> tuple[float, float]:
    """(scale, offset) with physical = x * scale + offset; identity without constants."""
    if consts is None or consts.mean is None or consts.std is None:
        return 1.0, 0.0
    if channel not in consts.channel_names:
        return 1.0, 0.0
    i = consts.channel_names.index(channel)
    if i >= len(consts.std) or i >= len(consts.mean):
        return 1.0, 0.0
    return float(consts.std[i]), float(consts.mean[i])


def validation_metrics(v: ValidationInput, consts: DataConstants | None,
                       profile: Profile) -> tuple[dict[str, float], int]:
    """validation/* over the generated samples, and how many of them were not finite.

    gen_* are over the normalized samples of every channel. knee/GRF figures are in physical
    units (x * std + mean with the run's DataConstants); without constants the samples are
    taken to be physical already. A channel the profile leaves empty ("") or the samples
    lack gives no figures, which switches its rules off.
    """
    acc = DataStatsAccumulator()
    for arr in v.samples:
        acc.add(arr, v.dtype)
    m = acc.moments
    if m is None:
        return {}, 0
    out: dict[str, float] = {}
    n, mean, std, lo, hi = m.pooled()
    if n:
        out.update({"validation/gen_std": std, "validation/gen_mean": mean,
                    "validation/gen_range": hi - lo})
    for key, flag, channel, healthy in (
            ("knee_r", "knee", profile.knee_channel, profile.knee_healthy_std),
            ("grf_vz_r", "grf", profile.grf_channel, profile.grf_healthy_std)):
        if not channel or channel not in v.channel_names:
            continue
        c = v.channel_names.index(channel)
        if c >= m.count.size or m.count[c] == 0:
            continue
        scale, offset = _physical(consts, channel)
        phys_std = abs(scale) * m.std(c)
        out[f"validation/{key}_std"] = phys_std
        out[f"validation/{key}_mean"] = offset + scale * float(m.mean[c])
        out[f"validation/{flag}_healthy"] = int(phys_std > healthy)
    return out, int(m.bad.sum())


def epoch_stats(inp: EpochInput, consts: DataConstants | None, profile: Profile) -> EpochStats:
    """Everything one epoch's input says on its own, in the seed's metric names."""
    st = EpochStats()
    tol = profile.desync_rel_tol
    _grad_norms(inp, st, tol)
    _losses(inp, st)
    _weights(inp, st, tol)
    _ema(inp, st)
    if "train/batch_loss_mean" in st.metrics:
        st.metrics["train/total_loss"] = st.metrics["train/batch_loss_mean"]
    _loss_ratios(inp, st)
    _learning_rate(inp, st)
    _param_ranking(inp, st, profile.report_params)
    if inp.validation is not None:
        metrics, bad = validation_metrics(inp.validation, consts, profile)
        st.metrics.update(metrics)
        st.count_nonfinite("validation samples", bad)
        st.validation_keys, st.validation_bad = list(metrics), bad
    return st
