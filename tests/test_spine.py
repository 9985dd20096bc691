"""The spine end to end: real trainer processes -> real collector process -> recording.

Nothing here is mocked: ZeroMQ sockets between processes, the `trainwatch` CLI, torch
models really training.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CollectorProc, env, finish, free_tcp, rank_list, start_trainer

from collector.recording.format import MESSAGE
from collector.recording.reader import ReadStats, read_records

STEPS, EPOCHS, WORLD = 20, 3, 3


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", *args], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("three")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1").start()
    outs = [tmp / f"rank{r}.json" for r in range(WORLD)]
    procs = [start_trainer(col.endpoint, "job-3", r, WORLD, outs[r], steps=STEPS,
                           epochs=EPOCHS, validate=(r == 0)) for r in range(WORLD)]
    finish(procs)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    return col, [json.loads(o.read_text()) for o in outs]


def test_recording_holds_exactly_what_each_rank_sent(three_ranks):
    col, outs = three_ranks
    info = json.loads(_cli("inspect", str(col.record), "--json", cwd=col.tmp).stdout)
    ranks = info["runs"]["job-3"]["ranks"]
    assert sorted(ranks) == [str(r) for r in range(WORLD)]
    for r, out in enumerate(outs):
        c = ranks[str(r)]
        made = {k: v for k, v in out["made"].items() if v}
        assert c["by_kind"] == {**made, "bye": 1}
        assert c["messages"] == out["stats"]["sent"]
        assert c["seq_gaps"] == c["reported_drops"] == out["stats"]["dropped"] == 0
        assert c["first_seq"] == 0 and c["last_seq"] == c["messages"] - 1


def test_epochs_close_over_all_ranks_and_the_run_ends(three_ranks):
    col, _ = three_ranks
    recs = col.records()
    assert [r["type"] for r in recs][:2] == ["run", "config"]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert all(rank_list(e["ranks"]) == [0, 1, 2] and rank_list(e["missing"]) == []
               for e in epochs)
    assert recs[-1]["type"] == "summary"
    assert recs[-1]["metrics"]["summary/dropped"] == 0


def test_live_equals_replay_and_replay_is_byte_identical(three_ranks):
    col, _ = three_ranks
    a, b = col.tmp / "replay_a.jsonl", col.tmp / "replay_b.jsonl"
    for out in (a, b):
        r = _cli("replay", str(col.record), "--jsonl", str(out), cwd=col.tmp)
        assert r.returncode == 0, r.stderr
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() == col.jsonl.read_bytes()


def test_truncated_and_corrupted_recordings_replay(three_ranks):
    col, _ = three_ranks
    data = col.record.read_bytes()
    cut = col.tmp / "cut.twrec"
    cut.write_bytes(data[: len(data) * 2 // 3])
    r = _cli("replay", str(cut), "--jsonl", str(col.tmp / "cut.jsonl"), cwd=col.tmp)
    assert r.returncode == 0, r.stderr
    assert "truncated bytes" in r.stderr
    assert (col.tmp / "cut.jsonl").read_text().count('"type":"epoch"') >= 1

    bad = bytearray(data)
    i = len(bad) // 2
    bad[i] ^= 0xFF
    damaged = col.tmp / "bad.twrec"
    damaged.write_bytes(bytes(bad))
    st = ReadStats()
    n = sum(1 for _ in read_records(damaged, st))
    assert st.corrupted == 1 and n == sum(1 for _ in read_records(col.record)) - 1
    r = _cli("replay", str(damaged), cwd=col.tmp)
    assert r.returncode == 0 and "1 corrupted" in r.stderr


def test_no_collector_never_blocks_and_close_is_bounded(tmp_path):
    import torch

    from trainer_client import TrainerClient

    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/nobody.sock", run="alone", rank=0,
                       world_size=1, max_queue=1000)
    loss = torch.tensor(0.5)
    worst = 0.0
    t_all = time.perf_counter()
    for _ in range(10_000):
        t0 = time.perf_counter()
        tw.log_step(loss, {"a": loss}, grad_norm=loss)
        worst = max(worst, time.perf_counter() - t0)
    t_all = time.perf_counter() - t_all
    t0 = time.perf_counter()
    tw.close(timeout=1.0)
    closed_in = time.perf_counter() - t0
    s = tw.stats
    # A call that waited on the socket would wait out the sender's 5 s connect grace
    # (and 0.1 s per message after it: 1000 s for these calls). The bounds sit far below
    # that and far above a queue append, so a loaded machine still passes them.
    assert worst < 2.0 and t_all < 60
    assert closed_in < 1.0 + 1.0
    assert s["sent"] == 0
    assert s["dropped"] == 10_002  # hello + 10,000 steps + bye: every one counted
    assert s["dropped_by_reason"]["queue_full"] > 0


def test_collector_killed_and_restarted_mid_run(tmp_path):
    ep = free_tcp()
    first = CollectorProc(tmp_path, ep, "--epoch-timeout", "30").start()
    out = tmp_path / "rank0.json"
    trainer = start_trainer(ep, "job-kill", 0, 1, out, steps=60, epochs=4, step_sleep=0.01)
    deadline = time.monotonic() + 60
    while first.record.stat().st_size < 20_000 and time.monotonic() < deadline:
        time.sleep(0.05)  # kill it mid-run, once it has taken a good part of the run
    first.stop(signal.SIGKILL)
    old = tmp_path / "old.twrec"
    shutil.copy(first.record, old)
    second = CollectorProc(tmp_path, ep, "--once", "--quiet", "1", "--epoch-timeout", "30")
    second.start()
    finish([trainer])
    assert second.wait(120) == 0, second.log.read_text()[-3000:]
    res = json.loads(out.read_text())
    # The loop kept its pace: no call waited out the outage (seconds: the kill, then the
    # new collector's start-up) on the dead collector.
    assert res["max_step_s"] < 2.0
    st = ReadStats()
    old_records = list(read_records(old, st))
    assert len(old_records) > 0 and st.corrupted == 0
    info = json.loads(_cli("inspect", str(first.record), "--json", cwd=tmp_path).stdout)
    c = info["runs"]["job-kill"]["ranks"]["0"]
    # The restarted collector appended to the same recording and got the rest of the run.
    assert c["messages"] > len([r for r in old_records if r[0] == MESSAGE])
    assert c["by_kind"]["bye"] == 1
    # Whatever was lost is visible: the gaps cover at least what the client reported.
    assert c["seq_gaps"] >= c["reported_drops"] == res["stats"]["dropped"]
    recs = second.records()
    assert recs[-1]["type"] == "summary"


def test_local_collector_makes_monitoring_one_line(tmp_path):
    code = f"""
import torch
from trainer_client import TrainerClient
tw = TrainerClient(run="solo", local_collector={str(tmp_path / 'tw')!r})
m = torch.nn.Linear(4, 1)
for epoch in (1, 2):
    for _ in range(5):
        loss = m(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        tw.log_step(loss, model=m)
    tw.log_epoch(epoch, model=m)
tw.close()
"""
    r = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "tw" / "solo.jsonl").read_text().splitlines()
    types = [json.loads(x)["type"] for x in lines]
    assert types.count("epoch") == 2 and types[-1] == "summary"
    assert (tmp_path / "tw" / "solo.twrec").stat().st_size > 0


def test_cli_errors_are_one_clear_line(tmp_path):
    junk = tmp_path / "junk.twrec"
    junk.write_bytes(b"hello")
    for args, says in ((["replay", str(tmp_path / "missing.twrec")], "No such file"),
                       (["inspect", str(junk)], "not a trainwatch recording")):
        r = _cli(*args, cwd=tmp_path)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr
