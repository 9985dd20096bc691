"""benchmarks/gpu_check.py's CPU-side logic, end to end on the CPU (a real model, a real
collector process): what it measures, and that its checks can fail."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import gpu_check
import pytest
import torch
from conftest import ROOT, env


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"),
                        "--device", "cpu", "--steps", "3", "--warmup", "1",
                        "--out", str(out)], env=env(), capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["ok"] and res["device"] == "cpu"
    assert res["host_syncs"] is None and res["sync_warnings"] is None  # CUDA-only checks
    assert res["value_reads"] == 0
    assert res["steps_per_arm"] == 3 and res["bare_step_ms"] > 0 and res["logged_step_ms"] > 0
    assert set(res["log_call_us_median"]) == {"log_step", "log_epoch", "log_validation"}
    # hello, config, 3 steps, validation, epoch, bye: all handed over, the epoch closed
    assert res["client_stats"]["handed_to_socket"] == 8
    assert res["client_stats"]["dropped"] == 0
    assert res["collector_exit"] == 0 and res["collector_epochs"] == res["epochs_logged"] == 1
    assert list(tmp_path.iterdir()) == [out]  # its temporary folder is gone


def test_its_checks_see_a_host_read_and_name_their_source(tmp_path):
    from trainer_client import TrainerClient

    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/none.sock", run="chk", rank=0,
                       world_size=1)
    chk = gpu_check.Checker(torch.device("cpu"), tw)
    with chk.check("log_step"):
        tw.log_step(torch.tensor(1.0))
    assert chk.reads.count == 0
    with chk.check("log_step"):
        torch.tensor(2.0).item()  # what a client that read a value would do
    assert chk.reads.count == 1 and len(chk.call_s["log_step"]) == 2
    tw.close(timeout=0.5)
    assert 'set_sync_debug_mode("error")' in gpu_check.__doc__


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_check_on_cuda(tmp_path):
    res = gpu_check.run(argparse.Namespace(
        device="cuda", preset="tiny", steps=20, block=5, warmup=3, epoch_steps=10,
        warn_steps=2, no_amp=False, out=None))
    assert res["ok"] and res["host_syncs"] == 0 and res["sync_warnings"] == 0
