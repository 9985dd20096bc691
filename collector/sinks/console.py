"""Health events as console lines on the collector: one per rule raised or cleared, and one
per stop decided.

Run ids and event messages (which quote config values and host names) come from the
senders: ``printable`` keeps each event one line of visible text.
"""

from __future__ import annotations

import logging

from collector.records import (
    CLEARED,
    EpochRecord,
    EventRecord,
    Record,
    StopRecord,
    SummaryRecord,
)
from collector.text import printable

__all__ = ["EventLogSink"]

_log = logging.getLogger("trainwatch.health")


class EventLogSink:
    def write(self, record: Record) -> None:
        if isinstance(record, EpochRecord | EventRecord):
            where = f"epoch {record.epoch}"
            for ev in record.events:
                level = logging.INFO if ev.kind == CLEARED else logging.WARNING
                remedy = f" -> {ev.remedy}" if ev.remedy else ""
                _log.log(level, "[%s] %s %s: %s%s", printable(record.run), where,
                         printable(ev.rule), printable(ev.message), printable(remedy))
        elif isinstance(record, StopRecord):
            _log.warning("[%s] epoch %d: stop at step %d (%s); the ranks had reported up to "
                         "step %d, %.3g steps/s", printable(record.run), record.epoch,
                         record.step, printable(record.rule), record.seen, record.steps_per_s)
        elif isinstance(record, SummaryRecord):
            _log.info("[%s] run %s: %s", printable(record.run), record.ended,
                      ", ".join(f"{k.split('/', 1)[1]}={v}"
                                for k, v in sorted(record.metrics.items()) if v is not None))

    def flush(self) -> None:
        pass

    def close(self, timeout_s: float = 10.0) -> None:
        pass
