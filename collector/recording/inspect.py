"""``trainwatch inspect``: what a recording holds, per run and rank, without the rules.

Counts come from the same ``RankCounters`` the live collector keeps, so the figures
agree with what the collector reported.
"""

from __future__ import annotations

import time
from pathlib import Path

from collector.ingest.counters import RankCounters
from collector.recording import controls
from collector.recording.format import CONTROL, MESSAGE
from collector.recording.reader import ReadStats, read_records
from collector.text import printable
from trainer_client import wire


def inspect_recording(path: str | Path) -> dict:
    """``{"runs": {run: {"ranks": {rank: counters}}}, "records": n, "corrupted": n, ...}``."""
    st = ReadStats()
    ranks: dict[str, dict[int, RankCounters]] = {}
    rejects: dict[str, int] = {}
    undecodable = 0
    for rtype, frames in read_records(path, st):
        if rtype == CONTROL:
            ctl = controls.parse(frames)
            if ctl is None:
                st.bad_controls += 1
            elif isinstance(ctl, controls.Rejects):
                for reasons in ctl.counts.values():
                    for reason, n in reasons.items():
                        rejects[reason] = rejects.get(reason, 0) + n
            continue
        if rtype != MESSAGE:
            continue
        try:
            m = wire.decode(frames)
        except wire.DecodeError:
            undecodable += 1
            continue
        c = ranks.setdefault(m.run, {}).setdefault(m.rank, RankCounters()).stream(m.instance)
        if c.admit(m.seq):
            c.count(m.kind, m.seq, m.dropped, m.wall_time)
    return {
        "runs": {run: {"ranks": {r: c.as_dict() for r, c in sorted(rs.items())}}
                 for run, rs in ranks.items()},
        "records": st.records,
        "corrupted": st.corrupted,
        "truncated_bytes": st.truncated_bytes,
        "undecodable": undecodable,
        "bad_controls": st.bad_controls,
        "unknown_types": st.unknown_types,
        "rejected_live": rejects,
    }


def format_table(info: dict) -> str:
    def ts(t: float | None) -> str:
        return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

    lines = [f"{'run':<28} {'rank':>4} {'msgs':>8} {'gaps':>6} {'drops':>6} "
             f"{'seq':>15}  first / last", "-" * 100]
    for run, r in info["runs"].items():
        shown = printable(run)
        for rank, c in r["ranks"].items():
            kinds = " ".join(f"{k}={n}" for k, n in c["by_kind"].items())
            lines.append(f"{shown[:28]:<28} {rank:>4} {c['messages']:>8} {c['seq_gaps']:>6} "
                         f"{c['reported_drops']:>6} {c['first_seq']!s:>7}-{c['last_seq']:<7} "
                         f"{ts(c['first_time'])} / {ts(c['last_time'])}")
            lines.append(f"{'':<34}{kinds}")
    rejected = {printable(k): n for k, n in info["rejected_live"].items()}
    lines.append(f"records {info['records']}, corrupted {info['corrupted']}, truncated bytes "
                 f"{info['truncated_bytes']}, bad controls {info['bad_controls']}, unknown "
                 f"types {info['unknown_types']}, undecodable {info['undecodable']}, rejected "
                 f"live {rejected or 0}")
    return "\n".join(lines)
