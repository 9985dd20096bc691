"""A run stops itself on a diagnosis: 2-rank gloo DDP jobs (real all-reduce of gradients)
through a real collector; the collector's stop reaches both ranks, which leave the loop at
the same step without any collective. Without a collector, or with the back-channel
blocked, the same job trains to its end and never waits."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, CollectorProc, env, replayed_jsonl
from support.wandb_readback import find_offline_runs, read_offline_run

WORKER = ROOT / "tests" / "workers" / "ddp_stop.py"
EPOCHS, STEPS, SLEEP = 8, 60, 0.02
EXPLODE = "3-8"  # gradient_explosion is diagnosed when epoch 3 closes
# Runs that must not stop need only see the diagnosis and go on past it: shorter
SHORT, SHORT_EXPLODE = 5, "3-5"
DIAGNOSIS = "diagnosis/gradient_explosion"
# 1 s of steps (~20 at the workers' rate) ahead of where the ranks are: well above the
# back-channel's latency (milliseconds), well inside an epoch (60 steps, ~3 s)
STOP_RULES = "[actions]\nstop_margin_s = 1.0\nstop_min_steps = 5\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(tmp, endpoint: str, run: str, world: int = 2, timeout: float = 180,
        epochs: int = EPOCHS, **opts) -> list[dict]:
    """A ``world``-rank gloo job of ddp_stop.py workers; each rank's report."""
    port = free_port()
    procs = []
    for r in range(world):
        args = [sys.executable, str(WORKER), "--endpoint", endpoint, "--run", run, "--rank",
                str(r), "--world", str(world), "--master-port", str(port), "--out",
                str(tmp / f"{run}{r}.json"), "--epochs", str(epochs), "--steps", str(STEPS),
                "--step-sleep", str(SLEEP)]
        for k, v in opts.items():
            args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        e = env()
        e.update(RANK=str(r), WORLD_SIZE=str(world))
        procs.append(subprocess.Popen(args, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out.decode()[-4000:]
    return [json.loads((tmp / f"{run}{r}.json").read_text()) for r in range(world)]


def stop_collector(tmp, *extra: str, name: str = "c") -> CollectorProc:
    (tmp / "stop.toml").write_text(STOP_RULES)
    col = CollectorProc(tmp, f"ipc://{tmp}/{name}.sock", "--once", "--quiet", "1",
                        "--rules", str(tmp / "stop.toml"), *extra, name=name).start()
    wait_ready(col)
    return col


def wait_ready(col: CollectorProc, timeout: float = 120.0) -> None:
    """Until its kernels are loaded (a cold numba cache compiles for tens of seconds)."""
    deadline = time.monotonic() + timeout
    while "ready (kernels" not in col.log.read_text():
        assert time.monotonic() < deadline, col.log.read_text()[-2000:]
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stop")
    col = stop_collector(tmp, "--stop-on", DIAGNOSIS, "--wandb-mode", "offline",
                         "--wandb-dir", str(tmp / "wb"))
    ranks = job(tmp, col.endpoint, "ddp-stop", explode=EXPLODE, raising_callback=True,
                settle=5.0)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    return tmp, col, ranks, col.records()


def test_both_ranks_stop_at_the_same_step_within_an_epoch_of_the_diagnosis(stopped):
    _, _, ranks, recs = stopped
    stops = [r for r in recs if r["type"] == "stop"]
    assert len(stops) == 1 and stops[0]["rule"] == DIAGNOSIS
    s = stops[0]["step"]
    raised = [r["epoch"] for r in recs if r["type"] == "epoch"
              and any(e["rule"] == DIAGNOSIS and e["kind"] == "raised" for e in r["events"])]
    assert raised[0] == 3 and stops[0]["epoch"] == 3
    assert 3 * STEPS < s <= 4 * STEPS  # in the epoch after the one that raised it
    for r in ranks:
        assert r["stopped"] and r["steps"] == s and r["stop_step"] == s
        assert r["stopped_by"] == DIAGNOSIS and r["epochs_done"] == 4
    summary = next(r for r in recs if r["type"] == "summary")
    assert summary["ended"] == "stopped"


def test_findings_reach_on_finding_in_order_on_the_training_thread(stopped):
    _, col, ranks, _ = stopped
    for r in ranks:
        seen = r["findings"]
        rules = [f["rule"] for f in seen if f["kind"] == "raised"]
        assert DIAGNOSIS in rules and "exploding_gradients" in rules
        assert [f["seq"] for f in seen] == sorted({f["seq"] for f in seen})  # once each
        assert all(f["on_training_thread"] for f in seen)
        assert r["level"] == "critical" and DIAGNOSIS in r["raised"]
        # the callback that raised failed on every finding and broke nothing
        assert r["stats"]["health"]["callback_errors"] == len(seen) > 0


def test_wandb_says_the_run_was_stopped_and_by_what(stopped):
    tmp, _, ranks, _ = stopped
    (run_dir,) = find_offline_runs(tmp / "wb")
    summary = read_offline_run(run_dir)["summary"]
    assert summary["trainwatch/stopped_by"] == DIAGNOSIS
    assert summary["trainwatch/stop_step"] == ranks[0]["steps"]
    assert summary["trainwatch/ended"] == "stopped"


def test_a_replay_gives_the_same_records_byte_for_byte(stopped, tmp_path):
    _, col, _, _ = stopped
    replayed = replayed_jsonl(col.record, tmp_path)
    assert replayed == col.jsonl.read_bytes()
    assert b'"type":"stop"' in replayed


def _ran_to_the_end(ranks: list[dict], epochs: int = SHORT) -> None:
    for r in ranks:
        assert not r["stopped"] and r["steps"] == epochs * STEPS and r["epochs_done"] == epochs
        assert r["stop_step"] is None
        # never waited: a step's log_step + should_stop is microseconds; the whole loop is
        # its steps' sleeps and compute (~6 s here), nowhere near a wait per step
        assert r["max_call_s"] < 0.5 and r["loop_s"] < 90.0


def test_with_no_collector_training_runs_to_its_end_and_never_waits(tmp_path):
    ranks = job(tmp_path, f"ipc://{tmp_path}/nobody.sock", "alone", epochs=SHORT,
                explode=SHORT_EXPLODE)
    _ran_to_the_end(ranks)
    for r in ranks:
        assert r["level"] == "unknown" and r["stats"]["health"]["received"] == 0
        assert r["close_s"] < 3.0  # no collector ever came: close returns at once


@pytest.mark.parametrize("blocked", ["collector without a back-channel",
                                     "health endpoint pointing at nothing"])
def test_with_the_back_channel_blocked_training_runs_to_its_end(tmp_path, blocked):
    if blocked.startswith("collector"):
        col = stop_collector(tmp_path, "--stop-on", DIAGNOSIS, "--health-bind", "none")
        opts = {}
    else:
        col = stop_collector(tmp_path, "--stop-on", DIAGNOSIS)
        opts = {"health_endpoint": f"ipc://{tmp_path}/nothing.health"}
    ranks = job(tmp_path, col.endpoint, "blocked", epochs=SHORT, explode=SHORT_EXPLODE, **opts)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    _ran_to_the_end(ranks)
    recs = col.records()
    # the collector decided and recorded the stop; no rank heard of it
    assert [r["rule"] for r in recs if r["type"] == "stop"] == [DIAGNOSIS]
    assert next(r for r in recs if r["type"] == "summary")["ended"] == "finished"
    for r in ranks:
        assert r["level"] == "unknown" and r["stats"]["health"]["received"] == 0


def test_a_healthy_run_stays_healthy(tmp_path):
    col = stop_collector(tmp_path, "--stop-on", DIAGNOSIS)
    ranks = job(tmp_path, col.endpoint, "healthy", epochs=SHORT, settle=10.0)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    _ran_to_the_end(ranks)
    assert not [r for r in col.records() if r["type"] == "stop"]
    for r in ranks:
        assert r["level"] == "healthy" and r["raised"] == [] and r["findings"] == []
        assert r["health_epoch"] == SHORT  # it heard every epoch's verdict
        known = [lv for lv in r["levels"] if lv != "unknown"]
        assert known and set(known) == {"healthy"}
