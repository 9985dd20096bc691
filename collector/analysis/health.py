"""One training run's health: epoch metrics, rule flags, diagnoses, events and the summary.

The pipeline calls it once per closed epoch (never per step, except for a non-finite step):

    health = RunHealth("run-1", load_profile(None))
    health.on_config({"learning_rate": 4e-4})
    verdict = health.on_epoch(epoch_input)          # metrics, events, raised
    health.on_late_validation(epoch, samples)       # amends an epoch already closed
    health.summary({"dropped": 0})

Improvement is judged against the noise (``[improvement]`` of the profile): with method
"best" an epoch improves when its mean loss is below the best epoch so far by more than
``margin`` standard errors of the difference, sqrt(sem^2 + sem_best^2), each sem the
epoch's ``train/batch_loss_sem``; "guide" is the guide's loss_decrease > 0.

The profile: the packaged default (gait) gives way to ``generic`` for a run whose channels
are not the gait ones, chosen once from the channels known when its first epoch closes
(``log_data_stats`` or the samples of that epoch) or when a step first raises a rule. A run
whose channels arrive only later keeps the default; a user's ``--rules`` is never replaced.

A verdict's ``extra``: the per-step curve's new points and a picture of the epoch's
samples, for the views; ``finish()``: the curve's last points when the run ends.

Deterministic: the same calls in the same order give identical metrics and events, so a
replayed recording reproduces the live records byte for byte.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

import numpy as np

from collector.analysis.datastats import DataStatsAccumulator
from collector.analysis.inputs import AMEND_EPOCHS, DataConstants, EpochInput, ValidationInput
from collector.analysis.pictures import sample_picture
from collector.analysis.profile import Profile, matches
from collector.analysis.profile_load import load_profile
from collector.analysis.rules import RuleEngine
from collector.analysis.samples import TrainingSubsample, sample_metrics
from collector.analysis.stats import EpochStats, epoch_stats, validation_metrics
from collector.analysis.stepcurve import StepCurve
from collector.records import CLEARED, Event, Record, SamplesPictureRecord, StepCurveRecord

__all__ = ["EpochVerdict", "RunHealth"]

_NONFINITE_RULE = "nonfinite"
GENERIC = "generic"  # the packaged profile a non-gait run gets instead of the default
SHOWN_STEPS = 8  # non-finite steps an event names
_generic: Profile | None = None


def _generic_profile() -> Profile:
    global _generic
    if _generic is None:
        _generic = load_profile(GENERIC)
    return _generic


class EpochVerdict(NamedTuple):
    """What one epoch says: its metrics (with the flags), the changes, what is raised."""

    epoch: int
    metrics: dict[str, Any]
    events: list[Event]
    raised: tuple[str, ...]
    profile: str  # the name of the profile that judged it
    extra: tuple[Record, ...] = ()  # for the views: the step curve's points, the pictures


class _Evaluated(NamedTuple):
    """What re-evaluating an epoch needs: the rules' state before it and its inputs."""

    epoch: int
    before: RuleEngine
    metrics: dict[str, Any]  # without the flags
    values: dict[str, float]
    phase: int
    details: dict[str, str]
    published: EpochVerdict
    validation: tuple[tuple[str, ...], int]  # the validation metrics' names, bad samples


class RunHealth:
    """Metrics and health events of one run, fed in epoch order."""

    def __init__(self, run: str, profile: Profile) -> None:
        self.run = run
        self.profile = profile
        self.config: dict[str, Any] = {}
        self.consts: DataConstants | None = None
        self.data = DataStatsAccumulator()
        # bounded: at most reference_max_values raw values (see collector.analysis.samples)
        self.subsample = TrainingSubsample(profile.reference_block_rows,
                                           profile.reference_max_values)
        self.engine = RuleEngine(profile)
        self._locked = False  # the profile is fixed once the run's first epoch is judged
        self._prev_loss: float | None = None
        # "best": the loss (and sem) of the last epoch that improved, the first one before
        self._best: tuple[float, float] | None = None
        self._trend: deque[tuple[float, float]] = deque(maxlen=profile.improvement_window)
        # A NaN gradient norm in a StepSeries means "no norm sent"; the real NaNs reach
        # step_event first, and are counted in the epoch that holds their step.
        self._nan_grads: dict[int, set[int]] = {}
        self._recent: deque[_Evaluated] = deque(maxlen=AMEND_EPOCHS)
        self._epochs: dict[int, dict[str, Any]] = {}  # epoch -> what the summary reads
        self.curve = StepCurve()  # bounded: collector.analysis.stepcurve.MAX_BUCKETS
        self._curve_epoch = 0  # the latest epoch whose steps the curve holds

    def on_config(self, config: dict[str, Any]) -> None:
        """The run's hyperparameters; remedies quote the values they are about."""
        self.config = dict(config)

    def on_data_constants(self, consts: DataConstants) -> None:
        """Normalisation constants: validation knee/GRF figures are then physical units."""
        self.consts = consts
        self._choose(consts.channel_names)

    def on_data(self, chunk: np.ndarray, dtype: str) -> None:
        """A chunk of the normalised training data (raw; the last axis is the channels)."""
        self.data.add(chunk, dtype)
        self.subsample.add(chunk, dtype)

    def _choose(self, channels: list[str]) -> None:
        """The generic profile for a run whose channels are not the gait ones, while the
        profile is the unmodified default and no epoch has been judged."""
        p = self.profile
        if self._locked or not p.switchable or not channels:
            return
        if (p.knee_channel and p.knee_channel in channels) or (
                p.grf_channel and p.grf_channel in channels):
            return
        self.profile = _generic_profile()
        self.engine = RuleEngine(self.profile)
        self._trend = deque(maxlen=self.profile.improvement_window)

    def data_metrics(self, channels: list[str], rows: tuple[int, int] | None = None
                     ) -> dict[str, float]:
        """The data-stats figures; ``rows``: (rows_total, rows_sent) when the client sent a
        sample of the data's rows, said beside them."""
        metrics = self.data.metrics(channels)
        if rows is not None:
            total, sent = rows
            metrics.update({"data_stats/rows_total": total, "data_stats/rows_sent": sent,
                            "data_stats/sampled_fraction": sent / total if total else 1.0})
        return metrics

    def step_event(self, rank: int, step: int, loss: float,
                   grad_norm: float | None) -> Event | None:
        """The immediate ``nonfinite`` event for a step with a NaN/Inf loss or grad norm.

        None for a finite step, and while the rule is already raised (one event per
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
        self._locked = True
        ev = self.engine.rule_event(_NONFINITE_RULE, f"rank {rank} step {step}: non-finite "
                                    f"{' and '.join(bad)}", self.config)
        if ev is None or not self.engine.activate(_NONFINITE_RULE):
            return None
        return ev

    def on_epoch(self, inp: EpochInput) -> EpochVerdict:
        """One closed epoch -> its metrics (with health/* and diagnosis/* flags) and events."""
        if inp.validation is not None:
            self._choose(inp.validation.channel_names)
        self._locked = True
        st = epoch_stats(inp, self.consts, self.profile)
        self._count_nan_grads(inp, st)
        m = st.metrics
        self._improvement(m)
        if inp.validation is not None:
            self._add_samples(m, inp.validation)
        phase = self.profile.phase(inp.epoch)
        m["health/phase"] = phase
        values: dict[str, float] = {**m, "facts/nonfinite": st.nonfinite_total,
                                    "facts/nonfinite_steps": len(st.nonfinite_step_numbers)}
        if st.ranks_compared > 1:
            values["facts/desync_ranks"] = len(st.desync)
        before = self.engine.snapshot()
        verdict = self._judge(inp.epoch, m, values, phase, _details(st))
        verdict = verdict._replace(extra=self._curve(inp) + self._picture(inp.epoch,
                                                                          inp.validation))
        self._recent.append(_Evaluated(inp.epoch, before, dict(m), values, phase,
                                       _details(st), verdict,
                                       (tuple(st.validation_keys), st.validation_bad)))
        return verdict

    def on_late_validation(self, epoch: int, v: ValidationInput) -> list[EpochVerdict]:
        """All of a closed epoch's samples (those it was judged with and the late ones): that
        epoch is judged again with them, as if they had come in time, and so is every epoch
        after it (their rules read it). Returns what changed, epoch by epoch: each verdict's
        events are only the changes not published before. Beyond ``AMEND_EPOCHS`` epochs
        back, the samples are too late: []."""
        at = next((i for i, e in enumerate(self._recent) if e.epoch == epoch), None)
        if at is None:
            return []
        metrics, bad = validation_metrics(v, self.consts, self.profile)
        self._add_samples(metrics, v)
        # raised since the last epoch (a non-finite step): still raised afterwards
        between = self.engine.active - set(self._recent[-1].published.raised)
        self.engine = self._recent[at].before.snapshot()
        out = []
        for i in range(at, len(self._recent)):
            ev = self._recent[i]
            m, values, judged_with = dict(ev.metrics), dict(ev.values), ev.validation
            if i == at:  # the samples it was judged with give way to all of them
                old_keys, old_bad = ev.validation
                for k in old_keys:
                    m.pop(k, None)
                    values.pop(k, None)
                m.update(metrics)
                values.update(metrics)
                values["facts/nonfinite"] = values.get("facts/nonfinite", 0) - old_bad + bad
                judged_with = (tuple(metrics), bad)
            before = self.engine.snapshot()
            redo = self._judge(ev.epoch, m, values, ev.phase, ev.details)
            self._recent[i] = ev._replace(before=before, metrics=m, values=values,
                                          published=redo, validation=judged_with)
            changed = _changes(ev.published, redo)
            if i == at:
                changed = changed._replace(extra=self._picture(epoch, v, amends=True))
            if i == at or changed.events or changed.raised != ev.published.raised:
                out.append(changed)
        for key in between:  # as activate() left them: raised, holding
            self.engine.activate(key)
        return out

    def finish(self) -> tuple[Record, ...]:
        """The run ended: the step curve's last points (its latest bucket), if held."""
        points = self.curve.finish()
        return (StepCurveRecord(self.run, self._curve_epoch, self.curve.width,
                                tuple(points)),) if points else ()

    def _curve(self, inp: EpochInput) -> tuple[Record, ...]:
        points = self.curve.add_epoch(inp)
        if not points:
            return ()
        self._curve_epoch = inp.epoch
        return (StepCurveRecord(self.run, inp.epoch, self.curve.width, tuple(points)),)

    def _picture(self, epoch: int, v: ValidationInput | None,
                 amends: bool = False) -> tuple[Record, ...]:
        if v is None:
            return ()
        try:
            made = sample_picture(v, self.subsample, self.consts, self.profile)
        except (ValueError, IndexError, TypeError):  # samples it cannot read: no picture
            return ()
        return () if made is None else (SamplesPictureRecord(self.run, epoch, *made, amends),)

    def _improvement(self, m: dict[str, Any]) -> None:
        """train/loss_decrease (_pct) against the previous epoch, as the guide defines them;
        train/is_improving by the profile's method (see the module docstring)."""
        loss = m.get("train/total_loss")
        if loss is None or not math.isfinite(loss):
            return
        sem = m.get("train/batch_loss_sem", 0.0)
        p = self.profile
        self._trend.append((loss, sem))
        if self._prev_loss is not None:
            decrease = self._prev_loss - loss
            m["train/loss_decrease"] = decrease
            if self._prev_loss != 0:
                m["train/loss_decrease_pct"] = 100.0 * decrease / self._prev_loss
            if p.improvement_method == "guide":
                improving = decrease > 0
            elif p.improvement_method == "best":
                ref, ref_sem = self._best or (loss, sem)
                improving = loss < ref - p.improvement_margin * math.hypot(sem, ref_sem)
            else:
                improving = _falling(list(self._trend)[-p.improvement_window:],
                                     p.improvement_margin)
            m["train/is_improving"] = int(improving)
            if improving or self._best is None:
                self._best = (loss, sem)
        else:
            self._best = (loss, sem)
        self._prev_loss = loss

    def _add_samples(self, m: dict[str, Any], v: ValidationInput) -> None:
        """The samples' diversity and per-channel figures (the guide's names win where a
        channel's would collide with them), then the threshold lines of the profile."""
        try:
            extra = sample_metrics(v, self.subsample, self.consts, self.profile)
        except ValueError:  # samples the figures cannot read: the guide's figures remain
            extra = {}
        for k, x in extra.items():
            m.setdefault(k, x)
        for pattern, value in self.profile.lines:
            for name in [k for k in m if matches(pattern, k)]:
                m.setdefault(f"threshold/{name.removeprefix('validation/')}", value)

    def _judge(self, epoch: int, m: dict[str, Any], values: dict[str, float], phase: int,
               details: dict[str, str]) -> EpochVerdict:
        flags, events = self.engine.evaluate(values, phase, details, self.config)
        metrics = {**m, **flags}
        self._epochs[epoch] = metrics
        return EpochVerdict(epoch, metrics, events, tuple(sorted(self.engine.active)),
                            self.profile.name)

    def summary(self, counts: dict[str, int]) -> dict[str, float]:
        """End-of-run figures for comparing runs in a sweep, plus the run's loss counts."""
        out: dict[str, float] = {}
        epochs = sorted(self._epochs)
        healthy = {name: [(e, int(self._epochs[e][f"validation/{name}_healthy"])) for e in epochs
                          if f"validation/{name}_healthy" in self._epochs[e]]
                   for name in ("knee", "grf")}
        loss = [(e, self._epochs[e]["train/total_loss"]) for e in epochs
                if "train/total_loss" in self._epochs[e]]
        for name, seen in healthy.items():
            if seen:
                out[f"summary/final_{name}_healthy"] = seen[-1][1]
        if loss:
            out["summary/min_total_loss"] = min(v for _, v in loss)
        for name, seen in healthy.items():
            first = next((e for e, v in seen if v == 1), None)
            if first is not None:
                out[f"summary/first_{name}_healthy_epoch"] = first
        x = np.array([e for e, _ in loss], dtype=np.float64)
        if x.size >= 2 and np.ptp(x) > 0:
            x = x - x.mean()
            y = np.array([v for _, v in loss])
            out["summary/total_loss_slope"] = float(np.dot(x, y - y.mean()) / np.dot(x, x))
        grad = [self._epochs[e]["train/grad_norm_mean"] for e in epochs
                if "train/grad_norm_mean" in self._epochs[e]]
        if grad and np.mean(grad) != 0:
            g = np.asarray(grad)
            out["summary/grad_norm_mean_cv"] = float(g.std() / g.mean())
        ema = [self._epochs[e]["model/ema_diff"] for e in epochs
               if "model/ema_diff" in self._epochs[e]]
        if ema:
            out["summary/ema_diff_mean"] = float(np.mean(ema))
        out.update({f"summary/{k}": int(v) for k, v in counts.items()})
        return out

    def _count_nan_grads(self, inp: EpochInput, st: EpochStats) -> None:
        for rank, pending in list(self._nan_grads.items()):
            s = inp.steps.get(rank)
            if s is None or s.steps.size == 0:
                continue
            wanted = np.fromiter(sorted(pending), np.int64, len(pending))
            here = np.isin(wanted, s.steps)
            st.count_nonfinite("grad_norm", int(here.sum()), rank)
            st.bad_steps(rank, wanted[here])
            last = int(s.steps.max())
            pending.difference_update({p for p in pending if p <= last})
            if not pending:
                del self._nan_grads[rank]


def _falling(points: list[tuple[float, float]], margin: float) -> bool:
    """Is the least-squares slope of (loss, sem) points, one an epoch, below ``-margin``
    standard errors of the slope (from the epochs' sems)?"""
    y = np.array([p[0] for p in points])
    s = np.array([p[1] for p in points])
    if len(points) < 2 or not (np.isfinite(y).all() and np.isfinite(s).all()):
        return False  # an epoch whose noise is unknown (overflowed) proves nothing
    x = np.arange(y.size, dtype=np.float64) - (y.size - 1) / 2.0
    sxx = float(np.dot(x, x))
    slope = float(np.dot(x, y - y.mean())) / sxx
    se = math.sqrt(float(np.dot(x * x, s * s))) / sxx
    return slope < -margin * se


def _changes(old: EpochVerdict, new: EpochVerdict) -> EpochVerdict:
    """``new`` with only the events that ``old`` did not already publish, and a clear for
    every rule ``old`` said was raised that ``new`` no longer raises nor clears."""
    said = {(e.rule, e.kind) for e in old.events}
    events = [e for e in new.events if (e.rule, e.kind) not in said]
    told = {e.rule for e in new.events}
    for rule in sorted(set(old.raised) - set(new.raised) - told):
        events.append(Event(rule, CLEARED, "info", f"{rule} cleared: judged again with "
                                                   "the epoch's late validation samples"))
    return new._replace(events=events)


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
        text = where + (f" (rank{'s' if len(ranks) > 1 else ''} "
                        f"{', '.join(map(str, ranks))})" if ranks else "")
        steps = st.nonfinite_step_numbers
        if steps:
            shown = ", ".join(map(str, steps[:SHOWN_STEPS]))
            more = f" and {len(steps) - SHOWN_STEPS} more" if len(steps) > SHOWN_STEPS else ""
            text = (f"{len(steps)} non-finite step{'s' if len(steps) > 1 else ''} "
                    f"(step{'s' if len(steps) > 1 else ''} {shown}{more}); {text}")
        out["nonfinite"] = text
    if st.desync:
        out["desync"] = "; ".join(f"rank {r} differs in {', '.join(what)}"
                                  for r, what in sorted(st.desync.items()))
    return out
