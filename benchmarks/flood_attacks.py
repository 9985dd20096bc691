"""``make reliability``'s attacks on the collector's bounds: each against a real collector,
with a real training rank beside it that must lose nothing.

    c = Check("attack: world-size bomb"); check_world_size_bomb(tmp, c)   # c.figures, ...
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import harness
import numpy as np
from attacks import _beside, _losses, _wait_summary

from trainer_client import wire

__all__ = ["check_run_flood", "check_sample_hoard", "check_twin_ranks",
           "check_world_size_bomb"]


def _finish(c: Any, col: harness.CollectorProc, rank: Any, out: Path, run: str,
            losses: bool = True, forged: int = 0) -> None:
    """Wait for the rank and its run's summary, stop the collector; the rank's losses (the
    rank's count holds ``forged`` messages of the attacker's instance too)."""
    code = harness.wait_all([rank], 180)[0]
    ok = _wait_summary(col, run)
    col.kill(15)
    c.need(code == 0 and ok and col.wait(60) == 0, f"rank exit {code}, summary {ok}")
    if not losses:  # (two processes on one rank have no one client's stats to hold it to)
        return
    info = harness.inspect(col.record)
    info["runs"][run]["ranks"]["0"]["messages"] -= forged
    _losses(c, info, run, out)


def check_world_size_bomb(tmp: Path, c: Any) -> None:
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--epoch-timeout", "30").start()
    rank, out = _beside(col, tmp, "bomb-victim")
    s = harness.Sender(col.endpoint)
    for seq in range(300):  # every one claims 2^20 ranks, ~30 KB of names each
        s.send(wire.KIND_STEP, "bomb", [0.5, 1.0, ["x" * 100] * 300, [0.0] * 300], rank=seq,
               world=1 << 20, seq=seq)
    s.send(wire.KIND_HELLO, "bomb-victim", {"host": "forger", "env": {}}, world=5000, inst=9)
    s.close()
    _finish(c, col, rank, out, "bomb-victim", forged=1)
    recs = col.records()
    lines = col.jsonl.read_text().splitlines()
    notes = [e["rule"] for r in recs for e in r["events"] if e["rule"].startswith("ingest/")]
    info = harness.inspect(col.record)
    c.figures = {"refused": info["rejected_live"].get("world_size_over_limit", 0),
                 "longest_jsonl_line": max(map(len, lines)),
                 "jsonl_bytes": sum(map(len, lines)), "notes": sorted(set(notes))}
    c.need(c.figures["refused"] == 300, "the bomb was not refused whole")
    c.need(c.figures["longest_jsonl_line"] < 20_000, "an epoch line grew with the world")
    c.need("ingest/world_size" in notes, "the forged world size was not said")


def check_sample_hoard(tmp: Path, c: Any) -> None:
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--max-held-mb", "64",
                                "--epoch-timeout", "30").start()
    rank, out = _beside(col, tmp, "hoard-victim")
    base = harness.rss_kb(col.pid) or 0
    s = harness.Sender(col.endpoint)
    arr = np.zeros((64, 256, 128), np.float32)  # 8 MiB each, for epochs that never close
    for i in range(40):
        s.send(wire.KIND_VALIDATION, "hoarder", {"epoch": 10_000 + i}, seq=i,
               tensors=(wire.Tensor("samples", "float32", arr.shape, arr.tobytes()),))
    s.close()
    deadline = time.monotonic() + 60
    while "over_budget" not in col.jsonl.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)
    held = harness.rss_kb(col.pid) or 0
    _finish(c, col, rank, out, "hoard-victim")
    info = harness.inspect(col.record)
    c.figures = {"sent_mb": 320, "budget_mb": 64, "rss_growth_mb": round((held - base) / 1024),
                 "refused": info["rejected_live"].get("over_budget", 0)}
    c.need(c.figures["rss_growth_mb"] < 64 + 48, "the collector held more than its budget")
    c.need(c.figures["refused"] >= 32, "samples over the budget were not refused")


def check_run_flood(tmp: Path, c: Any) -> None:
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--max-runs", "60",
                                "--evict-after", "0.5").start()
    rank, out = _beside(col, tmp, "flood-victim", steps=300)
    base = harness.rss_kb(col.pid) or 0
    s = harness.Sender(col.endpoint)
    n = 0
    for wave in range(10):  # 500 runs, 50 at a time: each wave fits only if the last left
        for i in range(50):
            run = f"flood-{wave}-{i}"
            s.send(wire.KIND_HELLO, run, {"host": "h", "env": {}})
            s.send(wire.KIND_BYE, run, {}, seq=1)
            n += 1
        deadline = time.monotonic() + 30
        while col.jsonl.read_text().count('"type":"summary"') < n and \
                time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
    s.close()
    grown = ((harness.rss_kb(col.pid) or 0) - base) / 1024
    _finish(c, col, rank, out, "flood-victim")
    summaries = col.jsonl.read_text().count('"type":"summary"')
    c.figures = {"runs": n, "finished": summaries - 1, "rss_growth_mb": round(grown, 1),
                 "too_many_runs": "too_many_runs" in col.log_text()}
    c.need(summaries - 1 == n, "not every flood run was finished")
    c.need(not c.figures["too_many_runs"], "evicted runs did not make room")


def check_twin_ranks(tmp: Path, c: Any) -> None:
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--epoch-timeout", "30").start()
    rank, out = _beside(col, tmp, "twin", steps=600)  # still training when the twin starts
    twin = harness.start_rank(col.endpoint, "twin", 0, 1, tmp / "twin2.json", steps=150,
                              steps_per_epoch=30, val_every=0, step_sleep=0.02)
    harness.wait_all([twin], 180)
    _finish(c, col, rank, out, "twin", losses=False)
    recs = col.records()
    summary = next(r["metrics"] for r in recs if r["type"] == "summary")
    notes = [e["message"] for r in recs for e in r["events"] if e["rule"] == "ingest/instances"]
    c.figures = {"seq_gaps": summary["summary/seq_gaps"], "notes": len(notes)}
    c.need(summary["summary/seq_gaps"] == 0, "two processes on one rank made false gaps")
    c.need(len(notes) == 1, "the second process on the rank was not named")
