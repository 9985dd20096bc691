"""No sender can exhaust the collector or corrupt another run's accounting: a world-size
bomb, validation samples for epochs that never close, run ids by the thousand, a second
process on a rank, a stolen wandb id. Each attack runs against a real collector process
beside a real training run, which loses nothing (its sequence gaps are its reported drops).
"""

from __future__ import annotations

import json
import time

import numpy as np
from conftest import CollectorProc, finish, rank_list, start_trainer
from harness import Sender, inspect, rss_kb
from support.wandb_readback import find_offline_runs, read_offline_run

from trainer_client import wire


def _victim(col: CollectorProc, tmp, run: str = "victim", **kw) -> list:
    opts = {"epochs": 3, "steps": 30, "step_sleep": 0.02, **kw}
    return [start_trainer(col.endpoint, run, 0, 1, tmp / f"{run}.json", **opts)]


def _started(col: CollectorProc, run: str, timeout_s: float = 60.0) -> None:
    """Wait until the run's first record is in the JSONL (its trainer is up and sending)."""
    deadline = time.monotonic() + timeout_s
    while f'"run":"{run}","type":"run"' not in col.jsonl.read_text():
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)


def _lost_nothing(recs: list[dict], run: str = "victim") -> dict:
    summary = next(r for r in recs if r["type"] == "summary" and r["run"] == run)["metrics"]
    assert summary["summary/seq_gaps"] == summary["summary/dropped"] == 0, summary
    assert [r["epoch"] for r in recs if r["type"] == "epoch" and r["run"] == run
            and not r.get("amends")] == [1, 2, 3]
    return summary


def test_a_world_size_bomb_is_refused_and_a_forged_hello_changes_nothing(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "2",
                        "--epoch-timeout", "20").start()
    victim = _victim(col, tmp_path)
    _started(col, "victim")
    bomb = Sender(col.endpoint)
    for seq in range(300):  # every one claims a world of 2^20 ranks
        bomb.send(wire.KIND_STEP, "bomb", [0.5, 1.0, [], []], rank=seq, world=1 << 20,
                  seq=seq)
    # a forged hello in the victim's name, a world of 5,000 and a process of its own
    bomb.send(wire.KIND_HELLO, "victim", {"host": "forger", "pid": 666, "env": {}},
              world=5000, inst=777)
    bomb.close()
    finish(victim)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    assert not [r for r in recs if r["run"] == "bomb"]  # refused at the door, counted
    notes = [e["message"] for r in recs if r["run"] == "victim" for e in r["events"]
             if e["rule"].startswith("ingest/")]
    assert any("5000" in n and "stays its world size" in n for n in notes), notes
    assert any("forger pid 666" in n for n in notes), notes  # two processes on rank 0
    for r in recs:
        if r["type"] == "epoch" and r["run"] == "victim":
            assert r["missing"]["count"] == 0 and rank_list(r["ranks"]) == [0]
    _lost_nothing(recs)
    # the forged process never holds the run open: it ends at the victim's bye
    summary = next(r for r in recs if r["run"] == "victim" and r["type"] == "summary")
    assert summary["ended"] == "finished" and summary["metrics"]["summary/missing_ranks"] == 0
    assert max(len(line) for line in col.jsonl.read_text().splitlines()) < 20_000
    assert inspect(col.record)["rejected_live"] == {"world_size_over_limit": 300}


def test_missing_ranks_of_a_huge_world_are_ranges(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--epoch-timeout", "1").start()
    s = Sender(col.endpoint)
    s.send(wire.KIND_HELLO, "wide", {"host": "h", "env": {}}, world=16000)
    for seq in range(1, 11):
        s.send(wire.KIND_STEP, "wide", [0.5, 1.0, [], []], world=16000, seq=seq)
    s.send(wire.KIND_EPOCH, "wide", {}, world=16000, seq=11, epoch=1)
    deadline = time.monotonic() + 60
    while '"type":"epoch"' not in col.jsonl.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)  # closed by the timeout, without 15,999 ranks
    s.close()
    col.stop()
    (epoch,) = [r for r in col.records() if r["type"] == "epoch"]
    assert epoch["missing"] == {"count": 15999, "ranges": [[1, 15999]]}
    assert epoch["ranks"] == {"count": 1, "ranges": [[0, 0]]}
    assert max(len(line) for line in col.jsonl.read_text().splitlines()) < 5_000


def test_samples_for_epochs_that_never_close_stay_within_the_budget(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "2",
                        "--max-held-mb", "64", "--epoch-timeout", "1").start()
    victim = _victim(col, tmp_path)
    _started(col, "victim")
    base = rss_kb(col.proc.pid)
    s = Sender(col.endpoint)
    arr = np.zeros((64, 256, 128), np.float32)  # 8 MiB each, for epochs far ahead
    for i in range(40):
        s.send(wire.KIND_VALIDATION, "hoarder", {"epoch": 10_000 + i}, seq=i, tensors=[
            wire.Tensor("samples", "float32", arr.shape, arr.tobytes())])
    s.close()
    deadline = time.monotonic() + 60
    while "over_budget" not in col.jsonl.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)  # the burst is drained: what the collector holds now is what it kept
    held = rss_kb(col.proc.pid) or 0
    finish(victim)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    _lost_nothing(recs)
    (summary,) = [r["metrics"] for r in recs if r["type"] == "summary" and r["run"] == "hoarder"]
    assert summary["summary/rejected"] >= 32  # 64 MiB hold at most 7 of them
    said = [e for r in recs if r["run"] == "hoarder" for e in r["events"]]
    assert [e["rule"] for e in said] == ["ingest/over_budget"]
    # what it holds is the budget's (7 of 8 MiB) and bookkeeping, not the 320 MiB sent
    assert (held - base) / 1024 < 64 + 48, (base, held)


def test_run_ids_by_the_thousand_are_finished_and_evicted(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--max-runs", "50",
                        "--evict-after", "0.5").start()
    victim = _victim(col, tmp_path, epochs=3, steps=60)
    s = Sender(col.endpoint)
    for wave in range(6):  # 240 runs, 40 at a time: each wave fits only if the last left
        for i in range(40):
            run = f"flood-{wave}-{i}"
            s.send(wire.KIND_HELLO, run, {"host": "h", "env": {}})
            s.send(wire.KIND_BYE, run, {}, seq=1)
        deadline = time.monotonic() + 30
        while col.jsonl.read_text().count('"type":"summary"') < 40 * (wave + 1) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(3.0)  # a few ticks: the finished runs are evicted
    s.close()
    finish(victim)
    deadline = time.monotonic() + 60
    while '"run":"victim","type":"summary"' not in col.jsonl.read_text() \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert col.stop() == 0, col.log.read_text()[-3000:]
    recs = col.records()
    summaries = {r["run"] for r in recs if r["type"] == "summary"}
    assert len([r for r in summaries if r.startswith("flood-")]) == 240
    assert "too_many_runs" not in col.log.read_text()
    _lost_nothing(recs)


def test_two_processes_on_one_rank_keep_true_accounting(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "2").start()
    twins = [start_trainer(col.endpoint, "twin", 0, 1, tmp_path / f"t{i}.json", epochs=3,
                           steps=40, step_sleep=0.01, seed=i) for i in range(2)]
    finish(twins)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    summary = next(r for r in recs if r["type"] == "summary")["metrics"]
    sent = [json.loads((tmp_path / f"t{i}.json").read_text())["stats"] for i in range(2)]
    # every message of both counted, none a gap: 2 x (hello, config, 120 steps, 3 epochs, bye)
    assert summary["summary/seq_gaps"] == 0 and summary["summary/dropped"] == 0
    assert all(s["dropped"] == 0 for s in sent)
    notes = [e["message"] for r in recs for e in r["events"] if e["rule"] == "ingest/instances"]
    assert len(notes) == 1 and notes[0].count(" pid ") == 2, notes


def test_twins_end_their_rank_together_and_a_restart_ends_it_alone(tmp_path):
    """Two processes on one rank that each spoke while the other was live end the rank
    only when both said bye: the run's later epochs come before its summary. A process
    that went silent before its successor's first message (a restart), or all through
    the other's latest epoch, is not waited for: each run ends at its bye."""
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "2").start()
    s = Sender(col.endpoint)
    seqs: dict[tuple[str, int], int] = {}

    def send(run: str, inst: int, kind: int, body, epoch: int = 0) -> None:
        seq = seqs[run, inst] = seqs.get((run, inst), -1) + 1  # from 0, as a client's
        s.send(kind, run, body, inst=inst, seq=seq, epoch=epoch)

    def steps(run: str, inst: int, n: int = 3) -> None:
        for _ in range(n):
            send(run, inst, wire.KIND_STEP, [0.5, 1.0, [], []])

    for run in ("twins", "restart"):
        send(run, 1, wire.KIND_HELLO, {"host": "h", "pid": 1})
        steps(run, 1)
    send("twins", 2, wire.KIND_HELLO, {"host": "h", "pid": 2})
    steps("twins", 2)
    steps("twins", 1)  # the first speaks again: two live processes
    for inst in (1, 2):
        send("twins", inst, wire.KIND_EPOCH, {}, epoch=1)
    send("twins", 1, wire.KIND_BYE, {})  # one twin is done; the other trains on
    steps("twins", 2)
    send("twins", 2, wire.KIND_EPOCH, {}, epoch=2)
    send("twins", 2, wire.KIND_BYE, {})
    # a process that speaks once beside a live one (a forged hello) and is silent after:
    # not waited for once the live one's latest epoch went by without it
    send("ghost", 1, wire.KIND_HELLO, {"host": "h", "pid": 4})
    steps("ghost", 1)
    send("ghost", 2, wire.KIND_HELLO, {"host": "forger", "pid": 5})
    steps("ghost", 1)
    send("ghost", 1, wire.KIND_EPOCH, {}, epoch=1)
    steps("ghost", 1)
    send("ghost", 1, wire.KIND_EPOCH, {}, epoch=2)
    send("ghost", 1, wire.KIND_BYE, {})
    send("restart", 1, wire.KIND_EPOCH, {}, epoch=1)  # then it dies without a bye
    send("restart", 2, wire.KIND_HELLO, {"host": "h", "pid": 3})
    steps("restart", 2)
    send("restart", 2, wire.KIND_EPOCH, {}, epoch=2)
    send("restart", 2, wire.KIND_BYE, {})
    s.close()
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    for run in ("twins", "restart", "ghost"):
        mine = [r for r in recs if r["run"] == run and r["type"] in ("epoch", "summary")]
        assert [r.get("epoch") if r["type"] == "epoch" else "summary" for r in mine] == \
            [1, 2, "summary"], mine
        summary = mine[-1]
        assert summary["ended"] == "finished"
        assert summary["metrics"]["summary/missing_ranks"] == 0
        m = summary["metrics"]
        assert m["summary/seq_gaps"] == 0 and m["summary/late_epochs"] == 0, (run, m)
    notes = [e["message"] for r in recs if r["run"] == "twins" for e in r["events"]
             if e["rule"] == "ingest/instances"]
    assert len(notes) == 1 and "ends when both have" in notes[0]
    assert not [e for r in recs if r["run"] == "restart" for e in r["events"]
                if e["rule"] == "ingest/instances"]


def test_a_run_cannot_write_into_another_runs_wandb_run(tmp_path):
    wandb_dir = tmp_path / "wandb"
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "2",
                        "--wandb-mode", "offline", "--wandb-dir", str(wandb_dir)).start()
    s = Sender(col.endpoint)
    s.send(wire.KIND_HELLO, "owner", {"host": "h", "env": {"WANDB_RUN_ID": "owned-id"}})
    s.send(wire.KIND_HELLO, "thief", {"host": "h", "env": {"WANDB_RUN_ID": "owned-id"}})
    # a later hello of the owner's run asking for another id: a note, no redirection
    s.send(wire.KIND_HELLO, "owner", {"host": "h", "env": {"WANDB_RUN_ID": "elsewhere"}},
           inst=2)
    for run in ("owner", "thief"):
        for seq in (1, 2):
            s.send(wire.KIND_STEP, run, [0.5, 1.0, [], []], seq=seq)
        s.send(wire.KIND_EPOCH, run, {}, seq=3, epoch=1)
        s.send(wire.KIND_BYE, run, {}, seq=4)
    s.send(wire.KIND_BYE, "owner", {}, inst=2, seq=1)
    s.close()
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    runs = {read_offline_run(d)["name"]: read_offline_run(d) for d in find_offline_runs(wandb_dir)}
    assert runs["owner"]["run_id"] == "owned-id"
    assert runs["thief"]["run_id"] == "thief" and "asked for wandb id owned-id" in \
        col.log.read_text()
    notes = [e["message"] for r in col.records() if r["run"] == "owner" for e in r["events"]
             if e["rule"] == "ingest/wandb"]
    assert notes and "'elsewhere'" in notes[0]
