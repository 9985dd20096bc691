"""How a run ends, told truly: no epoch at all, a Ctrl-C in the middle of one, a script that
crashes, and data sent as a sample of its rows (real training processes, a real collector);
and nothing taken in a run's name after its end."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from conftest import CollectorProc, env, replayed_jsonl
from harness import Sender, inspect
from support.wandb_readback import find_offline_runs, read_offline_run

from trainer_client import wire

SCRIPT = """
import sys, time, torch
from trainer_client import TrainerClient
tw = TrainerClient(endpoint=sys.argv[1], run=sys.argv[2], rank=0, world_size=1)
m = torch.nn.Linear(4, 2)
data = torch.randn(5000, 2)
tw.log_data_stats(data, ["a", "b"], max_rows=1000)
mode = sys.argv[3]
for epoch in (1, 2, 3):
    for step in range(6):
        loss = m(torch.randn(8, 4)).pow(2).mean()
        loss.backward()
        tw.log_step(loss, model=m)
        m.zero_grad()
        if mode != "none" and epoch == 3 and step == 3:
            print("ready", flush=True)
            if mode == "crash":
                raise RuntimeError("the loop broke")
            time.sleep(60)  # the test interrupts it here
    if mode == "none":
        continue  # a run that never closes an epoch
    tw.log_epoch(epoch, model=m)
"""


def _run(tmp_path, mode: str) -> list[dict]:
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "1").start()
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), col.endpoint, f"edge-{mode}", mode],
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if mode == "interrupted":
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # its steps of epoch 3 reach the collector
        proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    # a Ctrl-C ends Python by the signal itself (-2); an exception with exit code 1
    assert proc.returncode == {"none": 0, "interrupted": -signal.SIGINT}.get(mode, 1), out
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    return col.records()


def test_a_run_with_no_epoch_says_so(tmp_path):
    recs = _run(tmp_path, "none")
    (summary,) = [r for r in recs if r["type"] == "summary"]
    assert summary["epoch"] is None and summary["ended"] == "finished"
    assert summary["metrics"]["summary/unclosed_steps"] == 18
    assert not [r for r in recs if r["type"] == "epoch"]


@pytest.mark.parametrize("mode,ended", [("interrupted", "interrupted"),
                                        ("crash", "crashed: RuntimeError")])
def test_a_run_ended_early_says_how_and_where(tmp_path, mode, ended):
    recs = _run(tmp_path, mode)
    (summary,) = [r for r in recs if r["type"] == "summary"]
    assert summary["ended"] == ended
    assert summary["epoch"] == 2  # the epoch it reached
    assert summary["metrics"]["summary/unclosed_steps"] == 4  # epoch 3's steps, not lost
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == [1, 2]


def test_data_sent_as_a_sample_says_what_fraction(tmp_path):
    recs = _run(tmp_path, "none")
    (data,) = [r["metrics"] for r in recs if r["type"] == "data_stats"]
    assert (data["data_stats/rows_total"], data["data_stats/rows_sent"]) == (5000, 1000)
    assert data["data_stats/sampled_fraction"] == 0.2


def test_a_finished_run_takes_nothing_more_and_every_output_ends_at_its_summary(tmp_path):
    """A process that speaks in a run's name after the run ended (its summary written):
    refused and counted, said once on the console; the JSONL, wandb and a replay all end
    the run at its summary, and another run open meanwhile loses nothing."""
    wandb_dir = tmp_path / "wb"
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "1",
                        "--wandb-mode", "offline", "--wandb-dir", str(wandb_dir)).start()
    s = Sender(col.endpoint)
    seqs: dict[tuple[str, int], int] = {}

    def send(run: str, inst: int, kind: int, body, epoch: int = 0) -> None:
        seq = seqs[run, inst] = seqs.get((run, inst), -1) + 1
        s.send(kind, run, body, inst=inst, seq=seq, epoch=epoch)

    def epoch(run: str, inst: int, e: int, n: int = 40) -> None:
        for i in range(n):  # enough steps in a row for the bulk path to take them
            send(run, inst, wire.KIND_STEP, [0.5 + 0.01 * (i % 3), 1.0, [], []])
        send(run, inst, wire.KIND_EPOCH, {}, epoch=e)

    for run in ("keep", "ended"):
        send(run, 1, wire.KIND_HELLO, {"host": "h", "pid": 1})
    epoch("ended", 1, 1)
    send("ended", 1, wire.KIND_BYE, {})
    send("ended", 2, wire.KIND_HELLO, {"host": "h", "pid": 2})  # too late: refused
    epoch("ended", 2, 2)
    for _ in range(40):  # and its old sender goes on after its bye (a known stream)
        send("ended", 1, wire.KIND_STEP, [0.5, 1.0, [], []])
    epoch("keep", 1, 1)
    epoch("keep", 1, 2)
    send("keep", 1, wire.KIND_BYE, {})
    s.close()
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    ended = [(r["type"], r.get("epoch")) for r in recs if r["run"] == "ended"]
    assert ended[-1][0] == "summary" and [e for t, e in ended if t == "epoch"] == [1], ended
    assert [r["epoch"] for r in recs if r["run"] == "keep" and r["type"] == "epoch"] == [1, 2]
    log = col.log.read_text()
    assert log.count("run ended has ended") == 1 and "run_finished" in log
    late = 1 + 40 + 1 + 40  # the new one's hello, steps, epoch; the old one's steps
    assert inspect(col.record)["rejected_live"] == {"run_finished": late}
    runs = {read_offline_run(d)["name"]: read_offline_run(d) for d in find_offline_runs(wandb_dir)}
    rows = [h["epoch"] for h in runs["ended"]["history"] if "epoch" in h]
    assert sorted(set(rows)) == [1]
    assert replayed_jsonl(col.record, tmp_path) == col.jsonl.read_bytes()
