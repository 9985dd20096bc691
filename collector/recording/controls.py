"""CONTROL records read back from a file, checked as strictly as a message off the wire.

    ctl = parse(frames)          # Rejects | CloseEpoch | StopRun | ..., or None: skip, count
    if ctl is not None:
        pipeline.control(ctl.as_dict(), record=False)

The live collector writes these decisions (``Pipeline._flush_rejects``, ``State.overdue``,
``StopPolicy.due``, ``trainwatch collect`` at start)::

    {"op": "rejects", "counts": {run: {reason: n}}}        # run "" when none was named
    {"op": "close_epoch", "run": run, "epoch": e}
    {"op": "finish_run", "run": run}
    {"op": "evict_run", "run": run}
    {"op": "stop_run", "run": run, "rule": r, "step": s, "seen": s0, "rate": steps_per_s}
    {"op": "limits", "max_world_size": n, "max_held_bytes": n, ...}   # ``Limits``

A recording is a file anyone may have written, and a checksum proves nothing about who
wrote it: every field is checked for its type (exactly: ``True`` is no count) and range,
the same bounds the wire has, and unknown ops or keys make a record bad. A bad record is
None here; readers skip it and count it (``ReadStats.bad_controls``). ``as_dict`` is the
canonical form handed on, so nothing unchecked reaches the state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import msgpack

from collector.ingest.limits import Limits
from trainer_client.wire.types import MAX_RUN_LEN, MAX_WORLD, U63

__all__ = ["CloseEpoch", "Control", "EvictRun", "FinishRun", "Rejects", "SetLimits", "StopRun",
           "check", "parse"]

MAX_REASON_LEN = 64  # reject reasons are short counter keys ("bad_msgpack", ...)
MAX_RULE_LEN = 256  # a rule id ("diagnosis/gradient_explosion")
LIMIT_KEYS = frozenset(Limits.__dataclass_fields__)


class Rejects(NamedTuple):
    """Messages rejected live, per run and reason (counted when replayed)."""

    counts: dict[str, dict[str, int]]

    def as_dict(self) -> dict[str, Any]:
        return {"op": "rejects", "counts": {r: dict(c) for r, c in self.counts.items()}}


class CloseEpoch(NamedTuple):
    """The clock closed ``epoch`` of ``run`` without the ``missing`` ranks."""

    run: str
    epoch: int
    missing: tuple[int | tuple[int, int], ...]  # ranks, or (first, last) ranges of them

    def as_dict(self) -> dict[str, Any]:
        return {"op": "close_epoch", "run": self.run, "epoch": self.epoch,
                "missing": [list(m) if isinstance(m, tuple) else m for m in self.missing]}


class FinishRun(NamedTuple):
    """The clock declared ``run`` over (its ranks went quiet)."""

    run: str

    def as_dict(self) -> dict[str, Any]:
        return {"op": "finish_run", "run": self.run}


class EvictRun(NamedTuple):
    """The clock let go of a finished ``run``'s state (held long enough)."""

    run: str

    def as_dict(self) -> dict[str, Any]:
        return {"op": "evict_run", "run": self.run}


class SetLimits(NamedTuple):
    """The collector's limits from here on (``collector.ingest.limits.Limits``)."""

    values: dict[str, int | float]

    def as_dict(self) -> dict[str, Any]:
        return {"op": "limits", **self.values}


class StopRun(NamedTuple):
    """``run`` stops at ``step`` because ``rule`` was raised; ``seen`` (the highest step
    reported) and ``rate`` (steps per second) are what the margin was computed from."""

    run: str
    rule: str
    step: int
    seen: int
    rate: float

    def as_dict(self) -> dict[str, Any]:
        return {"op": "stop_run", "run": self.run, "rule": self.rule, "step": self.step,
                "seen": self.seen, "rate": self.rate}


Control = Rejects | CloseEpoch | FinishRun | EvictRun | SetLimits | StopRun


def _int(v: Any, hi: int = U63) -> bool:
    return type(v) is int and 0 <= v < hi


def _run(v: Any, empty: bool = False) -> bool:
    return type(v) is str and (empty or v != "") and len(v) <= MAX_RUN_LEN


def _rejects(ctl: dict) -> Rejects | None:
    counts = ctl.get("counts")
    if ctl.keys() != {"op", "counts"} or type(counts) is not dict:
        return None
    out: dict[str, dict[str, int]] = {}
    for run, reasons in counts.items():
        if not _run(run, empty=True) or type(reasons) is not dict:
            return None
        for reason, n in reasons.items():
            if type(reason) is not str or not 0 < len(reason) <= MAX_REASON_LEN \
                    or not _int(n):
                return None
        out[run] = dict(reasons)
    return Rejects(out)


def _missing(v: Any) -> tuple[int | tuple[int, int], ...] | None:
    if type(v) is not list or len(v) > MAX_WORLD:
        return None
    out: list[int | tuple[int, int]] = []
    for m in v:
        if _int(m, MAX_WORLD):
            out.append(m)
        elif type(m) is list and len(m) == 2 and _int(m[0], MAX_WORLD) \
                and _int(m[1], MAX_WORLD) and m[0] <= m[1]:
            out.append((m[0], m[1]))
        else:
            return None
    return tuple(out)


def _close_epoch(ctl: dict) -> CloseEpoch | None:
    if not {"op", "run", "epoch"} <= ctl.keys() <= {"op", "run", "epoch", "missing"}:
        return None
    run, epoch = ctl["run"], ctl["epoch"]
    missing = _missing(ctl.get("missing", []))
    if not _run(run) or not _int(epoch) or missing is None:
        return None
    return CloseEpoch(run, epoch, missing)


def _finish_run(ctl: dict) -> FinishRun | None:
    if ctl.keys() != {"op", "run"} or not _run(ctl["run"]):
        return None
    return FinishRun(ctl["run"])


def _evict_run(ctl: dict) -> EvictRun | None:
    if ctl.keys() != {"op", "run"} or not _run(ctl["run"]):
        return None
    return EvictRun(ctl["run"])


def _limits(ctl: dict) -> SetLimits | None:
    values = {k: v for k, v in ctl.items() if k != "op"}
    if not values.keys() <= LIMIT_KEYS:
        return None
    for v in values.values():
        if type(v) not in (int, float) or not 0 < v < U63:
            return None
    return SetLimits(values)


def _stop_run(ctl: dict) -> StopRun | None:
    if ctl.keys() != {"op", "run", "rule", "step", "seen", "rate"}:
        return None
    rule, step, seen, rate = ctl["rule"], ctl["step"], ctl["seen"], ctl["rate"]
    if not _run(ctl["run"]) or type(rule) is not str or not 0 < len(rule) <= MAX_RULE_LEN \
            or not _int(step) or not _int(seen) or seen > step or type(rate) is not float \
            or not 0.0 <= rate < U63:  # NaN fails both comparisons
        return None
    return StopRun(ctl["run"], rule, step, seen, rate)


_OPS = {"rejects": _rejects, "close_epoch": _close_epoch, "finish_run": _finish_run,
        "evict_run": _evict_run, "limits": _limits, "stop_run": _stop_run}


def check(ctl: Any) -> Control | None:
    """The typed control for an unpacked CONTROL body, or None if it is not a valid one."""
    if type(ctl) is not dict:
        return None
    op = ctl.get("op")
    fn = _OPS.get(op) if type(op) is str else None
    return fn(ctl) if fn is not None else None


def parse(frames: Sequence[bytes | memoryview]) -> Control | None:
    """A CONTROL record's frames (exactly one msgpack frame) -> its typed control, or None."""
    if len(frames) != 1:
        return None
    try:
        ctl = msgpack.unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several unrelated types on junk
        return None
    return check(ctl)
