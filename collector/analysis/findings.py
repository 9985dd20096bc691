"""When each rule was raised and cleared in a run: a profile's backtest on recorded runs.

Reads the typed records (``collector.records``) a replay produced, so what it says is what
every sink saw; ``trainwatch replay REC... --rules FILE.toml --findings`` prints it:

    episodes = findings(records)              # run -> [Episode, ...] in the order raised
    print(format_findings(records))

An episode starts at a raise event (of an epoch record, or of an event record between
epochs: a non-finite step) and ends at that rule's next clear event; one still raised at
the run's last epoch has no end.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from collector.records import RAISED, EpochRecord, EventRecord, Record

__all__ = ["Episode", "findings", "format_findings"]


@dataclass
class Episode:
    rule: str
    severity: str
    raised: int  # epoch
    message: str
    step: int | None = None  # for a raise between epochs (rank too)
    rank: int | None = None
    cleared: int | None = None  # epoch; None while still raised


def findings(records: Iterable[Record]) -> dict[str, list[Episode]]:
    """Per run (in the order runs appear), its rules' episodes in the order raised."""
    out: dict[str, list[Episode]] = {}
    open_: dict[tuple[str, str], Episode] = {}
    for rec in records:
        if not isinstance(rec, EpochRecord | EventRecord):
            continue
        episodes = out.setdefault(rec.run, [])
        for ev in rec.events:
            key = (rec.run, ev.rule)
            if ev.kind == RAISED:
                if key in open_:
                    continue  # raised already (an amended epoch says so again)
                step = rec.step if isinstance(rec, EventRecord) else None
                rank = rec.rank if isinstance(rec, EventRecord) else None
                open_[key] = Episode(ev.rule, ev.severity, rec.epoch, ev.message, step, rank)
                episodes.append(open_[key])
            elif key in open_:
                open_.pop(key).cleared = rec.epoch
    return out


def _last_epochs(records: Iterable[Record]) -> dict[str, int]:
    last: dict[str, int] = {}
    for rec in records:
        if isinstance(rec, EpochRecord):
            last[rec.run] = max(rec.epoch, last.get(rec.run, rec.epoch))
    return last


def format_findings(records: list[Record]) -> str:
    """One block per run: each rule's episodes, ``raised E -> cleared E`` or ``still
    raised``, with the message it was raised with."""
    found, last = findings(records), _last_epochs(records)
    lines: list[str] = []
    for run, episodes in found.items():
        lines.append(f"run {run}: {last.get(run, 0)} epochs, "
                     f"{len(episodes)} raise{'s' if len(episodes) != 1 else ''}")
        if not episodes:
            lines.append("  no rule raised")
        by_rule: dict[str, list[Episode]] = {}
        for ep in episodes:
            by_rule.setdefault(ep.rule, []).append(ep)
        width = max((len(r) for r in by_rule), default=0)
        for rule, eps in by_rule.items():
            spans = []
            for ep in eps:
                at = f"epoch {ep.raised}" + (f" (step {ep.step}, rank {ep.rank})"
                                             if ep.step is not None else "")
                end = f"cleared at epoch {ep.cleared}" if ep.cleared is not None \
                    else "still raised at the end"
                spans.append(f"raised at {at}, {end}")
            lines.append(f"  {rule:<{width}}  {eps[0].severity:<8}  {'; '.join(spans)}")
            lines.append(f"  {'':<{width}}  {'':<8}  first: {eps[0].message}")
    return "\n".join(lines)
