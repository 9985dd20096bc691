"""Accepted input that no sink could serialise as it is (a config nested hundreds deep, a
msgpack Timestamp, bytes keys, huge strings and ints) is made plain at the door: every
sink gets it, live and replay agree, and nothing is counted as an internal error."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import msgpack
import zmq
from conftest import CollectorProc, env
from support.wandb_readback import find_offline_runs, read_offline_run

from trainer_client import wire


def _nested(depth: int) -> list:
    v: list = [1]
    for _ in range(depth):
        v = [v]
    return v


CONFIG = {"learning_rate": 1e-3, "deep": _nested(300), "when": msgpack.Timestamp(5, 0),
          b"raw-key": b"\x00\xff", "huge": (1 << 64) - 1, "long": "x" * 10_000,
          "many": list(range(5000))}


def _frames(kind: int, seq: int, body, epoch: int = 0) -> list[bytes]:
    head = [wire.VERSION, kind, "plain", 0, 1, 9, seq, seq, epoch, time.time(), 0, body, []]
    return [msgpack.packb(head, use_bin_type=True, datetime=False)]


def test_odd_config_values_reach_every_sink_and_replay_agrees(tmp_path):
    wandb_dir = tmp_path / "wandb"
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "1",
                        "--wandb-mode", "offline", "--wandb-dir", str(wandb_dir)).start()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(col.endpoint)
    msgs = [_frames(wire.KIND_HELLO, 0, {"host": "h", "env": {}}),
            _frames(wire.KIND_CONFIG, 1, {"config": CONFIG, "num_params": 3})]
    msgs += [wire.encode(wire.Header(wire.KIND_STEP, "plain", 0, 1, 9, 2 + i, 2 + i, 1,
                                     time.time(), 0, [0.5 + 0.01 * i, 1.0, [], []]), [])
             for i in range(10)]
    msgs += [_frames(wire.KIND_EPOCH, 12, {}, epoch=1), _frames(wire.KIND_BYE, 13, {})]
    for m in msgs:
        push.send_multipart(m)
    push.close(linger=5000)
    ctx.term()
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    (cfg,) = [r["metrics"] for r in recs if r["type"] == "config"]
    assert cfg["learning_rate"] == 1e-3 and cfg["num_params"] == 3
    assert json.dumps(cfg["deep"]).count("[") == 8 and "nested deeper" in json.dumps(cfg["deep"])
    assert cfg["when"].startswith("Timestamp(") and cfg[b"raw-key".hex()] == "00ff"
    assert cfg["huge"] == str((1 << 64) - 1) and cfg["long"].endswith("more chars]")
    assert len(cfg["many"]) == 1001 and cfg["many"][-1] == "[4000 more items]"
    summary = next(r for r in recs if r["type"] == "summary")["metrics"]
    assert summary["summary/rejected"] == 0

    # wandb has the same config; a replay (and the report) count no internal error
    (run_dir,) = find_offline_runs(wandb_dir)
    got = read_offline_run(run_dir)["config"]
    assert got["when"] == cfg["when"] and got["huge"] == cfg["huge"]
    out = tmp_path / "replayed.jsonl"
    rep = subprocess.run([sys.executable, "-m", "collector", "replay", str(col.record),
                          "--jsonl", str(out)], env=env(), cwd=tmp_path, capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0 and " 0 rejected" in rep.stderr, rep.stderr
    assert out.read_bytes() == col.jsonl.read_bytes()
    html = tmp_path / "r.html"
    rep = subprocess.run([sys.executable, "-m", "collector", "report", str(col.record), "-o",
                          str(html)], env=env(), cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert rep.returncode == 0 and "internal error" not in rep.stderr, rep.stderr
