"""Faults on real processes: a rank that dies, a full disk, forked DataLoader workers, and
messages that could take the collector down.

The ranks are benchmarks/rank_worker.py (a small model really training with the real
client); the collector is ``python -m collector collect``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import msgpack
import zmq
from conftest import ROOT, CollectorProc, env, rank_list

from trainer_client import wire

RANK_WORKER = ROOT / "benchmarks" / "rank_worker.py"


def start_rank(endpoint: str, run: str, rank: int, world: int, out: Path,
               **opts: object) -> subprocess.Popen:
    args = [sys.executable, str(RANK_WORKER), "--endpoint", endpoint, "--run", run,
            "--rank", str(rank), "--world", str(world), "--out", str(out), "--val-every", "0"]
    for k, v in opts.items():
        args += ["--" + k.replace("_", "-"), str(v)]
    return subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out.decode()[-3000:]


def inspect(recording: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "collector", "inspect", str(recording), "--json"],
                       env=env(), capture_output=True, text=True, timeout=120, check=True)
    return json.loads(r.stdout)


def test_a_rank_that_dies_is_named_missing_and_the_run_still_ends(tmp_path, ipc):
    # the timeout only has to outlast a live rank that starts late on a loaded machine
    col = CollectorProc(tmp_path, ipc, "--once", "--quiet", "1", "--epoch-timeout", "8").start()
    outs = [tmp_path / f"rank{r}.json" for r in range(3)]
    procs = [start_rank(ipc, "dies", r, 3, outs[r], steps=60, steps_per_epoch=20,
                        **({"die_after_epoch": 1} if r == 2 else {})) for r in range(3)]
    finish(procs)
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert rank_list(epochs[0]["ranks"]) == [0, 1, 2] and rank_list(epochs[0]["missing"]) == []
    for e in epochs[1:]:  # closed by the timeout, without the dead rank
        assert rank_list(e["ranks"]) == [0, 1] and rank_list(e["missing"]) == [2]
    assert recs[-1]["type"] == "summary"
    assert recs[-1]["metrics"]["summary/missing_ranks"] == 1
    dead = json.loads(outs[2].read_text())
    c = inspect(col.record)["runs"]["dies"]["ranks"]["2"]
    assert dead["died"] and "bye" not in c["by_kind"]
    assert c["messages"] == dead["stats"]["sent"] and c["seq_gaps"] == 0


def test_a_full_disk_loses_the_recording_only_and_says_how_much(tmp_path, ipc):
    col = CollectorProc(tmp_path, ipc, "--once", "--quiet", "1", "--record", "/dev/full")
    col.args.remove("--no-view")  # the plain status lines (stdout is no terminal)
    col.start()
    outs = [tmp_path / f"rank{r}.json" for r in range(2)]
    procs = [start_rank(ipc, "full", r, 2, outs[r], steps=60, steps_per_epoch=20,
                        val_every=1) for r in range(2)]
    finish(procs)
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    epochs = [r for r in recs if r["type"] == "epoch"]
    # ingest, rules and the JSONL sink went on as if nothing happened
    assert [e["epoch"] for e in epochs] == [1, 2, 3]
    assert all(rank_list(e["ranks"]) == [0, 1] for e in epochs)
    assert all("validation/gen_std" in e["metrics"] for e in epochs)
    assert all(any(k.startswith("health/") for k in e["metrics"]) for e in epochs)
    assert recs[-1]["type"] == "summary" and recs[-1]["metrics"]["summary/seq_gaps"] == 0
    sent = sum(json.loads(o.read_text())["stats"]["sent"] for o in outs)
    log = col.log.read_text()
    assert "cannot write the recording /dev/full" in log
    # every accepted message, and the limits the collector records at start, is counted as
    # unrecorded: in the status lines ...
    assert int(re.findall(r"unrecorded=(\d+)", log)[-1]) == sent + 1
    # ... and in the log at exit, which is all a --no-view collector leaves
    assert int(re.findall(r"unrecorded (\d+)", log)[-1]) == sent + 1


def test_forked_dataloader_workers_send_nothing_and_the_parent_goes_on(tmp_path, ipc):
    col = CollectorProc(tmp_path, ipc, "--once", "--quiet", "1").start()
    out = tmp_path / "rank0.json"
    finish([start_rank(ipc, "forked", 0, 1, out, steps=60, steps_per_epoch=20,
                       loader_workers=2)])
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    res = json.loads(out.read_text())
    info = inspect(col.record)
    c = info["runs"]["forked"]["ranks"]["0"]
    made = {k: n for k, n in res["made"].items() if n}
    assert made["step"] == 60 and made["epoch"] == 3
    # only the parent's messages: its counts, no duplicates from a child sharing its seq
    assert c["by_kind"] == {**made, "bye": 1}
    assert c["messages"] == res["stats"]["sent"]
    assert c["seq_gaps"] == c["reported_drops"] == res["stats"]["dropped"] == 0
    assert info["rejected_live"] == {}
    # each worker tried to log, and its client refused without queueing anything
    assert res["child_refused"] > 0 and res["child_queued"] == 0
    assert [r["epoch"] for r in col.records() if r["type"] == "epoch"] == [1, 2, 3]


def _msg(kind: object, seq: int, body: object, tensors: list[wire.Tensor] = (),
         epoch: int = 0) -> list[bytes]:
    head = [wire.VERSION, kind, "lethal", 0, 1, 9, seq, seq, epoch, 1.7e9, 0, body,
            [[t.name, t.dtype, list(t.shape)] for t in tensors]]
    return [msgpack.packb(head), *(bytes(t.data) for t in tensors)]


def test_messages_that_could_kill_the_collector_are_rejected_and_counted(tmp_path, ipc):
    col = CollectorProc(tmp_path, ipc, "--once", "--quiet", "1").start()
    f32 = "float32"
    lethal = [  # each with a fresh seq, so a rejected one cannot hide the next
        (_msg(4.0, 1, [1.0, None, [], []]), "bad_kind"),
        (_msg([4], 2, [1.0, None, [], []]), "bad_kind"),
        (_msg({"k": 4}, 3, [1.0, None, [], []]), "bad_kind"),
        (_msg(wire.KIND_DATA, 4, {"index": 0, "count": 1, "channels": ["a", "b"]},
              [wire.Tensor("chunk", "int32", (2, 2), bytes(16))]), "bad_tensors"),
        (_msg(wire.KIND_DATA, 5, {"index": 0, "count": 1, "channels": ["a", "b", "c"]},
              [wire.Tensor("chunk", f32, (1, 3), bytes(12)),
               wire.Tensor("mean", f32, (3,), bytes(12))]), "bad_tensors"),
        (_msg(wire.KIND_VALIDATION, 6, {"epoch": "one"},
              [wire.Tensor("samples", f32, (2, 2), bytes(16))], epoch=1), "bad_body"),
    ]
    script = [_msg(wire.KIND_HELLO, 0, {})] + [f for f, _ in lethal] + [
        _msg(wire.KIND_STEP, 7, [float("nan"), 1.0, [], []], epoch=1),
        _msg(wire.KIND_EPOCH, 8, {}, epoch=1), _msg(wire.KIND_BYE, 9, {}, epoch=2)]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(ipc)
    for frames in script:
        push.send_multipart(frames)
    push.close(linger=5000)
    ctx.term()
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    want: dict[str, int] = {}
    for _, reason in lethal:
        want[reason] = want.get(reason, 0) + 1
    info = inspect(col.record)
    assert info["rejected_live"] == want
    r0 = info["runs"]["lethal"]["ranks"]["0"]
    assert r0["by_kind"] == {"hello": 1, "step": 1, "epoch": 1, "bye": 1}
    recs = col.records()
    assert recs[-1]["type"] == "summary"
    assert recs[-1]["metrics"]["summary/rejected"] == len(lethal)
    epoch = next(r for r in recs if r["type"] == "epoch")
    assert epoch["metrics"]["health/nonfinite"] == 1  # NaN is data: accepted and reported
