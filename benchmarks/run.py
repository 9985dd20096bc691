"""``make bench``: trainwatch's speed targets, as ratios against baselines in the same run.

1. Training-thread time per step of a ~1M-parameter MLP on the CPU (clip_grad_norm_):
   (a) no logging, (b) ``log_step(loss, terms, grad_norm=norm)`` to a live collector,
   (c) the synchronous way: ``.item()`` on loss, terms and norm, then ``wandb.log``
   (offline), (d) ``torch.utils.tensorboard`` ``add_scalars``. Configurations are
   interleaved in rounds so drift on a shared machine hits them alike.
2. Collector ingest from 4 sender processes vs bare pyzmq PUSH->PULL of the same messages
   (``recv_multipart``; and the collector's zero-copy receive alone, for transparency).
3. Replay rate of the recording made in 2 (one core).
4. numba kernels vs numpy: moments of 1e7 values, and the sample-diversity figures
   (min and median of the repeats of each).
5. One job of 10, 100 and 1,000 simulated ranks against a real collector at one rate
   (benchmarks/bench_ranks.py): messages/s, collector CPU per message, RSS per rank,
   epoch-close latency; CPU per message must stay flat from 10 to 1,000 ranks.

Prints a table and writes ``bench-results.json`` in the current folder.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

TARGETS = {"client_added_pct": ("<=", 2.0), "sync_wandb_over_client": (">=", 20.0),
           "collector_over_bare_zmq": (">=", 0.7), "replay_msgs_per_s": (">=", 300_000.0),
           "kernel_over_numpy": (">=", 5.0), "diversity_std_kernel_over_numpy": (">=", 5.0),
           "duplicate_pairs_kernel_over_numpy": (">=", 5.0), "w1_kernel_over_numpy": (">=", 5.0),
           # cost per message flat from 10 to 1,000 ranks; memory per rank beyond held data
           "ranks_cpu_per_msg_1000_over_10": ("<=", 1.5),
           "ranks_rss_kb_per_rank_100_to_1000": ("<=", 100.0),
           "ranks_1000_rss_kb_per_rank": ("<=", 100.0)}


# -- 1. the training thread ----------------------------------------------------------------
def bench_client(tmp: Path, rounds: int = 7, steps: int = 150) -> dict:
    import torch

    from trainer_client import TrainerClient

    torch.manual_seed(0)
    torch.set_num_threads(1)  # one core for the loop; the collector has the other
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 64))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 512), torch.randn(64, 64)

    endpoint = f"ipc://{tmp}/bench.sock"
    col = mp.get_context("spawn").Process(target=_serve, args=(endpoint,), daemon=True)
    col.start()
    time.sleep(3.0)  # the collector imports numba and binds
    tw = TrainerClient(endpoint=endpoint, run="bench", rank=0, world_size=1)

    import wandb

    wrun = wandb.init(mode="offline", dir=str(tmp), project="trainwatch-bench",
                      settings=wandb.Settings(silent=True, console="off",
                                              x_disable_stats=True, save_code=False))
    from torch.utils.tensorboard import SummaryWriter

    tb = SummaryWriter(str(tmp / "tb"))
    step_no = [0]

    def step(mode: str) -> tuple[float, float]:
        t0 = time.perf_counter()
        pred = model(x)
        err = (pred - y).pow(2)
        terms = {"simple": err[:, :16].mean(), "vel": err[:, 16:32].mean(),
                 "fk": err[:, 32:48].mean(), "drift": err[:, 48:56].mean(),
                 "slide": err[:, 56:].mean()}
        loss = sum(terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        t1 = time.perf_counter()
        step_no[0] += 1
        if mode == "client":
            tw.log_step(loss, terms, grad_norm=norm)
        elif mode == "wandb":
            row = {f"loss/{k}": v.item() for k, v in terms.items()}
            row["loss"] = loss.item()
            row["grad_norm"] = norm.item()
            wrun.log(row, step=step_no[0])
        elif mode == "tensorboard":
            tb.add_scalars("loss", {k: v for k, v in terms.items()}, step_no[0])
            tb.add_scalar("grad_norm", norm, step_no[0])
        t2 = time.perf_counter()
        return t2 - t0, t2 - t1

    modes = ["none", "client", "wandb", "tensorboard"]
    for m in modes:  # warm-up
        for _ in range(30):
            step(m)
    total: dict[str, list[float]] = {m: [] for m in modes}
    added: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(rounds):
        for m in modes:
            ts = [step(m) for _ in range(steps)]
            total[m].append(statistics.median(t for t, _ in ts))
            added[m].append(statistics.median(a for _, a in ts))
    tw.close(timeout=10)
    wrun.finish()
    tb.close()
    col.terminate()
    col.join(30)

    med = {m: statistics.median(total[m]) for m in modes}
    add = {m: statistics.median(added[m]) for m in modes}
    base = med["none"]
    return {
        "step_s_none": base,
        "step_s_client": med["client"],
        "step_s_sync_wandb": med["wandb"],
        "step_s_tensorboard": med["tensorboard"],
        "call_s_client": add["client"],
        "call_s_sync_wandb": add["wandb"],
        "call_s_tensorboard": add["tensorboard"],
        # the logging call's own time on the training thread, as a share of a bare step
        "client_added_pct": 100.0 * add["client"] / base,
        "step_delta_pct_client": 100.0 * (med["client"] - base) / base,
        "sync_wandb_over_client": add["wandb"] / add["client"],
        "tensorboard_over_client": add["tensorboard"] / add["client"],
        "client_sent": tw.stats["sent"], "client_dropped": tw.stats["dropped"],
        "client_health_messages": tw.stats.get("health", {}).get("received", 0),
    }


def _serve(endpoint: str) -> None:
    """A collector as ``trainwatch collect`` runs one, back-channel included (the client's
    sender thread then hears its run's state every second)."""
    from collector.analysis.profile_load import load_profile
    from collector.ingest.pipeline import Pipeline
    from collector.ingest.server import Collector
    from collector.sinks.health_pub import HealthPublisher
    from trainer_client.wire.health import health_endpoint

    pub = HealthPublisher()
    Collector([endpoint], Pipeline(load_profile(None), pub), health=pub,
              health_binds=[health_endpoint(endpoint)]).serve()


# -- 2. ingest -----------------------------------------------------------------------------
def _step_frames(run: str, rank: int, seq: int) -> list[bytes]:
    from trainer_client import wire

    body = [0.51234, 1.2345, ["simple", "vel", "fk", "drift", "slide"],
            [0.1, 0.2, 0.05, 0.01, 0.02]]
    h = wire.Header(wire.KIND_STEP, run, rank, 4, 12345, seq, seq, 0, time.time(), 0, body)
    return [bytes(f) for f in wire.encode(h, [])]


def _push(endpoint: str, rank: int, n: int) -> None:
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 0)
    s.connect(endpoint)
    time.sleep(0.3)
    frames = [_step_frames("ingest", rank, i) for i in range(n)]
    for f in frames:
        s.send_multipart(f)
    s.close(linger=-1)
    ctx.term()


def _receive(endpoint: str, total: int, pipeline: object | None, frames: bool = False
             ) -> float:
    """Messages per second through one PULL socket fed by 4 sender processes.

    No pipeline: the bare pyzmq loop (``recv_multipart``), or with ``frames`` the
    collector's own zero-copy receive without any processing. With a pipeline: the
    collector's drain (receive, bulk parse, record, state).
    """
    import zmq

    from collector.ingest.server import DRAIN_BATCH, DRAIN_LIMIT, Collector, receive

    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 0)
    s.bind(endpoint)
    procs = [mp.get_context("fork").Process(target=_push, args=(endpoint, r, total // 4))
             for r in range(4)]
    for p in procs:
        p.start()
    recv = s.recv_multipart
    first = recv()
    t0 = time.perf_counter()
    n = 1
    if pipeline is None and not frames:
        while n < total:
            recv()
            n += 1
    elif pipeline is None:
        while n < total:
            if s.poll(1000):
                n += len(receive(s, DRAIN_BATCH))
    else:
        col = Collector([endpoint], pipeline)
        pipeline.feed(first)
        while n < total:
            if s.poll(1000):
                n += col._drain(s, DRAIN_LIMIT)
    dt = time.perf_counter() - t0
    for p in procs:
        p.join()
    s.close()
    ctx.term()
    return (total - 1) / dt


def bench_ingest(tmp: Path, total: int = 200_000, rounds: int = 5) -> dict:
    """Rounds of (bare, bare zero-copy, collector), interleaved so drift hits all alike."""
    from collector.analysis.profile_load import load_profile
    from collector.ingest.pipeline import Pipeline
    from collector.recording.writer import RecordWriter

    rec = tmp / "ingest.twrec"
    bare, frames, col = [], [], []
    for i in range(rounds):
        bare.append(_receive(f"ipc://{tmp}/bare{i}.sock", total, None))
        frames.append(_receive(f"ipc://{tmp}/frames{i}.sock", total, None, frames=True))
        rec.unlink(missing_ok=True)
        pipe = Pipeline(load_profile(None), recorder=RecordWriter(rec))
        pipe.warm_up()
        col.append(_receive(f"ipc://{tmp}/col{i}.sock", total, pipe))
        pipe.finish()
    return {"bare_zmq_msgs_per_s": max(bare), "bare_zmq_zero_copy_msgs_per_s": max(frames),
            "collector_msgs_per_s": max(col), "collector_over_bare_zmq": max(col) / max(bare),
            "collector_over_bare_zmq_round_median": statistics.median(
                c / b for c, b in zip(col, bare, strict=True)),
            "collector_over_bare_zero_copy": max(col) / max(frames), "_recording": str(rec)}


# -- 3. replay -----------------------------------------------------------------------------
def bench_replay(rec: Path) -> dict:
    from collector.analysis.profile_load import load_profile
    from collector.ingest.pipeline import Pipeline

    best = 0.0
    for _ in range(3):
        pipe = Pipeline(load_profile(None))
        t0 = time.perf_counter()
        pipe.feed_recording(rec)
        dt = time.perf_counter() - t0
        best = max(best, pipe.accepted / dt)
    return {"replay_msgs_per_s": best, "replay_messages": pipe.accepted}


def main() -> int:
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("client overhead on a training step ...", flush=True)
        results.update(bench_client(tmp))
        print("collector ingest vs bare zmq ...", flush=True)
        ing = bench_ingest(tmp)
        rec = Path(ing.pop("_recording"))
        results.update(ing)
        print("replay ...", flush=True)
        results.update(bench_replay(rec))
    print("kernels vs numpy ...", flush=True)
    from bench_kernels import bench_kernels

    results.update(bench_kernels())
    print("1,000 ranks ...", flush=True)
    from bench_ranks import bench_ranks

    results.update(bench_ranks())
    results["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    Path("bench-results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
    print(f"\n{'figure':<40} {'value':>14}  target")
    for k, v in sorted(results.items()):
        if isinstance(v, float):
            t = TARGETS.get(k)
            mark = ""
            if t:
                ok = v <= t[1] if t[0] == "<=" else v >= t[1]
                mark = f"{t[0]} {t[1]:g}  {'ok' if ok else 'MISSED'}"
            print(f"{k:<40} {v:>14.6g}  {mark}")
    print("\nwrote bench-results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
