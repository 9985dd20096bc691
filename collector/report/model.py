"""The health report's reading of the records: runs, their epochs, findings and verdicts.

Pure functions over the records' JSON form (``MemorySink.json()`` or the JSONL's lines; no
HTML, no plotting), so the verdict logic is testable and the page only formats::

    runs = group_runs(records)
    v = verdict(runs[0], profile)        # v.level, v.reasons, v.active ...

Record semantics read here: an epoch record carries every metric, a 0/1 flag for every
rule the run has judged (``health/<rule>``, ``diagnosis/<id>``) and ``raised``, the rules
and diagnoses raised at the end of that epoch; its ``events`` are the changes (``kind``
"raised" or "cleared"). A record with ``"amends": true`` adds to an epoch already written;
later records of an epoch win. A summary's ``epoch`` is None when no epoch closed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from collector.analysis.profile import Profile
from collector.report.collapse import collapse_keys

__all__ = ["SEVERITY_RANK", "Finding", "LossTrend", "RunData", "Verdict", "epoch_spans",
           "group_runs", "loss_trend", "summary_row", "verdict"]

SEVERITY_RANK = {"critical": 0, "error": 1, "warning": 2, "warn": 2, "info": 3}
CLEARED = "cleared"
DIAGNOSIS = "diagnosis/"

Event = dict[str, Any]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _rank(severity: Any) -> int:
    return SEVERITY_RANK.get(str(severity).lower(), SEVERITY_RANK["warning"])


def _rank_ranges(value: Any) -> list[tuple[int, int]]:
    """An epoch record's ``ranks``/``missing`` (a count and inclusive ranges) as ranges."""
    if not isinstance(value, dict) or not isinstance(value.get("ranges"), list):
        return []
    return [(int(r[0]), int(r[1])) for r in value["ranges"]
            if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r)]


def _union(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _in(rank: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= rank <= hi for lo, hi in ranges)


def _flags_raised(metrics: dict[str, Any]) -> set[str]:
    """What an epoch's flags say is raised, for records without a ``raised`` list.

    ``health/<id>`` of a diagnosis that writes a score mirrors ``diagnosis/<id>``: it is
    counted once, as the diagnosis; ``*_score`` and ``health/phase`` are not flags.
    """
    out = set()
    for key, value in metrics.items():
        if _finite(value) != 1.0 or key.endswith("_score") or key == "health/phase":
            continue
        if key.startswith(DIAGNOSIS):
            out.add(key)
        elif key.startswith("health/") and DIAGNOSIS + key[7:] not in metrics:
            out.add(key[7:])
    return out


@dataclass
class Finding:
    """One rule (``id``) or diagnosis (``diagnosis/<id>``) that was raised in a run."""

    key: str
    epochs: list[int]  # the epochs it was raised at, from each epoch's raised list
    severity: str = "warning"  # its latest raise event's ("warning" when no event says)
    raised_events: list[int] = field(default_factory=list)  # epochs of its raise events
    cleared_at: list[int] = field(default_factory=list)
    message: str = ""  # its latest raise message
    remedy: str = ""
    active: bool = False  # raised at the end of the run's last epoch (or raised after it)

    @property
    def is_diagnosis(self) -> bool:
        return self.key.startswith(DIAGNOSIS)

    @property
    def name(self) -> str:
        return self.key.removeprefix(DIAGNOSIS)


@dataclass
class RunData:
    """Everything the records say about one run; later records of an epoch win."""

    run: str
    anchor: str
    world_size: int | None = None
    env: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    data_stats: dict[str, Any] = field(default_factory=dict)
    epochs: dict[int, dict[str, Any]] = field(default_factory=dict)
    raised: dict[int, set[str]] = field(default_factory=dict)  # epoch -> its raised list
    events: list[tuple[int, Event]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    ended: str | None = None  # the summary's word on how the run ended
    stop: tuple[int, str] | None = None  # (step, finding) of the collector's stop action
    missing_at: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # ranges
    reported: list[tuple[int, int]] = field(default_factory=list)  # ranks that reported
    judged_by: str = ""  # the name of the profile that judged its epochs
    _event_keys: set[tuple[Any, ...]] = field(default_factory=set, repr=False)

    def add_events(self, epoch: int, events: Iterable[Event]) -> None:
        for event in events:
            if not isinstance(event, dict):
                continue
            key = (epoch, str(event.get("rule")), str(event.get("kind", "raised")),
                   str(event.get("message")))
            if key not in self._event_keys:  # a record written twice says it once
                self._event_keys.add(key)
                self.events.append((epoch, event))

    def last_epoch(self) -> int | None:
        return max(self.epochs) if self.epochs else None

    def last_metrics(self) -> dict[str, Any]:
        return self.epochs[max(self.epochs)] if self.epochs else {}

    def missed(self, rank: int) -> int:
        """How many epochs closed without ``rank``."""
        return sum(1 for ranges in self.missing_at.values() if _in(rank, ranges))

    def never_reported(self) -> list[tuple[int, int]]:
        """Ranks missing from some epoch that never reported one, as ranges."""
        out: list[tuple[int, int]] = []
        for lo, hi in _union([r for ranges in self.missing_at.values() for r in ranges]):
            for rlo, rhi in _union(self.reported):  # cut what reported out of [lo, hi]
                if rhi < lo or rlo > hi:
                    continue
                if rlo > lo:
                    out.append((lo, rlo - 1))
                lo = rhi + 1
                if lo > hi:
                    break
            if lo <= hi:
                out.append((lo, hi))
        return out

    def reported_ranks(self, limit: int) -> list[int]:
        """Up to ``limit`` of the ranks that reported an epoch, lowest first."""
        out: list[int] = []
        for lo, hi in sorted(self.reported):
            out.extend(range(lo, min(hi, lo + limit - len(out) - 1) + 1))
            if len(out) >= limit:
                break
        return out

    def raised_at(self, epoch: int) -> set[str]:
        if epoch in self.raised:
            return self.raised[epoch]
        return _flags_raised(self.epochs.get(epoch, {}))

    def findings(self) -> list[Finding]:
        """Every rule and diagnosis ever raised, first raised first."""
        found: dict[str, Finding] = {}
        events = sorted(self.events, key=lambda t: t[0])
        # first raised first; within an epoch, in the order its events said so
        told = {(e, str(ev.get("rule"))): i for i, (e, ev) in reversed(list(enumerate(events)))}
        first: dict[str, tuple[int, int, str]] = {}
        for epoch in sorted(self.epochs):
            for key in self.raised_at(epoch):
                found.setdefault(key, Finding(key, [])).epochs.append(epoch)
                first.setdefault(key, (epoch, told.get((epoch, key), len(events)), key))
        last = self.last_epoch()
        after: dict[str, bool] = {}  # raised (True) or cleared by an event after ``last``
        for i, (epoch, event) in enumerate(events):
            key = str(event.get("rule"))
            f = found.setdefault(key, Finding(key, []))
            first.setdefault(key, (epoch, i, key))
            if event.get("kind") == CLEARED:
                f.cleared_at.append(epoch)
            else:
                f.raised_events.append(epoch)
                f.severity = str(event.get("severity") or "warning")
                f.message = str(event.get("message") or "")
                f.remedy = str(event.get("remedy") or "") or f.remedy
            if last is None or epoch > last:
                after[key] = event.get("kind") != CLEARED
        now = self.raised_at(last) if last is not None else set()
        for key, f in found.items():
            f.active = after.get(key, key in now)
        # a finding only cleared (its raise before the records began) is not one
        return sorted((f for f in found.values() if f.epochs or f.raised_events),
                      key=lambda f: first[f.key])

    def remedy_for(self, diagnosis: str) -> str | None:
        """The remedy the events give for a diagnosis id (``id`` or ``diagnosis/id``)."""
        for f in self.findings():
            if f.key in (diagnosis, DIAGNOSIS + diagnosis) and f.remedy:
                return f.remedy
        return None

    def lost(self) -> int:
        """Messages the summary says were dropped or rejected."""
        return int(sum(_finite(self.summary.get(k)) or 0 for k in ("dropped", "rejected")))


def group_runs(records: Iterable[dict[str, Any]]) -> list[RunData]:
    """Records -> one ``RunData`` per run, in the order runs first appear."""
    runs: dict[str, RunData] = {}
    last_epoch: dict[str, int] = {}
    for record in records:
        if not isinstance(record, dict) or "run" not in record:
            continue
        name = str(record["run"])
        run = runs.get(name)
        if run is None:
            run = runs[name] = RunData(run=name, anchor=f"run-{len(runs) + 1}")
        kind, metrics = record.get("type"), record.get("metrics") or {}
        epoch = record.get("epoch")
        if isinstance(epoch, bool) or not isinstance(epoch, int):
            epoch = None
        if kind == "run":
            ws = _finite(metrics.get("world_size"))
            run.world_size = int(ws) if ws is not None else run.world_size
            run.env.update(record.get("env") or {})
        elif kind == "config":
            run.config.update(metrics)
        elif kind == "data_stats":
            run.data_stats.update(metrics)
        elif kind == "stop" and isinstance(record.get("step"), int):
            run.stop = (record["step"], str(record.get("rule") or "?"))
        elif kind == "summary":
            run.summary.update({k.removeprefix("summary/"): v for k, v in metrics.items()})
            run.ended = str(record.get("ended") or "finished")
        elif kind == "epoch" and epoch is not None:
            run.epochs.setdefault(epoch, {}).update(metrics)
            last_epoch[name] = max(epoch, last_epoch.get(name, epoch))
            if isinstance(record.get("raised"), list):
                run.raised[epoch] = {str(k) for k in record["raised"]}
            if isinstance(record.get("profile"), str) and record["profile"]:
                run.judged_by = record["profile"]
            if not record.get("amends"):  # an amendment says nothing of who reported
                run.missing_at[epoch] = _rank_ranges(record.get("missing"))
                for r in _rank_ranges(record.get("ranks")):
                    if r not in run.reported:
                        run.reported.append(r)
        if record.get("events"):
            # A run-level event (epoch None) is placed at the last epoch closed before it.
            at = epoch if epoch is not None else last_epoch.get(name, 0)
            run.add_events(at, record["events"])
    return list(runs.values())


@dataclass
class LossTrend:
    first: float  # mean train/total_loss of the first ``n`` epochs that have it
    last: float  # ... and of the last ``n``
    n: int

    @property
    def rose(self) -> bool:
        return self.last > self.first

    @property
    def change(self) -> float:
        return (self.last - self.first) / abs(self.first) if self.first else math.inf

    def text(self) -> str:
        pct = f" ({self.change:+.0%})" if math.isfinite(self.change) else ""
        span = "epoch" if self.n == 1 else f"{self.n} epochs"
        return (f"train/total_loss ended above where it started: first {span} "
                f"{self.first:.4g}, last {span} {self.last:.4g}{pct}")


def loss_trend(run: RunData) -> LossTrend | None:
    """Where the training loss ended against where it started, robust to one noisy epoch.

    Compares the mean finite ``train/total_loss`` of the run's first ``n`` epochs with that
    of its last ``n``, ``n = clamp(epochs // 4, 1, 5)`` (the two windows never overlap).
    None with fewer than two epochs that have a loss.
    """
    losses = [v for _, m in sorted(run.epochs.items())
              if (v := _finite(m.get("train/total_loss"))) is not None]
    if len(losses) < 2:
        return None
    n = max(1, min(5, len(losses) // 4))
    return LossTrend(sum(losses[:n]) / n, sum(losses[-n:]) / n, n)


@dataclass
class Verdict:
    level: str  # "healthy" | "recovered" | "warnings" | "unhealthy" | "no data"
    fired: list[str]  # rules raised at any epoch (above info), first raised first
    active: list[str]  # rules and diagnoses raised at the last epoch
    diagnoses: list[str]  # diagnoses raised at any epoch (ids without "diagnosis/")
    reasons: list[str] = field(default_factory=list)  # why unhealthy, in words
    collapse: list[str] = field(default_factory=list)  # validation-collapse findings raised
    findings: list[Finding] = field(default_factory=list)  # those above info, as judged


def verdict(run: RunData, profile: Profile | None = None) -> Verdict:
    """The run's health in one word, and why.

    unhealthy: at the last epoch a diagnosis, a critical/error rule or a validation-collapse
    finding (``collapse.collapse_keys``) is raised; or anything was ever critical; or the
    training loss ended above where it started (``loss_trend``). warnings: only
    warning-level rules are raised at the last epoch. recovered: rules were raised earlier
    and none is now. healthy: nothing was raised. Info-level findings count for nothing.
    """
    collapse_ids = collapse_keys(profile, run.judged_by)
    findings = [f for f in run.findings() if _rank(f.severity) < SEVERITY_RANK["info"]]
    fired = [f.key for f in findings if not f.is_diagnosis]
    diagnoses = [f.name for f in findings if f.is_diagnosis]
    active = [f.key for f in findings if f.active and not f.is_diagnosis]
    active += [f.name for f in findings if f.active and f.is_diagnosis]
    collapse = [f.key for f in findings if f.active and f.key in collapse_ids]
    reasons = []
    if collapse:
        reasons.append("validation samples collapsed: " + ", ".join(collapse))
    serious = [f.key for f in findings if f.active and f.key not in collapse and (
        f.is_diagnosis or _rank(f.severity) <= SEVERITY_RANK["error"])]
    if serious:
        reasons.append("raised now: " + ", ".join(serious))
    earlier = [f.key for f in findings if not f.active
               and _rank(f.severity) == SEVERITY_RANK["critical"]]
    if earlier:
        reasons.append("critical earlier: " + ", ".join(earlier))
    trend = loss_trend(run)
    if trend is not None and trend.rose:
        reasons.append(trend.text())  # always the last reason: the page shows it apart
    if not run.epochs and not findings:
        level = "no data"
    elif reasons:
        level = "unhealthy"
    elif active:
        level = "warnings"
    elif findings:
        level = "recovered"
    else:
        level = "healthy"
    return Verdict(level=level, fired=fired, active=active, diagnoses=diagnoses,
                   reasons=reasons, collapse=collapse, findings=findings)


def summary_row(run: RunData) -> dict[str, Any]:
    """The run's summary figures; before its summary record, the same figures from its epochs."""
    if run.summary:
        return dict(run.summary)
    row: dict[str, Any] = {"_live": True}
    for name in ("knee", "grf"):
        key = f"validation/{name}_healthy"
        seen = [(e, _finite(m[key])) for e, m in sorted(run.epochs.items()) if key in m]
        if seen:
            row[f"final_{name}_healthy"] = seen[-1][1]
            row[f"first_{name}_healthy_epoch"] = next((e for e, v in seen if v == 1.0), None)
    losses = [v for m in run.epochs.values()
              if (v := _finite(m.get("train/total_loss"))) is not None]
    if losses:
        row["min_total_loss"] = min(losses)
    return row


def epoch_spans(epochs: Iterable[int | None]) -> str:
    """``[1, 2, 3, 7, 50]`` -> ``"1–3, 7, 50"``: short enough for a table cell."""
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans(epochs)) or "run-level"


def spans(epochs: Iterable[int | None]) -> list[tuple[int, int]]:
    """``[1, 2, 3, 7]`` -> ``[(1, 3), (7, 7)]``: runs of consecutive epochs."""
    values = sorted({e for e in epochs if isinstance(e, int)})
    out: list[tuple[int, int]] = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out
