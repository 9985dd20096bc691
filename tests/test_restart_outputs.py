"""A collector SIGKILLed mid-run and restarted on the same recording and outputs: the JSONL
holds every record exactly once, equal to a replay of the recording, and wandb has one
readable run with its config and every epoch (real processes, real offline wandb files)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import CollectorProc, env, finish, free_tcp, replayed_jsonl, start_trainer
from support.wandb_readback import find_offline_runs, read_offline_run

EPOCHS = 6


@pytest.fixture
def inherited_wandb_service(monkeypatch):
    """What a process that uses a shared wandb-core hands its children: WANDB_SERVICE, the
    address of a detached core (``wandb beta core start``). Both collector sessions below
    inherit it; each must use a core of its own (in a shared one, the killed session's
    run stays open and refuses the restart's resume: "run ID ... is in use")."""
    e = env()
    e.pop("WANDB_SERVICE", None)
    started = subprocess.run([sys.executable, "-m", "wandb", "beta", "core", "start",
                              "--idle-timeout", "120s"], env=e, capture_output=True, text=True,
                             timeout=60, check=True)
    token = started.stdout.strip().splitlines()[-1]
    monkeypatch.setenv("WANDB_SERVICE", token)
    yield token
    subprocess.run([sys.executable, "-m", "wandb", "beta", "core", "stop"],
                   env={**e, "WANDB_SERVICE": token}, capture_output=True, timeout=60)


def test_sigkill_and_restart_keep_every_output_exactly_once(tmp_path, inherited_wandb_service):
    assert env()["WANDB_SERVICE"] == inherited_wandb_service
    ep = free_tcp()
    wandb_dir = tmp_path / "wandb"
    opts = ("--epoch-timeout", "30", "--wandb-mode", "offline", "--wandb-dir", str(wandb_dir))
    first = CollectorProc(tmp_path, ep, *opts).start()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    trainers = [start_trainer(ep, "job-restart", r, 2, outs[r], steps=40, epochs=EPOCHS,
                              step_sleep=0.02, validate=True) for r in range(2)]
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:  # kill it once a few epochs are in the JSONL
        if first.jsonl.exists() and first.jsonl.read_text().count('"type":"epoch"') >= 2:
            break
        time.sleep(0.05)
    first.stop(signal.SIGKILL)
    before = first.jsonl.read_bytes()
    before = before[:before.rfind(b"\n") + 1]  # a line the kill cut off is rebuilt, not kept
    assert before.count(b'"type":"epoch"') >= 2, "killed too early to test anything"
    second = CollectorProc(tmp_path, ep, *opts, "--once", "--quiet", "1")
    second.start()
    finish(trainers, timeout=180)
    assert second.wait(120) == 0, second.log.read_text()[-3000:]

    final = first.jsonl.read_bytes()
    assert final.startswith(before)  # what the first session wrote stays, untouched
    recs = [json.loads(line) for line in final.decode().splitlines()]
    kinds = [(r["type"], r["epoch"]) for r in recs if r["type"] != "event"]
    assert len(kinds) == len(set(kinds)), "a record was written twice"
    assert [e for t, e in kinds if t == "epoch"] == list(range(1, EPOCHS + 1))
    assert sum(t in ("run", "config", "summary") for t, _ in kinds) == 3

    # The JSONL is what a replay of the whole recording gives, byte for byte.
    assert replayed_jsonl(first.record, tmp_path) == final

    # One readable wandb run, with its config and every epoch; the first session's
    # directory (cut off by the kill) is set aside, not left beside it.
    runs = find_offline_runs(wandb_dir)
    assert len(runs) == 1, runs
    assert list(wandb_dir.glob("**/superseded-offline-run-*"))
    run = read_offline_run(runs[0])
    assert run["config"]["learning_rate"] == 0.05 and run["config"]["world_size"] == 2
    rows = {row["epoch"]: row for row in run["history"] if "epoch" in row}
    assert sorted(rows) == list(range(1, EPOCHS + 1))
    for rec in recs:
        if rec["type"] == "epoch":
            for key, value in rec["metrics"].items():
                got = rows[rec["epoch"]][key]
                assert got == value or (value is None and math.isnan(got)), key
    assert run["exit_code"] == 0
    shutil.rmtree(wandb_dir)
