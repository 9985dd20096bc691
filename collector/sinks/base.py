"""The sink contract: what every output of the collector implements.

A sink takes the typed records of ``collector.records`` (the same for every sink, live and
in replay) with ``write(record)``; ``flush()`` hands what it buffered on (the pipeline
calls it after the recording's flush, so no output gets ahead of the durable log), and
``close(timeout_s)`` ends it within that time.
``NullSink`` does nothing, so callers never ask whether output is on; ``FanOut`` keeps one
failing sink from hurting the others or the ingest loop.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from collector.records import Record

__all__ = ["FanOut", "NullSink", "Sink"]

_log = logging.getLogger("trainwatch.sinks")


class Sink(Protocol):
    def write(self, record: Record) -> None: ...

    def flush(self) -> None: ...

    def close(self, timeout_s: float = 10.0) -> None: ...


class NullSink:
    """A sink that does nothing, so callers never ask whether output is on."""

    def write(self, record: Record) -> None:
        pass

    def flush(self) -> None:
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

    def flush(self) -> None:
        for sink in self.sinks:
            try:
                sink.flush()
            except Exception:
                self._failed(sink, "flush")

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
