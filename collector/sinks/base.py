"""Where the collector's records go: JSONL, wandb, the console.

A record is a plain dict, the same for every sink and for live and replay:

    {"type": "config" | "data_stats" | "epoch" | "event" | "summary",
     "run": str, "epoch": int | None, "metrics": {name: number}, "events": [event, ...]}

An event is ``{"rule", "severity", "message", "remedy"}``. Epoch records also carry
``"ranks"`` and ``"missing_ranks"``.

A sink implements ``write(record)`` and ``close(timeout_s)``. ``FanOut`` keeps one failing
sink from hurting the others or the ingest loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

Record = dict[str, Any]

__all__ = ["FanOut", "NullSink", "Record", "Sink"]

_log = logging.getLogger("trainwatch.sinks")


class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self, timeout_s: float = 10.0) -> None: ...


class NullSink:
    """A sink that does nothing, so callers never ask whether output is on."""

    def write(self, record: Record) -> None:
        pass

    def close(self, timeout_s: float = 10.0) -> None:
        pass


class FanOut:
    """Writes each record to every sink; a sink's exception is logged (rate-limited) and counted."""

    def __init__(self, sinks: list[Sink], log_every_s: float = 10.0) -> None:
        self.sinks = list(sinks)
        self.errors: dict[str, int] = {}
        self._log_every_s = log_every_s
        self._last_log: dict[str, float] = {}

    def write(self, record: Record) -> None:
        for sink in self.sinks:
            try:
                sink.write(record)
            except Exception:
                self._failed(sink, "write")

    def close(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        for sink in self.sinks:
            try:
                sink.close(max(0.0, deadline - time.monotonic()))
            except Exception:
                self._failed(sink, "close")

    def _failed(self, sink: Sink, what: str) -> None:
        name = type(sink).__name__
        self.errors[name] = self.errors.get(name, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(name, -1e9) >= self._log_every_s:
            self._last_log[name] = now
            _log.exception("sink %s failed in %s (%d failures so far)", name, what,
                           self.errors[name])
