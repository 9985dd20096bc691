"""One training run's health: epoch metrics, rule flags, diagnoses, events and the summary.

The state calls it once per closed epoch (never per step, except for a non-finite step):

    health = RunHealth("run-1", load_profile(None))
    health.on_config({"learning_rate": 4e-4})
    metrics, events = health.on_epoch(epoch_input)
    health.summary({"dropped": 0})

Deterministic: the same calls in the same order give identical metrics and events, so a
replayed recording reproduces the live records byte for byte.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from collector.analysis.inputs import DataConstants, EpochInput
from collector.analysis.profile import Profile
from collector.analysis.rules import RuleEngine
from collector.analysis.stats import EpochStats, epoch_stats

__all__ = ["RunHealth"]

_NONFINITE_RULE = "nonfinite"


class RunHealth:
    """Metrics and health events of one run, fed in epoch order."""

    def __init__(self, run: str, profile: Profile) -> None:
        self.run = run
        self.profile = profile
        self.config: dict[str, Any] = {}
        self.consts: DataConstants | None = None
        self.engine = RuleEngine(profile)
        self._prev_loss: float | None = None
        # A NaN gradient norm in a StepSeries means "no norm sent"; the real NaNs reach
        # step_event first, and are counted in the epoch that holds their step.
        self._nan_grads: dict[int, set[int]] = {}
        # What the summary needs, one entry per epoch that had it.
        self._loss: list[tuple[int, float]] = []
        self._grad_mean: list[float] = []
        self._ema: list[float] = []
        self._healthy: dict[str, list[tuple[int, int]]] = {"knee": [], "grf": []}

    def on_config(self, config: dict[str, Any]) -> None:
        """The run's hyperparameters; remedies quote the values they are about."""
        self.config = dict(config)

    def on_data_constants(self, consts: DataConstants) -> None:
        """Normalisation constants: validation knee/GRF figures are then physical units."""
        self.consts = consts

    def step_event(self, rank: int, step: int, loss: float,
                   grad_norm: float | None) -> dict | None:
        """The immediate ``nonfinite`` event for a step with a NaN/Inf loss or grad norm.

        None for a finite step, and while the rule is already firing (one event per
        episode: the epoch's evaluation clears it once an epoch is finite again).
        """
        bad = []
        if not math.isfinite(loss):
            bad.append(f"loss {loss}")
        if grad_norm is not None and not math.isfinite(grad_norm):
            bad.append(f"grad_norm {grad_norm}")
            if math.isnan(grad_norm):
                self._nan_grads.setdefault(rank, set()).add(step)
        if not bad:
            return None
        ev = self.engine.rule_event(_NONFINITE_RULE, f"rank {rank} step {step}: non-finite "
                                    f"{' and '.join(bad)}", self.config)
        if ev is None or not self.engine.activate(_NONFINITE_RULE):
            return None
        return ev

    def on_epoch(self, inp: EpochInput) -> tuple[dict[str, float], list[dict]]:
        """One closed epoch -> (metrics incl. health/* and diagnosis/* flags, events)."""
        st = epoch_stats(inp, self.consts, self.profile)
        self._count_nan_grads(inp, st)
        m = st.metrics
        loss = m.get("train/total_loss")
        if loss is not None and self._prev_loss is not None:
            decrease = self._prev_loss - loss
            m["train/loss_decrease"] = decrease
            if self._prev_loss != 0:
                m["train/loss_decrease_pct"] = 100.0 * decrease / self._prev_loss
            m["train/is_improving"] = int(decrease > 0)
        if loss is not None:
            self._prev_loss = loss
        phase = self.profile.phase(inp.epoch)
        m["health/phase"] = phase
        values: dict[str, float] = {**m, "facts/nonfinite": st.nonfinite_total}
        if st.ranks_compared > 1:
            values["facts/desync_ranks"] = len(st.desync)
        flags, events = self.engine.evaluate(values, phase, _details(st), self.config)
        m.update(flags)
        self._remember(inp.epoch, m)
        return m, events

    def summary(self, counts: dict[str, int]) -> dict[str, float]:
        """End-of-run figures for comparing runs in a sweep, plus the run's loss counts."""
        out: dict[str, float] = {}
        for name, seen in self._healthy.items():
            if seen:
                out[f"summary/final_{name}_healthy"] = seen[-1][1]
        if self._loss:
            out["summary/min_total_loss"] = min(v for _, v in self._loss)
        for name, seen in self._healthy.items():
            first = next((e for e, v in seen if v == 1), None)
            if first is not None:
                out[f"summary/first_{name}_healthy_epoch"] = first
        epochs = np.array([e for e, _ in self._loss], dtype=np.float64)
        if epochs.size >= 2 and np.ptp(epochs) > 0:
            x = epochs - epochs.mean()
            y = np.array([v for _, v in self._loss])
            out["summary/total_loss_slope"] = float(np.dot(x, y - y.mean()) / np.dot(x, x))
        if self._grad_mean and np.mean(self._grad_mean) != 0:
            g = np.asarray(self._grad_mean)
            out["summary/grad_norm_mean_cv"] = float(g.std() / g.mean())
        if self._ema:
            out["summary/ema_diff_mean"] = float(np.mean(self._ema))
        out.update({f"summary/{k}": int(v) for k, v in counts.items()})
        return out

    def _count_nan_grads(self, inp: EpochInput, st: EpochStats) -> None:
        for rank, pending in list(self._nan_grads.items()):
            s = inp.steps.get(rank)
            if s is None or s.steps.size == 0:
                continue
            here = np.isin(np.fromiter(pending, np.int64, len(pending)), s.steps)
            st.count_nonfinite("grad_norm", int(here.sum()), rank)
            last = int(s.steps.max())
            pending.difference_update({p for p in pending if p <= last})
            if not pending:
                del self._nan_grads[rank]

    def _remember(self, epoch: int, m: dict[str, float]) -> None:
        if "train/total_loss" in m:
            self._loss.append((epoch, m["train/total_loss"]))
        if "train/grad_norm_mean" in m:
            self._grad_mean.append(m["train/grad_norm_mean"])
        if "model/ema_diff" in m:
            self._ema.append(m["model/ema_diff"])
        for name in self._healthy:
            if f"validation/{name}_healthy" in m:
                self._healthy[name].append((epoch, int(m[f"validation/{name}_healthy"])))


def _details(st: EpochStats) -> dict[str, str]:
    """What the statistics know beyond the numbers, for the events' messages."""
    out: dict[str, str] = {}
    if st.largest_params:
        out["largest_params"] = "largest gradient norms: " + ", ".join(
            f"{name} {v:.3g}" for name, v in st.largest_params)
    if st.smallest_params:
        out["smallest_params"] = "smallest gradient norms: " + ", ".join(
            f"{name} {v:.3g}" for name, v in st.smallest_params)
    if st.nonfinite:
        where = ", ".join(f"{n} {what}" for what, n in sorted(st.nonfinite.items()))
        ranks = sorted(st.nonfinite_ranks)
        out["nonfinite"] = where + (f" (rank{'s' if len(ranks) > 1 else ''} "
                                    f"{', '.join(map(str, ranks))})" if ranks else "")
    if st.desync:
        out["desync"] = "; ".join(f"rank {r} differs in {', '.join(what)}"
                                  for r, what in sorted(st.desync.items()))
    return out
