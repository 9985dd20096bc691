"""JSON Lines sink: one record per line, deterministic (sorted keys, non-finite -> null).

    sink = JsonlSink("run.jsonl")        # appends; see ``skip`` for a restarted collector
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from collector.records import Record

__all__ = ["JsonlSink", "MemorySink", "clean", "dumps"]


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
    """Appends records to a file; each line is flushed so ``tail -f`` follows it live."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: Record) -> None:
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()

    def close(self, timeout_s: float = 10.0) -> None:
        if not self._fh.closed:
            self._fh.close()


class MemorySink:
    """Keeps the records in a list (for the report and for callers that want them in hand)."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def write(self, record: Record) -> None:
        self.records.append(record)

    def json(self) -> list[dict]:
        """The records' JSON form, exactly as the JSONL sink writes them."""
        return [json.loads(dumps(r)) for r in self.records]

    def close(self, timeout_s: float = 10.0) -> None:
        pass
