"""What a message costs the collector as a job grows to 1,000 ranks.

    python benchmarks/bench_ranks.py [--ranks 10,100,1000] [--rate 20000] [--profile DIR]

For each rank count N: a real collector process (``python -m collector collect`` on ipc)
and a few sender processes, one PUSH socket per simulated rank, speaking the real wire
(hello, binary steps, epochs with weight summaries, goodbye). The ranks step in lockstep
at one total rate for every N (``--rate`` messages/s), and an epoch closes across all
ranks every ``--epoch-s`` seconds, so every N moves the same steps per second and per
epoch; only how many ranks they come from changes. A last job of 1,000 ranks sends as
fast as the senders can (the collector's ceiling on this machine, senders beside it).

Per N: messages handled per second, the collector's CPU per message (utime + stime from
/proc/<pid>/stat over the job), its RSS growth per rank once every epoch has closed (no
data held then), and epoch-close latency: the last rank's epoch message sent -> the epoch
record in the collector's JSONL (p50, max).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402 - the benchmarks folder is not a package

TERMS = ["simple", "vel", "fk", "drift", "slide"]
_SEQ_STEP_EPOCH = struct.Struct("<3Q")  # at byte 32 of a binary step (step.STEP_LAYOUT)
_WALL_LOSS = struct.Struct("<2d")  # at byte 64


def _sender(endpoint: str, run: str, ranks: range, world: int, rounds: int, spe: int,
            round_rate: float, t0: float, out: str) -> None:
    """Ranks ``ranks`` of one job: ``rounds`` lockstep steps (0 rate: unpaced), an epoch
    every ``spe`` of them. Writes what it sent and when each epoch's last message left."""
    import zmq

    from trainer_client import wire

    ctx = zmq.Context()
    socks, steps = [], []
    for r in ranks:
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.SNDHWM, 0)
        s.setsockopt(zmq.LINGER, -1)
        s.connect(endpoint)
        socks.append(s)
        h = wire.Header(wire.KIND_STEP, run, r, world, 1000 + r, 0, 0, 1, 0.0, 0,
                        [0.5, 1.25, TERMS, [0.1, 0.2, 0.05, 0.01, 0.02], 1e-3])
        steps.append(bytearray(wire.encode(h, [])[0]))

    def msgpack_msg(kind: int, r: int, seq: int, epoch: int, body: object) -> list:
        h = wire.Header(kind, run, r, world, 1000 + r, seq, 0, epoch, time.time(), 0, body)
        return [bytes(f) for f in wire.encode(h, [])]

    seq = [0] * len(socks)
    for i, r in enumerate(ranks):
        socks[i].send_multipart(msgpack_msg(wire.KIND_HELLO, r, 0, 0, {"host": "sim",
                                                                        "pid": r}))
        seq[i] = 1
    weights = [4096.0, 210.5, 3.25, 88.0, 0.9]  # as after an all-reduce: equal on all ranks
    epoch_sent: list[float] = []
    sent = len(socks)
    while time.time() < t0:
        time.sleep(0.001)
    done = 0
    while done < rounds:
        due = rounds if round_rate <= 0 else min(rounds, int((time.time() - t0) * round_rate))
        if due <= done:
            time.sleep(0.0005)
            continue
        for k in range(done, due):
            epoch = k // spe + 1
            now = time.time()
            for i, s in enumerate(socks):
                buf = steps[i]
                _SEQ_STEP_EPOCH.pack_into(buf, 32, seq[i], k, epoch)
                _WALL_LOSS.pack_into(buf, 64, now, 1.0 / (1.0 + 0.01 * k + 0.001 * i))
                s.send(buf)
                seq[i] += 1
            sent += len(socks)
            if (k + 1) % spe == 0:
                for i, r in enumerate(ranks):
                    socks[i].send_multipart(msgpack_msg(wire.KIND_EPOCH, r, seq[i], epoch, {
                        "weights": weights, "ema": None, "param_names": ["w"]}))
                    seq[i] += 1
                sent += len(socks)
                epoch_sent.append(time.time())
        done = due
    for i, r in enumerate(ranks):
        socks[i].send_multipart(msgpack_msg(wire.KIND_BYE, r, seq[i], rounds // spe + 1, {}))
        sent += 1
    for s in socks:
        s.close()
    ctx.term()
    Path(out).write_text(json.dumps({"sent": sent, "epoch_sent": epoch_sent}))


class _Tail:
    """New epoch records in a growing JSONL file, each with when it was first seen."""

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.part = path, 0, b""
        self.seen: dict[int, float] = {}

    def poll(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.pos)
            data = fh.read()
        now = time.time()
        self.pos += len(data)
        lines = (self.part + data).split(b"\n")
        self.part = lines.pop()
        for line in lines:
            if b'"type":"epoch"' in line:
                rec = json.loads(line)
                self.seen.setdefault(rec["epoch"], now)


def run_job(tmp: Path, n: int, rate: float, epoch_s: float, epochs: int, senders: int,
            profile: Path | None = None) -> dict:
    """One job of ``n`` ranks against a fresh collector; its figures."""
    paced = rate > 0
    spe = max(2, round((rate if paced else 20_000) * epoch_s / n))
    rounds = spe * epochs
    d = tmp / f"n{n}{'' if paced else '-max'}"
    d.mkdir()
    extra = ["--epoch-timeout", "600"]
    col = harness.CollectorProc(d, f"ipc://{d}/c.sock", *extra).start()
    time.sleep(1.0)  # past its warm-up
    pid = col.pid
    spy = None
    if profile is not None:  # py-spy on the collector: where its time goes
        spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "-r", "250", "-f", "raw",
                                "-o", str(profile / f"collector-{n}{'' if paced else '-max'}"
                                                    ".txt")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    rss0, cpu0 = harness.rss_kb(pid), harness.cpu_s(pid)
    t0 = time.time() + 1.5 + n / 400  # every sender connected and said hello first
    per = -(-n // senders)
    outs, procs = [], []
    ctx = mp.get_context("spawn")
    for k in range(senders):
        ranks = range(k * per, min(n, (k + 1) * per))
        if not ranks:
            continue
        outs.append(d / f"sender{k}.json")
        procs.append(ctx.Process(target=_sender, args=(
            col.endpoint, "scale", ranks, n, rounds, spe, rate / n if paced else 0.0, t0,
            str(outs[-1]))))
        procs[-1].start()
    tail = _Tail(col.jsonl)
    peak = rss0
    deadline = time.time() + 120 + epochs * epoch_s * 4
    while len(tail.seen) < epochs and time.time() < deadline:
        tail.poll()
        peak = max(peak, harness.rss_kb(pid) or 0)
        time.sleep(0.004)
    t_end = max(tail.seen.values(), default=time.time())
    cpu1 = harness.cpu_s(pid)
    for p in procs:
        p.join(60)
    time.sleep(1.0)  # the goodbyes; then memory with nothing held
    rss1 = harness.rss_kb(pid)
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its samples on SIGINT
        spy.wait(60)
    col.kill(signal.SIGTERM)
    col.wait(60)
    sent = [json.loads(o.read_text()) for o in outs]
    msgs = sum(s["sent"] for s in sent) - n  # the goodbyes come after the clock stops
    last_epoch_sent = [max(s["epoch_sent"][e] for s in sent) for e in range(epochs)]
    lat = [tail.seen[e + 1] - last_epoch_sent[e] for e in range(epochs) if e + 1 in tail.seen]
    info = harness.inspect(col.record)
    ranks = info["runs"]["scale"]["ranks"]
    lost = sum(s["sent"] for s in sent) - sum(c["messages"] for c in ranks.values())
    return {
        "ranks": n, "paced": paced, "steps_per_epoch": spe, "messages": msgs,
        "epochs_closed": len(tail.seen),
        "msgs_per_s": msgs / max(1e-9, t_end - t0),
        "cpu_us_per_msg": 1e6 * (cpu1 - cpu0) / msgs,
        "rss_kb_per_rank": (rss1 - rss0) / n, "rss_growth_mb": (rss1 - rss0) / 1024,
        "rss_peak_mb": peak / 1024,
        "epoch_close_p50_ms": 1e3 * statistics.median(lat) if lat else float("nan"),
        "epoch_close_max_ms": 1e3 * max(lat) if lat else float("nan"),
        "lost": lost, "seq_gaps": sum(c["seq_gaps"] for c in ranks.values()),
    }


def bench_ranks(counts: tuple[int, ...] = (10, 100, 1000), rate: float = 20_000.0,
                epoch_s: float = 1.5, epochs: int = 8, senders: int = 4,
                profile: Path | None = None) -> dict:
    """The table's rows, and the figures ``make bench`` judges."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tw-ranks-") as t:
        tmp = Path(t)
        for n in counts:
            print(f"  {n} ranks at {rate:.0f} msgs/s ...", flush=True)
            rows.append(run_job(tmp, n, rate, epoch_s, epochs, senders, profile))
        if 1000 in counts:
            print("  1000 ranks, unpaced ...", flush=True)
            rows.append(run_job(tmp, 1000, 0.0, epoch_s, epochs, senders, profile))
    print_table(rows)
    by = {(r["ranks"], r["paced"]): r for r in rows}
    out: dict = {"ranks_table": rows}
    if (1000, True) in by:
        r = by[(1000, True)]
        out.update(ranks_1000_msgs_per_s=r["msgs_per_s"],
                   ranks_1000_cpu_us_per_msg=r["cpu_us_per_msg"],
                   ranks_1000_rss_kb_per_rank=r["rss_kb_per_rank"],
                   ranks_1000_epoch_close_ms=r["epoch_close_p50_ms"])
    if (1000, False) in by:
        out["ranks_1000_max_msgs_per_s"] = by[(1000, False)]["msgs_per_s"]
    if (100, True) in by and (1000, True) in by:  # the per-rank slope, fixed costs aside
        out["ranks_rss_kb_per_rank_100_to_1000"] = 1024 * (
            by[(1000, True)]["rss_growth_mb"] - by[(100, True)]["rss_growth_mb"]) / 900
    if (10, True) in by and (1000, True) in by:
        out["ranks_cpu_per_msg_1000_over_10"] = (by[(1000, True)]["cpu_us_per_msg"]
                                                 / by[(10, True)]["cpu_us_per_msg"])
    return out


def print_table(rows: list[dict]) -> None:
    cols = [("ranks", "{}", "ranks"), ("paced", "{}", "paced"), ("steps_per_epoch", "{}", "spe"),
            ("msgs_per_s", "{:.0f}", "msgs/s"), ("cpu_us_per_msg", "{:.2f}", "cpu us/msg"),
            ("rss_growth_mb", "{:.1f}", "rss +MB"), ("rss_kb_per_rank", "{:.1f}", "KB/rank"),
            ("rss_peak_mb", "{:.1f}", "peak MB"),
            ("epoch_close_p50_ms", "{:.1f}", "close p50 ms"),
            ("epoch_close_max_ms", "{:.1f}", "close max ms"), ("lost", "{}", "lost"),
            ("seq_gaps", "{}", "gaps")]
    cells = [[f.format(r[k]) for k, f, _ in cols] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, _, h) in enumerate(cols)]
    print("  " + " | ".join(h.rjust(w) for (_, _, h), w in zip(cols, widths, strict=True)))
    for c in cells:
        print("  " + " | ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", default="10,100,1000")
    ap.add_argument("--rate", type=float, default=20_000.0, help="messages/s, all ranks")
    ap.add_argument("--epoch-s", type=float, default=1.5)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--senders", type=int, default=4, help="sender processes")
    ap.add_argument("--profile", type=Path, default=None,
                    help="run the collectors under py-spy: collapsed stacks into this folder")
    a = ap.parse_args()
    if a.profile is not None:
        a.profile.mkdir(parents=True, exist_ok=True)
    res = bench_ranks(tuple(int(x) for x in a.ranks.split(",")), a.rate, a.epoch_s,
                      a.epochs, a.senders, a.profile)
    res["machine"] = {"cpus": os.cpu_count()}
    Path("bench-ranks.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
