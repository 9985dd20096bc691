"""A real DDP rank for the back-channel tests: torch.distributed with gloo on the CPU, a
model whose gradients are all-reduced every step, the real client, and the loop a user
writes: ``if tw.should_stop: break``. Writes what it saw to ``--out`` (JSON)."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import threading
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from trainer_client import TrainerClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--health-endpoint", default=None)
    ap.add_argument("--run", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--master-port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--step-sleep", type=float, default=0.02)
    ap.add_argument("--explode", default="", help="epochs (e.g. 3-8) whose loss is x1e4")
    ap.add_argument("--curve-keys", default=None)
    ap.add_argument("--raising-callback", action="store_true")
    ap.add_argument("--settle", type=float, default=0.0,
                    help="after the loop, wait up to this long for the last epoch's verdict")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    explode = {e for part in a.explode.split(",") if part
               for e in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.master_port}",
                            rank=a.rank, world_size=a.world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP expects
    model = DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1000 + a.rank)
    x = torch.randn(512, 8, generator=g)
    y = torch.stack([x[:, :4].sum(1), x[:, 4:].sum(1)], 1)

    tw = TrainerClient(endpoint=a.endpoint, run=a.run, curve_keys=a.curve_keys,
                       health_endpoint=a.health_endpoint)
    main_thread = threading.get_ident()
    seen: list[dict] = []

    def record(f) -> None:  # noqa: ANN001 - a trainer_client.feedback.Finding
        seen.append({"seq": f.seq, "epoch": f.epoch, "rule": f.rule, "kind": f.kind,
                     "on_training_thread": threading.get_ident() == main_thread,
                     "at_step": tw._step})

    def raising(f) -> None:  # noqa: ANN001
        raise RuntimeError("a user's callback that fails")

    if a.raising_callback:
        tw.on_finding(raising)
    tw.on_finding(record)
    tw.log_config({"learning_rate": 0.01, "batch_size": 32, "epochs": a.epochs}, model=model)
    levels, call_s, epochs_done, stopped = [], [], 0, False
    t_start = time.monotonic()
    for epoch in range(1, a.epochs + 1):
        for s in range(a.steps):
            i = (s * 32) % 512
            loss = (model(x[i:i + 32]) - y[i:i + 32]).pow(2).mean()
            opt.zero_grad()
            (loss * (1e4 if epoch in explode else 1.0)).backward()  # all-reduce here
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            t0 = time.perf_counter()
            tw.log_step(loss, model=model, grad_norm=norm)
            stop = tw.should_stop
            call_s.append(time.perf_counter() - t0)
            if stop:
                stopped = True
                break
            time.sleep(a.step_sleep)
        levels.append(tw.health.level)
        tw.log_epoch(epoch, model=model)
        epochs_done = epoch
        if stopped:
            break
    loop_s = time.monotonic() - t_start
    deadline = time.monotonic() + a.settle
    while time.monotonic() < deadline and (tw.health.epoch or 0) < epochs_done:
        time.sleep(0.05)
    h = tw.health
    t0 = time.perf_counter()
    tw.close(timeout=10.0)
    close_s = time.perf_counter() - t0
    with open(a.out, "w") as fh:
        json.dump({"steps": tw._step, "stopped": stopped, "epochs_done": epochs_done,
                   "level": h.level, "health_epoch": h.epoch, "stop_step": h.stop_step,
                   "stopped_by": h.stopped_by, "raised": [f.rule for f in h.findings],
                   "levels": levels, "findings": seen, "loop_s": loop_s, "close_s": close_s,
                   "max_call_s": max(call_s), "stats": tw.stats}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
