"""JSON Lines sink: one record per line, deterministic (sorted keys, non-finite -> null).

    sink = JsonlSink("run.jsonl")                 # a new file
    sink = JsonlSink("run.jsonl", resume=True)    # a restarted collector: each record once
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from collector.records import Record

__all__ = ["JsonlSink", "MemorySink", "clean", "dumps"]

_log = logging.getLogger("trainwatch.jsonl")


def clean(v: Any) -> Any:
    """JSON has no NaN/Inf: they become null, so every line parses anywhere. (Values are
    plain already: the state made them so at the door, ``records.plain``.)"""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: clean(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [clean(x) for x in v]
    if hasattr(v, "item"):  # a numpy scalar
        return clean(v.item())
    return v


def dumps(record: Record) -> str:
    """A record's one JSON line (what the report reads, too)."""
    return json.dumps(clean(record.json()), sort_keys=True, separators=(",", ":"),
                      allow_nan=False)


class JsonlSink:
    """Appends records to a file, a line each, handed to the OS at every ``flush()``.

    With ``resume`` (a collector restarted on its recording), the lines already in the
    file are kept and the same records, rebuilt from the recording in the same order,
    are not written again: the file holds each record exactly once. A line cut off by a
    crash is dropped first; it is rebuilt like any other.
    """

    def __init__(self, path: str | Path, resume: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._have: list[int] = _whole_lines(self.path) if resume else []
        self._next = 0  # how many of ``_have`` the rebuilt records have matched
        self.mismatched = 0  # rebuilt records that differ from the file's lines
        self._fh = open(self.path, "a" if resume else "w", encoding="utf-8")  # noqa: SIM115
        self._buf: list[str] = []

    def write(self, record: Record) -> None:
        line = dumps(record)
        if self._next < len(self._have):
            if hash(line) != self._have[self._next]:
                self.mismatched += 1
                if self.mismatched == 1:
                    _log.warning("%s: line %d differs from its rebuilt record; the file keeps "
                                 "the old line", self.path, self._next + 1)
            self._next += 1
            return
        self._buf.append(line + "\n")

    def flush(self) -> None:
        if self._buf:
            self._fh.write("".join(self._buf))
            self._fh.flush()
            self._buf.clear()

    def close(self, timeout_s: float = 10.0) -> None:
        if not self._fh.closed:
            self.flush()
            self._fh.close()


def _whole_lines(path: Path) -> list[int]:
    """Hashes of the file's whole lines; a cut-off last line is truncated away."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    end = raw.rfind(b"\n") + 1
    if end < len(raw):
        with open(path, "r+b") as fh:
            fh.truncate(end)
    return [hash(line.decode("utf-8", "replace")) for line in raw[:end].splitlines()]


class MemorySink:
    """Keeps the records in a list (for the report and for callers that want them in hand)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        self.records.append(record)

    def json(self) -> list[dict]:
        """The records' JSON form, exactly as the JSONL sink writes them."""
        return [json.loads(dumps(r)) for r in self.records]

    def flush(self) -> None:
        pass

    def close(self, timeout_s: float = 10.0) -> None:
        pass
