"""One training rank for the soak and the fault checks: a real loop, the real client.

    python benchmarks/rank_worker.py --endpoint ipc:///tmp/c.sock --run soak --rank 0 \
        --world 4 --out rank0.json --steps 5000 --duration-s 30

A small MLP denoises windows of gait-like signals (5 loss terms, an EMA copy, gradient
clipping), so the training thread costs little and the load falls on the collector. Every
``--val-every`` epochs it ships generated samples of ``--val-shape`` (float32). It stops
after ``--steps`` steps or ``--duration-s`` seconds, whichever comes first, then writes
its client's counters and the time of every ``log_*`` call (seconds; wall, and this
thread's CPU time) to ``--out``.

Faults on request: ``--die-after-epoch K`` exits without ``close()`` right after epoch K;
``--loader-workers N`` feeds batches through a DataLoader with N forked workers whose
``__getitem__`` tries to log through the parent's client.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
from torch import nn

from trainer_client import TrainerClient

CHANNELS = ["knee_angle_r", "grf_vz_r", "hip_angle_r", "ankle_angle_r",
            "knee_angle_l", "grf_vz_l", "hip_angle_l", "ankle_angle_l"]
TERMS = ("simple", "vel", "fk", "drift", "slide")
_client: TrainerClient | None = None  # what a forked DataLoader worker would reach for
_client_pid = -1


class _Windows(torch.utils.data.Dataset):
    """Windows of the pseudo dataset; in a forked worker, also a (refused) log call."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window, and [calls refused, messages queued] by this worker's log call."""
        seen = [0, 0]
        if _client is not None and os.getpid() != _client_pid:
            before = _client.stats
            _client.log_step(0.0)  # must go nowhere: the socket is the parent's
            after = _client.stats
            seen = [after["after_close"] - before["after_close"],
                    after["queued"] - before["queued"]]
        return self.data[i], torch.tensor(seen)


def _pseudo_data(n: int, t: int, gen: torch.Generator) -> torch.Tensor:
    phase = torch.rand(n, 1, len(CHANNELS), generator=gen) * 6.283
    time_ax = torch.linspace(0, 6.283, t).reshape(1, t, 1)
    x = torch.sin(time_ax + phase) + 0.1 * torch.randn(n, t, len(CHANNELS), generator=gen)
    return (x - x.mean((0, 1))) / x.std((0, 1))


def _losses(model: nn.Module, x: torch.Tensor, gen: torch.Generator
            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    noisy = x + 0.3 * torch.randn(x.shape, generator=gen)
    pred = model(noisy)
    err = pred - x
    vel = (pred[:, 1:] - pred[:, :-1]) - (x[:, 1:] - x[:, :-1])
    terms = {"simple": err.pow(2).mean(), "vel": vel.pow(2).mean(),
             "fk": 0.1 * err[..., :4].abs().mean(), "drift": 0.01 * err.mean(1).pow(2).mean(),
             "slide": 0.01 * vel[..., 4:].abs().mean()}
    return sum(terms.values()), terms


def main() -> None:
    global _client, _client_pid
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=2000, help="total steps at most")
    ap.add_argument("--duration-s", type=float, default=60.0, help="wall time at most")
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--val-every", type=int, default=5, help="epochs; 0: never")
    ap.add_argument("--val-shape", default="64,128,8")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--close-timeout", type=float, default=10.0)
    ap.add_argument("--die-after-epoch", type=int, default=0)
    ap.add_argument("--loader-workers", type=int, default=0)
    ap.add_argument("--ddp-port", type=int, default=0,
                    help="train with DDP (gloo, loopback): ranks in lockstep, equal weights")
    a = ap.parse_args()

    torch.set_num_threads(1)  # the machine is shared with the collector and other ranks
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(1000 + a.rank)
    val_shape = tuple(int(d) for d in a.val_shape.split(","))
    net = nn.Sequential(nn.Linear(len(CHANNELS), 32), nn.SiLU(), nn.Linear(32, len(CHANNELS)))
    ddp = None
    if a.ddp_port:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.ddp_port}",
                                rank=a.rank, world_size=a.world)
        ddp = dist
    # DDP broadcasts rank 0's weights and all-reduces gradients: the ranks stay equal
    model = nn.parallel.DistributedDataParallel(net) if ddp else net
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.99))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    data = _pseudo_data(512, 32, gen)

    tw = TrainerClient(endpoint=a.endpoint, run=a.run, rank=a.rank, world_size=a.world)
    _client, _client_pid = tw, os.getpid()
    calls: dict[str, list[float]] = {"config": [], "data": [], "step": [], "validation": [],
                                     "epoch": []}
    made = {"hello": 1, "config": 0, "data": 0, "step": 0, "validation": 0, "epoch": 0}

    cpu: list[float] = []  # this thread's CPU time in each call: wall minus CPU = waiting

    def timed(kind: str, fn: Any, *args: Any, **kw: Any) -> None:
        c0, t0 = time.thread_time(), time.perf_counter()
        fn(*args, **kw)
        calls[kind].append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)

    timed("config", tw.log_config, {"learning_rate": 1e-3, "weight_decay": 1e-4,
                                    "batch_size": a.batch, "epochs": a.steps // a.steps_per_epoch,
                                    "window_len": data.shape[1]}, model=model)
    made["config"] += 1
    if a.rank == 0:
        timed("data", tw.log_data_stats, data, CHANNELS, mean=torch.zeros(len(CHANNELS)),
              std=torch.ones(len(CHANNELS)))
        made["data"] += 1  # one chunk: the data is far below the client's chunk size

    loader = None
    if a.loader_workers:
        loader = torch.utils.data.DataLoader(
            _Windows(data), batch_size=a.batch, shuffle=True, num_workers=a.loader_workers,
            multiprocessing_context="fork", generator=torch.Generator().manual_seed(a.rank))
    child_refused = child_queued = 0
    deadline = time.monotonic() + a.duration_s
    epoch, step, done = 0, 0, False
    while not done:
        epoch += 1
        batches = iter(loader) if loader is not None else None
        for s in range(a.steps_per_epoch):
            if batches is not None:
                try:
                    x, seen = next(batches)
                except StopIteration:
                    batches = iter(loader)
                    x, seen = next(batches)
                child_refused += int(seen[:, 0].sum())
                child_queued += int(seen[:, 1].sum())
            else:
                i = (s * a.batch) % (data.shape[0] - a.batch)
                x = data[i:i + a.batch]
            loss, terms = _losses(model, x, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            ema.update_parameters(net)
            timed("step", tw.log_step, loss, terms, model=model, grad_norm=norm)
            made["step"] += 1
            step += 1
            if a.step_sleep:
                time.sleep(a.step_sleep)
            if step >= a.steps or (ddp is None and time.monotonic() >= deadline):
                done = True
                break
        if a.val_every and epoch % a.val_every == 0:
            with torch.no_grad():
                samples = net(torch.randn(val_shape, generator=gen))
            names = CHANNELS if val_shape[-1] == len(CHANNELS) else None
            timed("validation", tw.log_validation, epoch, samples, names)
            made["validation"] += 1
        timed("epoch", tw.log_epoch, epoch, model=model, ema_model=ema)
        made["epoch"] += 1
        if ddp is not None and not done:  # the clock decides for every rank at once
            flag = torch.tensor([float(time.monotonic() >= deadline)])
            ddp.all_reduce(flag, op=ddp.ReduceOp.MAX)
            done = bool(flag.item())
        if epoch == a.die_after_epoch:
            break
    died = epoch == a.die_after_epoch
    if died:
        # Let the sender hand over what it holds, so that only the goodbye is missing.
        until = time.monotonic() + 10.0
        while tw.stats["queued"] and time.monotonic() < until:
            time.sleep(0.05)
        time.sleep(1.0)  # and ZeroMQ's I/O thread, the last hop
    else:
        t0 = time.perf_counter()
        tw.close(timeout=a.close_timeout)
        calls["close"] = [time.perf_counter() - t0]
    if ddp is not None:
        ddp.destroy_process_group()
    with open(a.out, "w") as fh:
        json.dump({"rank": a.rank, "pid": os.getpid(), "stats": tw.stats, "made": made,
                   "epochs": epoch, "died": died, "child_refused": child_refused,
                   "child_queued": child_queued, "calls": calls, "calls_cpu": cpu}, fh)
    if died:
        os._exit(0)


if __name__ == "__main__":
    main()
