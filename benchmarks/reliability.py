"""``make reliability``: load, faults, bad inputs and losses, on real processes; one table.

    python benchmarks/reliability.py [--keep]

Checks, each bounded in time (the whole run takes a few minutes on 2 cores):

- load held: a short soak (benchmarks/soak.py) - messages/s, messages lost;
- collector killed: SIGKILL mid-run, restarted on the same endpoint and recording - the
  rank goes on unblocked, the recording reads to its last whole record, the run ends;
- rank dies: a rank exits without goodbye - the epochs still close after
  ``--epoch-timeout``, naming the missing rank, and the run ends with a summary;
- disk full: ``--record /dev/full`` - ingest, rules and the JSONL sink go on, and the
  unrecorded count is reported;
- forked DataLoader workers (fork, 2 workers) beside the client - the parent keeps
  sending, the children send nothing;
- bad inputs: junk of every kind (benchmarks/junk.py) over a raw PUSH socket to a live
  collector - every message rejected for the reason it deserves, the counts in the
  recording (``rejected_live``) and the run's ``summary/rejected`` exact, NaN/Inf losses
  accepted as data and reported by the rules, and the collector still standing;
- attacks, each with a real training rank beside it that must lose nothing
  (benchmarks/attacks.py): the bind guard's source-address bypass and other exposed
  forms refused in one line (nothing listens); a disk that fills mid-run (a small tmpfs)
  with exact accounting against what ``inspect`` reads back; a restart on a recording of
  crafted CONTROL records, skipped and counted by every command; run ids that try to
  forge log lines, escaped in the log and on the board; and on the bounds
  (benchmarks/flood_attacks.py): a world-size bomb refused and a forged hello noted, 320
  MiB of samples for epochs that never close held to a 64 MiB budget, 500 run ids finished
  and evicted under a 60-run cap, two processes on one rank counted true and named;
- messages lost: over every check where the collector stayed up, sequence gaps against
  the drops the clients reported.

Writes ``reliability-results.json`` in the current folder; exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import attacks  # noqa: E402 - the benchmarks folder is not a package
import flood_attacks  # noqa: E402
import harness  # noqa: E402
import junk  # noqa: E402
import soak  # noqa: E402


@dataclass
class Check:
    name: str
    passed: bool = False
    figures: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    losses: dict = field(default_factory=dict)  # rank table, for the messages-lost row

    def need(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)


def _rank_outs(outs: dict[int, Path]) -> dict[int, dict | None]:
    return {r: harness.read_json(p) for r, p in outs.items()}


def _epochs(records: list[dict]) -> list[dict]:
    return [r for r in records if r["type"] == "epoch"]


def _summary(records: list[dict]) -> dict | None:
    return next((r for r in records if r["type"] == "summary"), None)


# -- the checks ------------------------------------------------------------------------------
def check_load(tmp: Path, c: Check) -> None:
    res = soak.run_soak(soak.SoakConfig(ranks=2, duration_s=15.0, steps_per_epoch=50), tmp)
    lost = sum(row["lost_beyond_reported"] or 0 for row in res["losses"].values())
    c.figures = {"msgs_per_s": round(res["msgs_per_s_handled"]), "messages": res["messages"],
                 "lost": lost, "p99_call_us": round(
                     res["client_call_s"]["all log_* calls"]["p99"] * 1e6),
                 "rss_growth_pct": round(res["rss"].get("growth_pct", 0.0), 1)}
    c.losses = {f"load/{r}": row for r, row in res["losses"].items()}
    c.problems += res["problems"]


def check_collector_killed(tmp: Path, c: Check) -> None:
    from collector.recording.reader import ReadStats, read_records

    ep = harness.free_tcp()
    rec = tmp / "run.twrec"
    first = harness.CollectorProc(tmp, ep, "--epoch-timeout", "30", name="first",
                                  record=rec).start()
    out = tmp / "rank0.json"
    rank = harness.start_rank(ep, "killed", 0, 1, out, steps=400, steps_per_epoch=50,
                              step_sleep=0.01, val_every=2, duration_s=90)
    procs = [rank]
    try:
        deadline = time.monotonic() + 60
        while len(_epochs(first.records())) < 3 and time.monotonic() < deadline \
                and rank.poll() is None:
            time.sleep(0.05)  # kill it mid-run: 3 of 8 epochs closed
        first.kill(signal.SIGKILL)
        snap = tmp / "at_kill.twrec"
        shutil.copy(rec, snap)
        time.sleep(1.0)  # the rank trains on with nobody listening
        second = harness.CollectorProc(tmp, ep, "--once", "--quiet", "1", "--epoch-timeout",
                                       "30", name="second", record=rec).start()
        code = harness.wait_all(procs, 150)[0]
        col_code = second.wait(60)
    finally:
        harness.reap(procs)
    st_snap, st_all = ReadStats(), ReadStats()
    n_snap = sum(1 for _ in read_records(snap, st_snap))
    sum(1 for _ in read_records(rec, st_all))
    res = harness.read_json(out)
    info = harness.inspect(rec)
    r0 = info["runs"].get("killed", {}).get("ranks", {}).get("0", {})
    steps = res["calls"]["step"] if res else []
    epochs = sorted({e["epoch"] for e in _epochs(first.records()) + _epochs(second.records())})
    c.figures = {"records_at_kill": n_snap, "torn_bytes_at_kill": st_snap.truncated_bytes,
                 "corrupted": st_all.corrupted, "messages": r0.get("messages"),
                 "client_dropped": res and res["stats"]["dropped"],
                 "lost_in_kill": r0.get("seq_gaps", 0) - r0.get("reported_drops", 0),
                 "max_call_ms": round(max(steps, default=0) * 1e3, 1),
                 "epochs_closed": len(epochs)}
    c.need(code == 0, f"rank exit {code}")
    c.need(col_code == 0, f"restarted collector exit {col_code}")
    c.need(n_snap > 0 and st_snap.corrupted == 0,
           f"the recording at the kill: {n_snap} records, {st_snap.corrupted} corrupted")
    c.need(st_all.corrupted == 0, f"{st_all.corrupted} corrupted records after the restart")
    c.need(r0.get("by_kind", {}).get("bye") == 1, "the goodbye is not in the recording")
    c.need(r0.get("seq_gaps", 0) >= r0.get("reported_drops", 0), "a reported drop is no gap")
    c.need(_summary(second.records()) is not None, "the restarted collector wrote no summary")
    c.need(max(steps, default=1.0) < 0.5, "a log call waited on the dead collector")


def check_rank_dies(tmp: Path, c: Check) -> None:
    timeout_s = 2.0
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1",
                                "--epoch-timeout", str(timeout_s)).start()
    outs = {r: tmp / f"rank{r}.json" for r in range(3)}
    procs = [harness.start_rank(col.endpoint, "dies", r, 3, outs[r], steps=120,
                                steps_per_epoch=30, val_every=0,
                                die_after_epoch=1 if r == 2 else None) for r in range(3)]
    try:
        codes = harness.wait_all(procs, 150)
        col_code = col.wait(60)
        t_exit = time.time()
    finally:
        harness.reap(procs)
    recs = col.records()
    epochs = _epochs(recs)
    later = [e for e in epochs if e["epoch"] > 1]
    summ = _summary(recs)
    info = harness.inspect(col.record)
    last_msg = max(c["last_time"] for c in info["runs"]["dies"]["ranks"].values())
    c.figures = {"epochs": [e["epoch"] for e in epochs],
                 "missing": sorted({r for e in epochs for r in e["missing_ranks"]}),
                 # epoch timeout, then the run is declared over, then --quiet
                 "ended_s_after_last_msg": round(t_exit - last_msg, 1),
                 "summary_missing_ranks": summ and summ["metrics"].get("summary/missing_ranks")}
    c.losses = {f"dies/{r}": row for r, row in harness.losses_per_rank(
        info, "dies", _rank_outs(outs)).items()}
    c.need(codes == [0, 0, 0], f"rank exits {codes}")
    c.need(col_code == 0, f"collector exit {col_code}")
    c.need([e["epoch"] for e in epochs] == [1, 2, 3, 4], "epochs 1-4 did not each close once")
    c.need(bool(later) and all(e["missing_ranks"] == [2] for e in later),
           "epochs after the death do not name rank 2 as missing")
    c.need(summ is not None and summ["metrics"].get("summary/missing_ranks") == 1,
           "no summary naming one missing rank")


def check_disk_full(tmp: Path, c: Check) -> None:
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1",
                                record="/dev/full", view=True).start()
    outs = {r: tmp / f"rank{r}.json" for r in range(2)}
    procs = [harness.start_rank(col.endpoint, "full", r, 2, outs[r], steps=90,
                                steps_per_epoch=30, val_every=1) for r in range(2)]
    try:
        codes = harness.wait_all(procs, 150)
        col_code = col.wait(60)
    finally:
        harness.reap(procs)
    recs = col.records()
    epochs = _epochs(recs)
    summ = _summary(recs)
    results = _rank_outs(outs)
    sent = sum(r["stats"]["sent"] for r in results.values() if r)
    dropped = sum(r["stats"]["dropped"] for r in results.values() if r)
    shown = re.findall(r"unrecorded=(\d+)", col.out_text())
    unrecorded = int(shown[-1]) if shown else None
    log = col.log_text()
    c.figures = {"epochs_in_jsonl": [e["epoch"] for e in epochs], "client_sent": sent,
                 "unrecorded_shown": unrecorded,
                 "count_in_log": bool(re.search(r"unrecorded\D{0,3}\d|\d+ unrecorded", log))}
    c.need(codes == [0, 0], f"rank exits {codes}")
    c.need(col_code == 0, f"collector exit {col_code}")
    c.need([e["epoch"] for e in epochs] == [1, 2, 3]
           and all(e["ranks"] == [0, 1] for e in epochs), "the JSONL lacks epochs")
    c.need(all(any(k.startswith("health/") for k in e["metrics"]) for e in epochs),
           "the rules did not run")
    c.need(summ is not None, "no summary")
    c.need("cannot write the recording" in log, "the write failure was not logged")
    c.need(unrecorded == sent, f"unrecorded shown {unrecorded}, clients sent {sent}")
    if summ is not None:
        gaps = summ["metrics"].get("summary/seq_gaps", 0)
        c.losses = {"full/all": {"lost_beyond_reported": 0, "gaps_minus_drops": gaps - dropped}}


def check_forked_workers(tmp: Path, c: Check) -> None:
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1").start()
    out = tmp / "rank0.json"
    procs = [harness.start_rank(col.endpoint, "forked", 0, 1, out, steps=90,
                                steps_per_epoch=30, val_every=0, loader_workers=2)]
    try:
        code = harness.wait_all(procs, 150)[0]
        col_code = col.wait(60)
    finally:
        harness.reap(procs)
    res = harness.read_json(out)
    info = harness.inspect(col.record)
    r0 = info["runs"].get("forked", {}).get("ranks", {}).get("0", {})
    made = {k: v for k, v in (res or {}).get("made", {}).items() if v}
    c.figures = {"parent_sent": res and res["stats"]["sent"], "recorded": r0.get("messages"),
                 "child_calls_refused": res and res["child_refused"],
                 "child_messages_queued": res and res["child_queued"],
                 "rejected": sum(info["rejected_live"].values())}
    c.losses = {f"forked/{r}": row for r, row in
                harness.losses_per_rank(info, "forked", {0: res}).items()}
    c.need(code == 0 and col_code == 0, f"exits: rank {code}, collector {col_code}")
    c.need(res is not None and r0.get("by_kind") == {**made, "bye": 1},
           f"recorded kinds {r0.get('by_kind')} != the parent's {made}")
    c.need(res is not None and r0.get("messages") == res["stats"]["sent"],
           "recorded != the parent's sent")
    c.need(r0.get("seq_gaps") == r0.get("reported_drops") == 0, "gaps or drops")
    c.need(not info["rejected_live"], f"rejected {info['rejected_live']}")
    c.need(bool(res) and res["child_refused"] > 0 and res["child_queued"] == 0,
           "the workers' log calls were not refused")


def check_bad_inputs(tmp: Path, c: Check, per_kind: int = 20) -> None:
    import zmq

    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1").start()
    script = junk.junk_script("junk", per_kind=per_kind, seed=7)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 5000)  # a dead collector must not hang the check
    push.connect(col.endpoint)
    try:
        for item in script:
            push.send_multipart(item.frames)
            if not col.alive():
                break
    except zmq.Again:
        c.problems.append("sending timed out")
    finally:
        push.close(linger=5000)
        ctx.term()
    col_code = col.wait(60)
    if col_code != 0:
        last = (col.log_text().strip().splitlines() or ["?"])[-1]
        c.problems.append(f"the collector died (exit {col_code}): {last[:200]}")
    recs = col.records()
    summ = _summary(recs)
    try:
        info = harness.inspect(col.record)
    except RuntimeError as exc:  # what killed the collector may be in its recording
        c.problems.append(str(exc)[:200])
        return
    want = junk.expected_rejects(script)
    got = info["rejected_live"]
    wrong = {k: (got.get(k, 0), want.get(k, 0)) for k in set(got) | set(want)
             if got.get(k, 0) != want.get(k, 0)}
    accepted = sum(1 for i in script if i.expect == junk.ACCEPT)
    r = info["runs"].get("junk", {}).get("ranks", {}).get("0", {})
    e2 = next((e for e in _epochs(recs) if e["epoch"] == 2), None)
    fired = any(ev.get("rule") == "nonfinite" for x in recs for ev in x.get("events", []))
    c.figures = {"junk_sent": len(script) - accepted, "kinds": len({i.kind for i in script}),
                 "rejected": sum(got.values()), "wrong_counts (got, want)": wrong,
                 "summary_rejected": summ and summ["metrics"].get("summary/rejected"),
                 "charged_to_run": junk.charged_to_run(script),
                 "nonfinite_flagged": bool(e2 and e2["metrics"].get("health/nonfinite") == 1)}
    # the junk used up sequence numbers: those gaps are its own, not losses
    c.losses = {"junk/0": {"lost_beyond_reported": accepted - r.get("messages", 0),
                           "gaps_minus_drops": r.get("seq_gaps", 0) - junk.expected_gaps(script)}}
    c.need(not wrong, f"reject counts by reason differ: {wrong}")
    c.need(summ is not None and summ["metrics"].get("summary/rejected")
           == junk.charged_to_run(script), "summary/rejected differs")
    c.need(r.get("messages") == accepted, f"{r.get('messages')} recorded, {accepted} valid")
    c.need(fired and c.figures["nonfinite_flagged"], "NaN/Inf losses were not reported")


def messages_lost(checks: list[Check]) -> Check:
    c = Check("messages lost")
    rows = {k: v for ch in checks for k, v in ch.losses.items()}
    beyond = sum(abs(r.get("lost_beyond_reported") or 0) for r in rows.values())
    unexplained = sum(abs(r.get("gaps_minus_drops") or 0) for r in rows.values())
    c.figures = {"streams": len(rows), "lost_beyond_reported": beyond,
                 "gaps_not_reported": unexplained}
    c.need(bool(rows), "no stream to judge")
    c.need(beyond == 0 and unexplained == 0, f"lost: {beyond}, unexplained gaps: {unexplained}")
    c.passed = not c.problems
    return c


CHECKS: list[tuple[str, Callable[[Path, Check], None]]] = [
    ("load held", check_load),
    ("fault: collector SIGKILLed + restarted", check_collector_killed),
    ("fault: rank dies without goodbye", check_rank_dies),
    ("fault: recording disk full", check_disk_full),
    ("fault: forked DataLoader workers", check_forked_workers),
    ("bad inputs rejected", check_bad_inputs),
    ("attack: bind guard bypass", attacks.check_bind_bypass),
    ("attack: disk fills mid-run", attacks.check_disk_fills),
    ("attack: crafted CONTROL records", attacks.check_crafted_controls),
    ("attack: log injection by run id", attacks.check_log_injection),
    ("attack: world-size bomb, forged hello", flood_attacks.check_world_size_bomb),
    ("attack: samples for epochs that never close", flood_attacks.check_sample_hoard),
    ("attack: run ids by the hundred", flood_attacks.check_run_flood),
    ("attack: two processes on one rank", flood_attacks.check_twin_ranks),
]


def run_all(tmp: Path) -> list[Check]:
    out = []
    for i, (name, fn) in enumerate(CHECKS):
        c = Check(name)
        sub = tmp / f"check{i}"
        sub.mkdir()
        t0 = time.monotonic()
        print(f"[{i + 1}/{len(CHECKS)}] {name} ...", flush=True)
        try:
            fn(sub, c)
        except Exception as exc:  # one broken check must not hide the others
            c.problems.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
        c.figures["seconds"] = round(time.monotonic() - t0, 1)
        c.passed = not c.problems
        out.append(c)
    out.append(messages_lost(out))
    return out


def print_table(checks: list[Check]) -> None:
    w = max(len(c.name) for c in checks)
    print(f"\n{'check':<{w}}  result  figures")
    print("-" * (w + 60))
    for c in checks:
        figs = ", ".join(f"{k}={v}" for k, v in c.figures.items())
        print(f"{c.name:<{w}}  {'pass' if c.passed else 'FAIL':<6}  {figs}")
        for p in c.problems:
            print(f"{'':<{w}}          ! {p}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep recordings and logs")
    a = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tw-rel-"))
    t0 = time.monotonic()
    try:
        checks = run_all(tmp)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(checks)
    total = time.monotonic() - t0
    Path("reliability-results.json").write_text(json.dumps(
        {"passed": all(c.passed for c in checks), "seconds": round(total, 1),
         "checks": [{"name": c.name, "passed": c.passed, "figures": c.figures,
                     "problems": c.problems, "losses": c.losses} for c in checks]},
        indent=2, sort_keys=True, default=str))
    print(f"\n{sum(c.passed for c in checks)}/{len(checks)} checks passed in {total:.0f} s; "
          "wrote reliability-results.json" + (f"; kept {tmp}" if a.keep else ""))
    return 0 if all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
