"""Health events as console lines on the collector, one per rule start or clear."""

from __future__ import annotations

import logging

from collector.sinks.base import Record

_log = logging.getLogger("trainwatch.health")


class EventLogSink:
    def write(self, record: Record) -> None:
        for ev in record.get("events", ()):
            level = logging.INFO if ev.get("severity") == "info" else logging.WARNING
            where = f"epoch {record.get('epoch')}" if record.get("epoch") is not None else ""
            remedy = f" -> {ev['remedy']}" if ev.get("remedy") else ""
            _log.log(level, "[%s] %s %s: %s%s", record.get("run"), where, ev.get("rule"),
                     ev.get("message"), remedy)
        if record.get("type") == "summary":
            _log.info("[%s] run finished: %s", record.get("run"),
                      ", ".join(f"{k.split('/', 1)[1]}={v}"
                                for k, v in sorted(record.get("metrics", {}).items())
                                if v is not None))

    def close(self, timeout_s: float = 10.0) -> None:
        pass
