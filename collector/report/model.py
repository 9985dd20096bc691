"""The health report's reading of the records: runs, their epochs, events and verdicts.

Pure functions over the record dicts of ``collector.sinks`` (no HTML, no plotting), so the
verdict logic is testable and the page only formats.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SEVERITY_RANK", "RunData", "Verdict", "epoch_spans", "group_runs", "summary_row",
           "verdict"]

SEVERITY_RANK = {"critical": 0, "error": 1, "warning": 2, "warn": 2, "info": 3}
# health/* keys that are not 0/1 rule flags.
NOT_FLAGS = {"health/mode_collapse_score", "health/phase"}

Event = dict[str, Any]


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _rank_keys(value: Any) -> list[str]:
    """Rank ids from an epoch record's ``ranks``/``missing_ranks`` (a list, or a dict by rank)."""
    if isinstance(value, dict):
        return [str(k) for k in value]
    if isinstance(value, (list, tuple, set)):
        return [str(k) for k in value]
    return []


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
    events: list[tuple[int, Event]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)  # rank -> epochs it missed
    ranks_seen: set[str] = field(default_factory=set)
    _event_keys: set[tuple[Any, ...]] = field(default_factory=set, repr=False)

    def add_events(self, epoch: int, events: Iterable[Event]) -> None:
        for event in events:
            if not isinstance(event, dict):
                continue
            key = (epoch, str(event.get("rule")), str(event.get("message")))
            if key not in self._event_keys:  # an event may arrive in both record types
                self._event_keys.add(key)
                self.events.append((epoch, event))

    def last_epoch(self) -> int | None:
        return max(self.epochs) if self.epochs else None

    def last_metrics(self) -> dict[str, Any]:
        return self.epochs[max(self.epochs)] if self.epochs else {}

    def flags(self, prefix: str) -> dict[str, list[int]]:
        """0/1 flags under ``prefix`` -> the epochs where each was 1, in first-raised order."""
        raised: dict[str, list[int]] = {}
        for epoch in sorted(self.epochs):
            for key, value in self.epochs[epoch].items():
                if key.startswith(prefix) and key not in NOT_FLAGS and _finite(value) == 1.0:
                    raised.setdefault(key[len(prefix):], []).append(epoch)
        return raised

    def diagnoses(self) -> dict[str, list[int]]:
        return self.flags("diagnosis/")

    def events_by_rule(self) -> dict[str, list[tuple[int, Event]]]:
        by_rule: dict[str, list[tuple[int, Event]]] = {}
        for epoch, event in sorted(self.events, key=lambda t: t[0]):
            by_rule.setdefault(str(event.get("rule")), []).append((epoch, event))
        return by_rule

    def remedies(self) -> dict[str, str]:
        """Rule -> its latest non-empty remedy, for rules that fired above info."""
        out: dict[str, str] = {}
        for rule, items in self.events_by_rule().items():
            for _, event in items:
                sev = str(event.get("severity", "warning")).lower()
                if event.get("remedy") and SEVERITY_RANK.get(sev, 2) < SEVERITY_RANK["info"]:
                    out[rule] = str(event["remedy"])
        return out

    def remedy_for(self, diagnosis: str) -> str | None:
        """The remedy the events give for a diagnosis id (rule ``id`` or ``diagnosis/id``)."""
        for rule in (diagnosis, f"diagnosis/{diagnosis}"):
            for _, event in reversed(self.events_by_rule().get(rule, [])):
                if event.get("remedy"):
                    return str(event["remedy"])
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
        if kind == "run":
            ws = _finite(metrics.get("world_size"))
            run.world_size = int(ws) if ws is not None else run.world_size
            run.env.update(record.get("env") or {})
        elif kind == "config":
            run.config.update(metrics)
        elif kind == "data_stats":
            run.data_stats.update(metrics)
        elif kind == "summary":
            run.summary.update({k.removeprefix("summary/"): v for k, v in metrics.items()})
        elif kind == "epoch" and isinstance(epoch, int):
            run.epochs.setdefault(epoch, {}).update(metrics)
            last_epoch[name] = max(epoch, last_epoch.get(name, epoch))
            for rank in _rank_keys(record.get("missing_ranks")):
                run.missing[rank] = run.missing.get(rank, 0) + 1
            run.ranks_seen.update(_rank_keys(record.get("ranks")))
        if record.get("events"):
            # A run-level event (epoch None) is placed at the last epoch closed before it.
            at = epoch if isinstance(epoch, int) else last_epoch.get(name, 0)
            run.add_events(at, record["events"])
    return list(runs.values())


@dataclass
class Verdict:
    level: str  # "healthy" | "recovered" | "warnings" | "unhealthy" | "no data"
    fired: list[str]  # rules that fired at any epoch, first-fired first
    active: list[str]  # rules and diagnoses raised at the last epoch
    diagnoses: list[str]


def verdict(run: RunData) -> Verdict:
    """The run's health in one word.

    unhealthy: a diagnosis or a critical/error rule is raised at the last epoch, or anything
    was ever critical; warnings: only warning-level rules are raised at the last epoch;
    recovered: rules fired earlier and none is raised now; healthy: nothing fired.
    """
    fired: list[str] = list(run.flags("health/"))
    active: list[str] = []
    last = run.last_epoch()
    critical = False
    severity: dict[str, int] = {}  # rule -> severity of its latest start event
    for epoch, event in sorted(run.events, key=lambda t: t[0]):
        rule = str(event.get("rule"))
        sev = SEVERITY_RANK.get(str(event.get("severity", "warning")).lower(), 2)
        if sev >= SEVERITY_RANK["info"] or rule.startswith("diagnosis/"):
            continue
        critical |= sev <= SEVERITY_RANK["error"]
        severity[rule] = sev
        if rule not in fired:
            fired.append(rule)
        if epoch == last and rule not in active:
            active.append(rule)
    last_metrics = run.last_metrics()
    for rule in run.flags("health/"):
        if _finite(last_metrics.get(f"health/{rule}")) == 1.0 and rule not in active:
            active.append(rule)
    diagnoses = list(run.diagnoses())
    raised = [d for d in diagnoses if _finite(last_metrics.get(f"diagnosis/{d}")) == 1.0]
    serious = critical or bool(raised) or any(
        severity.get(r, SEVERITY_RANK["warning"]) <= SEVERITY_RANK["error"] for r in active)
    active += raised
    if not run.epochs and not fired:
        level = "no data"
    elif serious:
        level = "unhealthy"
    elif active:
        level = "warnings"
    elif fired or diagnoses:
        level = "recovered"
    else:
        level = "healthy"
    return Verdict(level=level, fired=fired, active=active, diagnoses=diagnoses)


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
    values = sorted({e for e in epochs if isinstance(e, int)})
    spans: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        spans.append(str(values[i]) if i == j else f"{values[i]}–{values[j]}")
        i = j + 1
    return ", ".join(spans) or "run-level"
