"""Hostile inputs beyond the wire's junk: crafted recordings and run ids that forge logs.

    frames = crafted_controls("r")            # CONTROL bodies a file may hold, all invalid
    write_recording(path, "r", frames)        # a real short run with them in between
    for run in HOSTILE_RUN_IDS: ...           # newlines, NUL, escapes, bidi overrides

Every crafted control crashed ``inspect``, ``replay``, ``report``, ``upload`` or a
collector's rebuild once (AttributeError, TypeError, KeyError, IndexError) or would have
reached the state unchecked; each has a valid checksum, as anyone can write.
"""

from __future__ import annotations

from pathlib import Path

import msgpack

from collector.recording.format import CONTROL, MAGIC, MESSAGE, pack_record
from trainer_client import wire

__all__ = ["FORGED_LINE", "HOSTILE_RUN_IDS", "crafted_control_bodies", "crafted_controls",
           "session", "write_recording"]

FORGED_LINE = "\n2026-01-01 00:00:00,000 trainwatch.health WARNING [victim] epoch 1 forged: lies"
HOSTILE_RUN_IDS = [
    "run" + FORGED_LINE, "a\rb", "nul\x00byte", "esc\x1b[2J\x1b[31mred", "tab\there",
    "rtl\u202eexe.txt", "iso\u2066late\u2069", "zw\u200bsp", "line\u2028sep", "bom\ufeff",
    "back\\slash", "del\x7f", "c1\x85next",
]


def crafted_control_bodies(run: str) -> list[object]:
    """Unpacked CONTROL bodies, every one invalid (``collector.recording.controls``)."""
    return [
        {"op": "rejects", "counts": 5},
        {"op": "rejects", "counts": {run: 5}},
        {"op": "rejects", "counts": {run: {"bad_kind": "many"}}},
        {"op": "rejects", "counts": {run: {"bad_kind": -3}}},
        {"op": "rejects", "counts": {run: {"bad_kind": True}}},
        {"op": "rejects", "counts": {run: {"": 1}}},
        {"op": "rejects", "counts": {run: {"bad_kind": 1 << 63}}},
        {"op": "rejects"},
        {"op": "close_epoch", "run": run},
        {"op": "close_epoch", "run": [run], "epoch": 1, "missing": []},
        {"op": "close_epoch", "run": run, "epoch": [1], "missing": []},
        {"op": "close_epoch", "run": run, "epoch": 1.0, "missing": []},
        {"op": "close_epoch", "run": run, "epoch": -1, "missing": []},
        {"op": "close_epoch", "run": run, "epoch": 1, "missing": "all"},
        {"op": "close_epoch", "run": run, "epoch": 1, "missing": [[3, 1]]},
        {"op": "close_epoch", "run": run, "epoch": 1, "missing": [wire.MAX_WORLD]},
        {"op": "close_epoch", "run": "x" * (wire.MAX_RUN_LEN + 1), "epoch": 1, "missing": []},
        {"op": "finish_run"},
        {"op": "finish_run", "run": {"a": 1}},
        {"op": "finish_run", "run": run, "and": "more"},
        {"op": "evict_everything", "run": run},
        {"op": "stop_run", "run": run, "rule": "r", "step": 10, "seen": 11, "rate": 1.0},
        {"op": "stop_run", "run": run, "rule": "r", "step": 10, "seen": 5, "rate": 1},
        {"op": "stop_run", "run": run, "rule": "r", "step": 10, "seen": 5, "rate": float("nan")},
        {"op": "stop_run", "run": run, "rule": "", "step": 10, "seen": 5, "rate": 1.0},
        {"op": "stop_run", "run": run, "rule": "r", "step": True, "seen": 0, "rate": 1.0},
        {"op": "stop_run", "run": run, "rule": "r", "step": 10, "seen": 5},
        {"op": ["rejects"], "counts": {}},
        {b"op": "finish_run", b"run": run},
        [1, 2, 3], "rejects", None, 7,
    ]


def crafted_controls(run: str) -> list[list[bytes]]:
    """Frames of CONTROL records: the bodies above, and frames no control can be."""
    return [[msgpack.packb(c)] for c in crafted_control_bodies(run)] + [
        [b"\xc1"], [], [msgpack.packb({"op": "finish_run", "run": run})] * 2,
        [msgpack.packb({"op": "finish_run"}) + b"trailing"]]


def _msg(run: str, kind: int, seq: int, body: object, epoch: int = 0, step: int = 0
         ) -> list[bytes]:
    h = wire.Header(kind, run, 0, 1, 77, seq, step, epoch, 1.7e9 + seq, 0, body)
    return [bytes(f) for f in wire.encode(h, [])]


def session(run: str, epochs: int = 3, steps: int = 12) -> list[list[bytes]]:
    """A short real run of one rank: hello, ``epochs`` epochs of ``steps`` steps, goodbye."""
    out, seq = [_msg(run, wire.KIND_HELLO, 0, {"host": "h", "pid": 1})], 1
    for epoch in range(1, epochs + 1):
        for s in range(steps):
            loss = 1.0 / (epoch * steps + s)
            out.append(_msg(run, wire.KIND_STEP, seq, [loss, 0.5, ["a", "b"], [loss, 0.1]],
                            epoch, (epoch - 1) * steps + s))
            seq += 1
        out.append(_msg(run, wire.KIND_EPOCH, seq, {}, epoch))
        seq += 1
    out.append(_msg(run, wire.KIND_BYE, seq, {}, epochs))
    return out


def write_recording(path: Path, run: str, controls: list[list[bytes]], every: int = 1
                    ) -> Path:
    """The session's messages with the CONTROL ``controls`` in between, every ``every``
    messages after the hello and before the goodbye (the rest at the end)."""
    msgs = session(run)
    recs, left = [MAGIC], list(controls)
    for i, frames in enumerate(msgs):
        recs.append(pack_record(MESSAGE, frames))
        if i and i % every == 0 and left and i < len(msgs) - 1:
            recs.append(pack_record(CONTROL, left.pop(0)))
    recs += [pack_record(CONTROL, f) for f in left]
    Path(path).write_bytes(b"".join(recs))
    return Path(path)
