"""The back-channel's layout: what the collector publishes to the ranks of a run.

The collector binds a PUB socket beside its PULL (the *health endpoint*); each rank's
sender thread holds a SUB connected to it, subscribed to its own run's topic. A message
is two frames: ``topic(run)``, then one msgpack array (positional, as on the wire)::

    STATE    [version, 1, run, seq, epoch, level, raised, stop]
    FINDING  [version, 2, run, seq, epoch, rule, kind, severity, message, remedy]
    STOP     [version, 3, run, seq, epoch, step, rule]

    raised: [[seq, epoch, rule, severity, message, remedy], ...]   (what is raised now)
    stop:   [seq, epoch, step, rule] or nil

``seq`` numbers a run's findings and stops 1, 2, 3, ... (a STATE carries the number of
the last one it includes), so a rank drops repeats and keeps order; a STATE is
republished while the run lives, so a rank that joined late (PUB/SUB loses what was sent
before a subscription arrived) converges on it. ``level`` is ``level_of`` the raised
findings' severities. ``epoch`` is -1 before the run's first epoch closed.

The topic is the run id's UTF-8 bytes behind their length (2 bytes, big-endian): no
topic is a prefix of another's, whatever characters run ids hold (a separator byte would
not do: run ids may contain any character).

The endpoint follows from the data endpoint (``health_endpoint``): ``tcp://host:P`` ->
``tcp://host:P+1``, ``ipc://path`` -> ``ipc://path.health``. Importable without torch or
numpy: both sides use this one definition.

    >>> frames = encode(Stop(4, 3, 120, "diagnosis/gradient_explosion"), "job")
    >>> decode(frames, "job").step
    120
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from trainer_client.wire.types import MAX_RUN_LEN, U63

__all__ = ["CLEARED", "KIND_FINDING", "KIND_STATE", "KIND_STOP", "LEVELS", "RAISED",
           "VERSION", "BadHealthMessage", "Finding", "State", "Stop", "decode", "encode",
           "health_endpoint", "level_of", "topic"]

VERSION = 1
KIND_STATE, KIND_FINDING, KIND_STOP = 1, 2, 3
RAISED, CLEARED = "raised", "cleared"
LEVELS = ("healthy", "warning", "critical")
MAX_TEXT = 16_384  # characters of a rule id, message or remedy
MAX_RAISED = 1024  # findings a STATE may list


class Finding(NamedTuple):
    """A rule or diagnosis (``diagnosis/<id>``) raised or cleared at ``epoch``."""

    seq: int
    epoch: int
    rule: str
    kind: str  # RAISED or CLEARED
    severity: str  # the rule's severity when raised; "info" when cleared
    message: str
    remedy: str = ""


class Stop(NamedTuple):
    """The collector's action: stop the run at step ``step`` (each rank's own count of its
    ``log_step`` calls), because ``rule`` was raised."""

    seq: int
    epoch: int
    step: int
    rule: str


class State(NamedTuple):
    """A run's whole current verdict: what is raised and the stop, if one was decided."""

    seq: int
    epoch: int
    level: str
    raised: tuple[Finding, ...]
    stop: Stop | None


class BadHealthMessage(ValueError):
    """A back-channel message that is not a valid one (the receiver counts and drops it)."""


def level_of(severities: Any) -> str:
    """healthy / warning / critical: the worst severity among what is raised (an "info"
    finding leaves a run healthy)."""
    sev = set(severities)
    return "critical" if "critical" in sev else "warning" if "warning" in sev else "healthy"


def topic(run: str) -> bytes:
    """The run's topic (see the module docstring): what a rank subscribes to."""
    raw = run.encode()
    return len(raw).to_bytes(2, "big") + raw


def health_endpoint(endpoint: str) -> str | None:
    """The health endpoint beside a data endpoint, or None when none follows from it (a
    tcp port that is not a number, or is 65535): tcp -> port + 1, others -> ``.health``."""
    if endpoint.startswith("tcp://"):
        head, colon, port = endpoint.rpartition(":")
        if not colon or not port.isdigit() or not 0 < int(port) < 65535:
            return None
        return f"{head}:{int(port) + 1}"
    if "://" not in endpoint:
        return None
    return endpoint + ".health"


def encode(msg: State | Finding | Stop, run: str) -> list[bytes]:
    """The two frames of one back-channel message for ``run``."""
    if isinstance(msg, State):
        stop = None if msg.stop is None else list(msg.stop)
        body = [VERSION, KIND_STATE, run, msg.seq, msg.epoch, msg.level,
                [[f.seq, f.epoch, f.rule, f.severity, f.message, f.remedy] for f in msg.raised],
                stop]
    elif isinstance(msg, Finding):
        body = [VERSION, KIND_FINDING, run, *msg]
    else:
        body = [VERSION, KIND_STOP, run, *msg]
    return [topic(run), msgpack.packb(body, use_bin_type=True)]


def _count(v: Any) -> bool:
    return type(v) is int and 0 <= v < U63


def _epoch(v: Any) -> bool:
    return type(v) is int and -1 <= v < U63


def _text(v: Any, empty: bool = False) -> bool:
    return type(v) is str and (empty or v != "") and len(v) <= MAX_TEXT


def _finding(seq: Any, epoch: Any, rule: Any, kind: Any, severity: Any, message: Any,
             remedy: Any) -> Finding:
    if not (_count(seq) and _epoch(epoch) and _text(rule) and kind in (RAISED, CLEARED)
            and _text(severity) and _text(message, True) and _text(remedy, True)):
        raise BadHealthMessage("bad finding")
    return Finding(seq, epoch, rule, kind, severity, message, remedy)


def _stop(v: Any) -> Stop:
    if type(v) is not list or len(v) != 4:
        raise BadHealthMessage("bad stop")
    seq, epoch, step, rule = v
    if not (_count(seq) and _epoch(epoch) and _count(step) and _text(rule)):
        raise BadHealthMessage("bad stop")
    return Stop(seq, epoch, step, rule)


def decode(frames: list, run: str) -> State | Finding | Stop:
    """One message for ``run``, every field checked; ``BadHealthMessage`` otherwise (a
    message for another run is one too)."""
    if len(frames) != 2 or bytes(frames[0]) != topic(run):
        raise BadHealthMessage("not two frames under this run's topic")
    try:
        m = msgpack.unpackb(frames[1], raw=False, strict_map_key=True)
    except Exception:  # msgpack raises several unrelated types on junk
        raise BadHealthMessage("bad msgpack") from None
    if type(m) is not list or len(m) < 4 or type(m[0]) is not int or m[0] != VERSION \
            or m[2] != run or len(run) > MAX_RUN_LEN:
        raise BadHealthMessage("bad header")
    kind, rest = m[1], m[3:]
    if type(kind) is int and kind == KIND_FINDING and len(rest) == 7:
        return _finding(*rest)
    if type(kind) is int and kind == KIND_STOP and len(rest) == 4:
        return _stop(rest)
    if type(kind) is not int or kind != KIND_STATE or len(rest) != 5:
        raise BadHealthMessage("bad kind or length")
    seq, epoch, level, raised, stop = rest
    if not (_count(seq) and _epoch(epoch) and level in LEVELS) or type(raised) is not list \
            or len(raised) > MAX_RAISED:
        raise BadHealthMessage("bad state")
    found = []
    for r in raised:
        if type(r) is not list or len(r) != 6:
            raise BadHealthMessage("bad raised finding")
        s, e, rule, severity, message, remedy = r
        found.append(_finding(s, e, rule, RAISED, severity, message, remedy))
    return State(seq, epoch, level, tuple(found), None if stop is None else _stop(stop))
