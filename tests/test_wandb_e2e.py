"""wandb end to end: a 3-rank job through a real collector into one offline wandb run,
read back from its .wandb file; and `trainwatch upload` of the recording later."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import CollectorProc, env, finish, start_trainer
from support.wandb_readback import find_offline_runs, read_offline_run

EPOCHS = 3


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb3")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1",
                        "--wandb-mode", "offline", "--wandb-dir", str(tmp / "live"),
                        "--wandb-project", "tw-test").start()
    procs = [start_trainer(col.endpoint, "ddp-job", r, 3, tmp / f"r{r}.json", epochs=EPOCHS,
                           steps=8, validate=(r == 0)) for r in range(3)]
    finish(procs)
    assert col.wait(180) == 0, col.log.read_text()[-3000:]
    return tmp, col


def _check_run(run_dir, col):
    got = read_offline_run(run_dir)
    assert got["run_id"] == "ddp-job" and got["project"] == "tw-test"
    assert got["config"]["learning_rate"] == 0.05 and got["config"]["num_params"] == 354
    rows = [h for h in got["history"] if "train/batch_loss_mean" in h]
    assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1))
    epochs = [r for r in col.records() if r["type"] == "epoch"]
    for row, rec in zip(rows, epochs, strict=True):
        for key in ("train/batch_loss_mean", "train/grad_norm_max", "model/weight_mean",
                    "model/ema_diff", "loss_ratio/a"):
            assert row[key] == pytest.approx(rec["metrics"][key], rel=1e-9)
        assert "health/exploding_gradients" in row
    assert "validation/gen_std" in rows[0]
    assert got["summary"]["summary/dropped"] == 0
    return got


def test_one_wandb_run_for_a_three_rank_job(job):
    tmp, col = job
    runs = find_offline_runs(tmp / "live")
    assert len(runs) == 1  # one run per training run, never one per rank
    _check_run(runs[0], col)


def test_upload_replays_a_recording_into_wandb(job):
    tmp, col = job
    r = subprocess.run([sys.executable, "-m", "collector", "upload", str(col.record),
                        "--wandb-mode", "offline", "--wandb-dir", str(tmp / "later"),
                        "--wandb-project", "tw-test"], env=env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    runs = find_offline_runs(tmp / "later")
    assert len(runs) == 1
    _check_run(runs[0], col)
