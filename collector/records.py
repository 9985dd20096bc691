"""The collector's output: one typed record per thing it knows, the same for every sink.

Every view (JSONL, wandb, the console, the HTML report, the live board) reads these, live
and in replay alike, so a sink cannot misread what an event means::

    EpochRecord(run="job-17", epoch=3, metrics={"train/total_loss": 0.4, ...},
                events=(Event("exploding_gradients", RAISED, "critical", "...", "..."),),
                raised=("exploding_gradients",), ranks=(0, 1), missing=())

``metrics`` holds the guide's per-epoch metrics under their exact names and a flag for
every rule and diagnosis the run has judged (``health/<rule>``, ``diagnosis/<id>``: 1 while
raised, 0 otherwise), so a flag reads the collector's state at every epoch, not only where
it changed. ``events`` are the changes this epoch: a rule raised or cleared. ``json()``
gives each record's one JSON form (what the JSONL holds and the report reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["CLEARED", "RAISED", "ConfigRecord", "DataStatsRecord", "EpochRecord", "Event",
           "EventRecord", "Ranks", "Record", "RunRecord", "StopRecord", "SummaryRecord",
           "plain"]

RAISED = "raised"
CLEARED = "cleared"
Metrics = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Event:
    """A rule or diagnosis (``diagnosis/<id>``) that was raised or cleared."""

    rule: str
    kind: str  # RAISED or CLEARED
    severity: str  # the rule's severity when raised; "info" when cleared
    message: str
    remedy: str = ""

    def json(self) -> dict[str, str]:
        return {"rule": self.rule, "kind": self.kind, "severity": self.severity,
                "message": self.message, "remedy": self.remedy}


@dataclass(frozen=True, slots=True)
class Ranks:
    """A set of ranks as a count and ranges, never one entry per rank (a run may claim
    thousands): ``Ranks.of([0, 1, 2, 5])`` is ``0-2, 5``."""

    ranges: tuple[tuple[int, int], ...] = ()  # inclusive, ascending, disjoint

    @classmethod
    def of(cls, ranks: list[int]) -> Ranks:
        out: list[tuple[int, int]] = []
        for r in sorted(ranks):
            if out and r <= out[-1][1] + 1:
                out[-1] = (out[-1][0], max(out[-1][1], r))
            else:
                out.append((r, r))
        return cls(tuple(out))

    @classmethod
    def missing(cls, present: list[int], world: int) -> Ranks:
        """The ranks of ``range(world)`` not in ``present``; O(len(present))."""
        out, lo = [], 0
        for r in sorted(p for p in set(present) if 0 <= p < world):
            if r > lo:
                out.append((lo, r - 1))
            lo = r + 1
        if lo < world:
            out.append((lo, world - 1))
        return cls(tuple(out))

    @property
    def count(self) -> int:
        return sum(b - a + 1 for a, b in self.ranges)

    def __str__(self) -> str:
        return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ranges) or "none"

    def json(self) -> dict[str, Any]:
        return {"count": self.count, "ranges": [list(r) for r in self.ranges]}


def _events(events: tuple[Event, ...]) -> list[dict[str, str]]:
    return [e.json() for e in events]


@dataclass(frozen=True, slots=True)
class RunRecord:
    """A run's first message arrived: its world size and the launcher's WANDB_* variables."""

    run: str
    world_size: int
    env: dict[str, str] = field(default_factory=dict)

    def json(self) -> dict[str, Any]:
        return {"type": "run", "run": self.run, "epoch": None,
                "metrics": {"world_size": self.world_size}, "events": [], "env": dict(self.env)}


@dataclass(frozen=True, slots=True)
class ConfigRecord:
    """The run's hyperparameters (the guide's section 1), plain values only."""

    run: str
    config: Metrics

    def json(self) -> dict[str, Any]:
        return {"type": "config", "run": self.run, "epoch": None, "metrics": dict(self.config),
                "events": []}


@dataclass(frozen=True, slots=True)
class DataStatsRecord:
    """The training data's baseline (the guide's section 2), once every chunk arrived."""

    run: str
    metrics: Metrics

    def json(self) -> dict[str, Any]:
        return {"type": "data_stats", "run": self.run, "epoch": None,
                "metrics": dict(self.metrics), "events": []}


@dataclass(frozen=True, slots=True)
class EpochRecord:
    """One closed epoch of a run: every metric, every flag, what changed, who reported.

    ``amends`` is True for a record that adds to an epoch already written (validation
    samples that arrived after the epoch closed): its metrics are that epoch's too.
    """

    run: str
    epoch: int
    metrics: Metrics
    events: tuple[Event, ...] = ()
    raised: tuple[str, ...] = ()  # rules and diagnoses raised at the end of this epoch
    ranks: Ranks = field(default_factory=Ranks)  # that reported the epoch
    missing: Ranks = field(default_factory=Ranks)  # of the run's world that did not
    amends: bool = False
    profile: str = ""  # the name of the rules profile that judged it

    def json(self) -> dict[str, Any]:
        out = {"type": "epoch", "run": self.run, "epoch": self.epoch,
               "metrics": dict(self.metrics), "events": _events(self.events),
               "raised": list(self.raised), "ranks": self.ranks.json(),
               "missing": self.missing.json(), "profile": self.profile}
        if self.amends:
            out["amends"] = True
        return out


@dataclass(frozen=True, slots=True)
class EventRecord:
    """Events between epochs (a non-finite step raises its rule at once)."""

    run: str
    epoch: int
    step: int
    rank: int
    events: tuple[Event, ...]

    def json(self) -> dict[str, Any]:
        return {"type": "event", "run": self.run, "epoch": self.epoch, "step": self.step,
                "rank": self.rank, "metrics": {}, "events": _events(self.events)}


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """A run ended: the sweep's comparison figures and its loss accounting.

    ``epoch`` is the last epoch closed (None when none was); ``ended`` says how.
    """

    run: str
    epoch: int | None
    metrics: Metrics
    ended: str = "finished"

    def json(self) -> dict[str, Any]:
        return {"type": "summary", "run": self.run, "epoch": self.epoch,
                "metrics": dict(self.metrics), "events": [], "ended": self.ended}


@dataclass(frozen=True, slots=True)
class StopRecord:
    """The collector decided that ``run`` stops at ``step`` because ``rule`` was raised
    (``[actions] stop_on``): every rank's ``should_stop`` turns True at that step.

    ``epoch`` is the last epoch closed when it was decided; ``seen`` the highest step any
    rank had reported then and ``steps_per_s`` the run's recent step rate, from which the
    margin to ``step`` was computed.
    """

    run: str
    epoch: int
    step: int
    rule: str
    seen: int
    steps_per_s: float

    def json(self) -> dict[str, Any]:
        return {"type": "stop", "run": self.run, "epoch": self.epoch, "step": self.step,
                "rule": self.rule, "metrics": {"stop/step": self.step,
                                               "stop/seen_step": self.seen,
                                               "stop/steps_per_s": self.steps_per_s},
                "events": []}


Record = (RunRecord | ConfigRecord | DataStatsRecord | EpochRecord | EventRecord | SummaryRecord
          | StopRecord)

MAX_DEPTH = 8  # nesting kept in a config value; deeper levels become a marker string
MAX_ITEMS = 1000  # entries kept per list or map
MAX_STR = 4096  # characters kept per string


def plain(v: Any, depth: int = 0) -> Any:
    """A value every sink can serialise: finite floats, ints, bools, short strings, lists,
    string-keyed maps; anything else (bytes, timestamps, deep nesting) made plain with a
    marker, so an accepted message reaches every sink and replay agrees with live."""
    if v is None or isinstance(v, bool | int | str):
        if isinstance(v, str) and len(v) > MAX_STR:
            return v[:MAX_STR] + f"...[{len(v) - MAX_STR} more chars]"
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 1 << 63:
            return str(v)
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, bytes | bytearray | memoryview):
        return plain(bytes(v).hex())
    if isinstance(v, dict | list | tuple):
        if depth >= MAX_DEPTH:
            return f"[nested deeper than {MAX_DEPTH} levels]"
        items = list(v.items()) if isinstance(v, dict) else list(v)
        cut = len(items) - MAX_ITEMS
        items = items[:MAX_ITEMS]
        if isinstance(v, dict):
            out: Any = {plain_key(k): plain(x, depth + 1) for k, x in items}
            if cut > 0:
                out["..."] = f"[{cut} more entries]"
            return out
        out = [plain(x, depth + 1) for x in items]
        if cut > 0:
            out.append(f"[{cut} more items]")
        return out
    if hasattr(v, "item") and callable(v.item):  # a numpy scalar
        try:
            return plain(v.item(), depth)
        except (TypeError, ValueError):
            pass
    return plain(str(v), depth)


def plain_key(k: Any) -> str:
    if isinstance(k, bytes | bytearray | memoryview):
        return bytes(k).hex()
    s = k if isinstance(k, str) else str(k)
    return s if len(s) <= MAX_STR else s[:MAX_STR] + "..."


# -- what the views draw besides the epoch rows: per-step curves, pictures of samples ----------
class StepPoint(NamedTuple):
    """One bucket of consecutive steps of a run's per-step curve.

    The bucket holds steps ``step // width * width`` up to ``+ width`` (``width`` a power of
    two); ``step`` is the first step it holds. Losses are every rank's (pooled), gradient
    norms one per step; the means, minima and maxima are over finite values (None when
    there were none) and ``nonfinite`` counts the NaN/Inf losses and norms.
    """

    step: int
    width: int
    n: int  # finite losses
    loss: float | None
    loss_min: float | None
    loss_max: float | None
    grad_n: int  # finite gradient norms
    grad_norm: float | None
    grad_norm_min: float | None
    grad_norm_max: float | None
    nonfinite: int


@dataclass(frozen=True, slots=True)
class StepCurveRecord:
    """The per-step curve's points that became final since the run's last such record.

    ``width`` is the bucket width the collector keeps the run's curve at now: the points of
    all records re-bucketed to it (``step // width``; each point falls in one bucket) give
    exactly the curve the collector holds, at most a bounded number of buckets.
    """

    run: str
    epoch: int
    width: int
    points: tuple[StepPoint, ...]

    def json(self) -> dict[str, Any]:
        columns = {name: [p[i] for p in self.points] for i, name in enumerate(StepPoint._fields)}
        return {"type": "steps", "run": self.run, "epoch": self.epoch, "metrics": {},
                "events": [], "width": self.width, "points": columns}


@dataclass(frozen=True, slots=True)
class SamplesPictureRecord:
    """What the generated samples of a validation epoch look like beside the training data.

    ``kind`` is "gait" (curves over the window and over gait
    cycles, with a mean and a band), "images" (a grid) or "histograms" (per channel);
    ``picture`` holds plain lists only, bounded in size (``collector.analysis.pictures``).
    ``amends``: built from late samples of an epoch already pictured; it replaces that
    picture.
    """

    run: str
    epoch: int
    kind: str
    picture: dict[str, Any]
    amends: bool = False

    def json(self) -> dict[str, Any]:
        out = {"type": "pictures", "run": self.run, "epoch": self.epoch, "metrics": {},
               "events": [], "kind": self.kind, "picture": self.picture}
        if self.amends:
            out["amends"] = True
        return out


Record = Record | StepCurveRecord | SamplesPictureRecord  # noqa: F811 - the views' records too
__all__ += ["SamplesPictureRecord", "StepCurveRecord", "StepPoint"]
