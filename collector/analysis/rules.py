"""Evaluating the profile's rules and diagnoses on one epoch's metrics: flags and events.

No I/O. Each condition kind is one small function in ``_KINDS``; a rule or a diagnosis is
profile data naming a kind and its parameters. ``RuleEngine`` keeps what the rules need to
remember about a run: recent values of each metric, which rules are raised, and for each
how many judged epochs in a row its condition has held or not (hysteresis: a rule is
raised after ``raise_after`` epochs in a row that hold and cleared after ``clear_after``
in a row that do not), so that an event is emitted once when a rule is raised and once
when it clears.

    engine = RuleEngine(profile)
    flags, events = engine.evaluate(values, phase=1, details={}, config={})
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from collector.analysis.kernels import window_median
from collector.analysis.profile import Condition, Diagnosis, Profile, Rule, matches
from collector.records import CLEARED, RAISED, Event

__all__ = ["History", "RuleEngine", "check", "format_value"]

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le,
    "==": operator.eq, "!=": operator.ne}
# A message naming a field its kind does not fill shows "nan" / "" rather than failing.
_BLANK = {"value": math.nan, "threshold": math.nan, "metric": "", "median": math.nan,
          "factor": math.nan, "previous": math.nan, "change": math.nan, "streak": 0,
          "count": 0, "slope": math.nan, "denominator": "", "window": 0, "length": 0,
          "min_count": 0, "held": 0}

Result = dict[str, Any]  # "holds" plus the message fields the kind knows


class History:
    """The last ``maxlen`` values of each metric of one run (epochs that had it), oldest first."""

    def __init__(self, maxlen: int) -> None:
        self.maxlen = maxlen
        self._series: dict[str, deque[float]] = {}

    def values(self, name: str) -> list[float]:
        return list(self._series.get(name, ()))

    def latest(self, name: str) -> float | None:
        s = self._series.get(name)
        return s[-1] if s else None

    def copy(self) -> History:
        twin = History(self.maxlen)
        twin._series = {k: s.copy() for k, s in self._series.items()}
        return twin

    def push(self, values: dict[str, float]) -> None:
        for name, v in values.items():
            s = self._series.get(name)
            if s is None:
                s = self._series[name] = deque(maxlen=self.maxlen)
            s.append(v)


def _value(c: Condition, name: str, values: dict[str, float], hist: History) -> float | None:
    v = values.get(name)
    if v is None and c.latest:
        v = hist.latest(name)
    return v


def _names(c: Condition, values: dict[str, float]) -> list[str]:
    out: list[str] = []
    for m in c.metrics:
        if "*" in m:
            out += sorted(k for k in values if matches(m, k))
        else:
            out.append(m)
    return out


def _threshold(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    op, last = _OPS[c.op], None
    for name in _names(c, values):
        v = _value(c, name, values, hist)
        if v is None:
            continue
        last = {"holds": op(v, c.threshold), "value": v, "metric": name,
                "threshold": c.threshold}
        if last["holds"]:
            return last
    return last


def _ratio(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    num = _value(c, c.metrics[0], values, hist)
    den = _value(c, c.denominator, values, hist)
    if num is None or den is None or den == 0:
        return None
    v = num / den
    return {"holds": _OPS[c.op](v, c.threshold), "value": v, "metric": c.metrics[0],
            "denominator": c.denominator, "threshold": c.threshold}


def _surge(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    name = c.metrics[0]
    v, prev = values.get(name), hist.values(name)[-c.window:]
    if v is None or len(prev) < c.min_count:
        return None
    median = float(window_median(np.asarray(prev, dtype=np.float64)))
    return {"holds": v > c.factor * median and v >= c.floor, "value": v, "metric": name,
            "median": median, "factor": c.factor, "window": c.window, "floor": c.floor}


def _change(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    last = None
    for name in _names(c, values):
        v, prev = values.get(name), hist.latest(name)
        if v is None or prev is None or prev == 0:
            continue
        change = abs(v - prev) / abs(prev)
        last = {"holds": change > c.threshold, "value": v, "metric": name, "previous": prev,
                "change": change, "threshold": c.threshold}
        if last["holds"]:
            return last
    return last


def _streak(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    name = c.metrics[0]
    v = values.get(name)
    if v is None:
        return None
    op, streak = _OPS[c.op], 0
    if op(v, c.threshold):
        streak = 1
        for prev in reversed(hist.values(name)):
            if not op(prev, c.threshold):
                break
            streak += 1
    return {"holds": streak >= c.length, "value": v, "metric": name, "streak": streak,
            "length": c.length, "threshold": c.threshold}


def _count(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    name = c.metrics[0]
    v = values.get(name)
    if v is None:
        return None
    recent = hist.values(name)[-(c.window - 1):] if c.window > 1 else []
    count = sum(1 for x in [*recent, v] if _OPS[c.op](x, c.threshold))
    return {"holds": count >= c.min_count, "value": v, "metric": name, "count": count,
            "window": c.window, "min_count": c.min_count, "threshold": c.threshold}


def _slope(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    name = c.metrics[0]
    v = values.get(name)
    recent = hist.values(name)[-(c.window - 1):] if c.window > 1 else []
    if v is None or len(recent) + 1 < max(c.min_count, 2):
        return None
    y = np.asarray([*recent, v], dtype=np.float64)
    x = np.arange(y.size, dtype=np.float64) - (y.size - 1) / 2.0
    slope = float(np.dot(x, y - y.mean()) / np.dot(x, x))
    if c.relative:  # % of the window's mean value per epoch
        mean = float(y.mean())
        if mean == 0 or not math.isfinite(mean):
            return None
        slope = 100.0 * slope / abs(mean)
    return {"holds": _OPS[c.op](slope, c.threshold), "value": v, "metric": name,
            "slope": slope, "window": c.window, "threshold": c.threshold}


_KINDS: dict[str, Callable[[Condition, dict[str, float], History], Result | None]] = {
    "threshold": _threshold, "ratio": _ratio, "surge": _surge, "change": _change,
    "streak": _streak, "count": _count, "slope": _slope}


def check(c: Condition, values: dict[str, float], hist: History) -> Result | None:
    """A condition on this epoch's values: None when it cannot be judged, else a Result."""
    return _KINDS[c.kind](c, values, hist)


def format_value(v: Any) -> str:
    """Config values as people write them: 4e-4, 64, 0.5."""
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return str(v)  # an inf learning rate in a config is data too: "inf", no crash
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    if abs(v) < 1e-2 or abs(v) >= 1e5:
        mant, exp = f"{v:.3e}".split("e")
        return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"
    return f"{v:.4g}"


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    return _number(a) and _number(b) and math.isclose(float(a), float(b), rel_tol=1e-9)


Actual = dict[str, tuple[str, float]]  # config key -> (metric, the value the run had)


def _suggestions(suggest: tuple[tuple[str, float | str], ...], config: dict[str, Any],
                 actual: Actual) -> str:
    """What the remedy is about, as the run had it: the value its steps reported (e.g.
    ``train/lr``) beside the config's, where both exist and differ."""
    parts = []
    for name, want in suggest:
        have = config.get(name)
        metric, act = actual.get(name, ("", None))
        if act is not None and have is not None and not _same(act, have):
            said = (f"{name} is {format_value(act)} at the last step ({metric}; the config "
                    f"says {format_value(have)})")
        elif act is not None and have is None:
            said = f"{name} is {format_value(act)} at the last step ({metric})"
        elif have is not None:
            said = f"{name} is {format_value(have)}"
        else:
            continue
        if not isinstance(want, str) and _same(act if act is not None else have, want):
            continue
        parts.append(f"{said}; the guide suggests {format_value(want)}")
    return ". ".join(parts)


def _remedy(text: str, suggest: tuple[tuple[str, float | str], ...], config: dict,
            actual: Actual | None = None) -> str:
    extra = _suggestions(suggest, config, actual or {})
    return f"{text} {extra}." if extra and text else (text or extra)


class RuleEngine:
    """One run's rule state; ``evaluate`` once per closed epoch, in epoch order.

    ``active`` holds the rules (by id) and diagnoses (``diagnosis/<id>``) raised now;
    ``streaks`` holds, for each, the judged epochs in a row its condition held (> 0) or
    did not (< 0). Every rule the run has judged gets a flag each epoch from ``active``,
    so a flag says the state at every epoch, not only where it changed.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.history = History(profile.history_len)
        self.active: set[str] = set()
        self.streaks: dict[str, int] = {}
        self.judged: dict[str, str] = {}  # flag name -> key in ``active``, once judged

    def snapshot(self) -> RuleEngine:
        """A copy to go back to (an epoch amended later is evaluated again from it)."""
        twin = RuleEngine.__new__(RuleEngine)
        twin.profile = self.profile
        twin.history = self.history.copy()
        twin.active = set(self.active)
        twin.streaks = dict(self.streaks)
        twin.judged = dict(self.judged)
        return twin

    def actual(self, values: dict[str, float] | None = None) -> Actual:
        """Config key -> (metric, value) the run itself reported (this epoch, else the
        latest epoch that had it), for the keys the profile maps (``[remedies] actual``)."""
        out: Actual = {}
        for key, metric in self.profile.actual:
            v = (values or {}).get(metric)
            if v is None:
                v = self.history.latest(metric)
            if v is not None and math.isfinite(v):
                out[key] = (metric, v)
        return out

    def evaluate(self, values: dict[str, float], phase: int, details: dict[str, str],
                 config: dict[str, Any]) -> tuple[dict[str, int], list[Event]]:
        """Flags (``health/<id>``, ``diagnosis/<id>``: 1 while raised) and the changes."""
        scores: dict[str, int] = {}
        events: list[Event] = []
        actual = self.actual(values)
        for rule in self.profile.rules:
            res = check(rule.condition, values, self.history) if _in(rule, phase) else None
            if res is not None:
                self.judged.setdefault(f"health/{rule.id}", rule.id)
            self._transition(rule.id, res, _in(rule, phase), rule, events,
                             lambda r, rule=rule: self._rule_event(rule, r, details, config,
                                                                   actual))
        for diag in self.profile.diagnoses:
            res = self._diagnose(diag, values) if _in(diag, phase) else None
            key = f"diagnosis/{diag.id}"
            if res is not None:
                self.judged.setdefault(key, key)
                if diag.score:
                    scores[f"health/{diag.id}_score"] = res["count"]
                    self.judged.setdefault(f"health/{diag.id}", key)
            self._transition(key, res, _in(diag, phase), diag, events,
                             lambda r, diag=diag: self._diag_event(diag, r, config, actual))
        self.history.push(values)
        flags = {name: int(key in self.active) for name, key in self.judged.items()}
        return {**flags, **scores}, events

    def activate(self, key: str) -> bool:
        """Marks a rule raised between epochs (an immediate event); True if it was not."""
        if key in self.active:
            return False
        self.active.add(key)
        self.streaks[key] = max(self.streaks.get(key, 0), 1)
        return True

    def rule_event(self, rule_id: str, message: str, config: dict[str, Any]) -> Event | None:
        """The raise event of a rule with a message of the caller's; None if no such rule."""
        for rule in self.profile.rules:
            if rule.id == rule_id:
                return Event(rule.id, RAISED, rule.severity, message,
                             _remedy(rule.remedy, rule.suggest, config, self.actual()))
        return None

    def _transition(self, key: str, res: Result | None, in_phase: bool,
                    item: Rule | Diagnosis, events: list[Event],
                    start: Callable[[Result], Event]) -> None:
        """Hysteresis: raised after ``raise_after`` judged epochs in a row that hold, cleared
        after ``clear_after`` in a row that do not; an epoch that cannot judge it changes
        nothing, and leaving its phases clears it at once."""
        if not in_phase:
            self.streaks.pop(key, None)
            if key in self.active:
                self.active.discard(key)
                events.append(Event(key, CLEARED, "info", f"{key} cleared: out of its phase"))
            return
        if res is None:
            return
        run = self.streaks.get(key, 0)
        run = max(run, 0) + 1 if res["holds"] else min(run, 0) - 1
        self.streaks[key] = run
        if key not in self.active and run >= item.raise_after:
            self.active.add(key)
            events.append(start({**res, "epochs_held": run}))
        elif key in self.active and -run >= item.clear_after:
            self.active.discard(key)
            events.append(Event(key, CLEARED, "info", f"{key} cleared{_cleared(res, -run)}"))

    def _diagnose(self, diag: Diagnosis, values: dict[str, float]) -> Result | None:
        results = [(name, check(c, values, self.history)) for name, c in diag.conditions]
        judged = [name for name, r in results if r is not None]
        if len(judged) < diag.require:
            return None
        held = [name for name, r in results if r is not None and r["holds"]]
        return {"holds": len(held) >= diag.require, "count": len(held), "held": held}

    def _rule_event(self, rule: Rule, res: Result, details: dict[str, str],
                    config: dict[str, Any], actual: Actual) -> Event:
        try:
            message = rule.message.format(**{**_BLANK, **res, "held": res["epochs_held"]})
        except (KeyError, IndexError, ValueError):
            message = f"{rule.id}: {res.get('metric')} = {res.get('value')}"
        if rule.raise_after > 1 and "{held" not in rule.message:
            message = f"{message} ({res['epochs_held']} epochs in a row)"
        if details.get(rule.detail):
            message = f"{message}; {details[rule.detail]}"
        return Event(rule.id, RAISED, rule.severity, message,
                     _remedy(rule.remedy, rule.suggest, config, actual))

    def _diag_event(self, diag: Diagnosis, res: Result, config: dict[str, Any],
                    actual: Actual) -> Event:
        held = f", {res['epochs_held']} epochs in a row" if diag.raise_after > 1 else ""
        message = (f"{diag.id.replace('_', ' ')}: {res['count']} of {len(diag.conditions)} "
                   f"conditions hold ({', '.join(res['held'])}{held}). Cause: {diag.cause}")
        return Event(f"diagnosis/{diag.id}", RAISED, diag.severity, message,
                     _remedy(diag.remedy, diag.suggest, config, actual))


def _in(item: Rule | Diagnosis, phase: int) -> bool:
    return not item.phases or phase in item.phases


def _cleared(res: Result, after: int) -> str:
    v, metric = res.get("value"), str(res.get("metric", ""))
    why = ""
    if isinstance(v, int | float) and metric and not metric.startswith("facts/"):
        why = f": {res['metric']} is {v:.4g}"
    return f"{why} ({after} epochs in a row)" if after > 1 else why
