"""A real training process for the tests: a small MLP, real backward, the real client."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from trainer_client import TrainerClient


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--run", required=True)
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--close-timeout", type=float, default=10.0)
    ap.add_argument("--validate", action="store_true")
    ap.add_argument("--validate-after", action="store_true",
                    help="log_validation(epoch) after log_epoch(epoch), as loops often do")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--curve-keys", default=None)
    ap.add_argument("--no-bye", action="store_true", help="exit without close(): a dead rank")
    ap.add_argument("--explode", default="",
                    help="epochs (e.g. 3-6,9) whose gradients are scaled up: norms past 100")
    a = ap.parse_args()

    explode = {e for part in a.explode.split(",") if part
               for e in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)}
    torch.manual_seed(a.seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    ema = torch.optim.swa_utils.AveragedModel(model)
    opt = torch.optim.SGD(model.parameters(), lr=a.lr)
    g = torch.Generator().manual_seed(1000 + a.rank)
    x = torch.randn(256, 8, generator=g)
    y = torch.stack([x[:, :4].sum(1), x[:, 4:].prod(1)], 1)
    tw = TrainerClient(endpoint=a.endpoint, run=a.run, rank=a.rank, world_size=a.world,
                       curve_keys=a.curve_keys)
    tw.log_config({"learning_rate": a.lr, "batch_size": 32, "epochs": a.epochs}, model=model)
    made = {"hello": 1, "config": 1, "step": 0, "epoch": 0, "validation": 0}
    step_times = []
    for epoch in range(1, a.epochs + 1):
        for s in range(a.steps):
            i = (s * 32) % 256
            pred = model(x[i:i + 32])
            mse = (pred - y[i:i + 32]).pow(2).mean(0)
            loss = mse.sum()
            opt.zero_grad()
            (loss * (1e4 if epoch in explode else 1.0)).backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            ema.update_parameters(model)
            t0 = time.perf_counter()
            tw.log_step(loss, {"a": mse[0], "b": mse[1]}, model=model, grad_norm=norm)
            step_times.append(time.perf_counter() - t0)
            made["step"] += 1
            if a.step_sleep:
                time.sleep(a.step_sleep)
        if a.validate or a.validate_after:
            with torch.no_grad():
                samples = model(torch.randn(64, 8, generator=g)).unsqueeze(1).repeat(1, 4, 1)
            if a.bf16:
                samples = samples.to(torch.bfloat16)
        if a.validate:
            tw.log_validation(epoch, samples, ["knee_angle_r", "grf_vz_r"])
            made["validation"] += 1
        tw.log_epoch(epoch, model=model, ema_model=ema)
        made["epoch"] += 1
        if a.validate_after:
            tw.log_validation(epoch, samples, ["knee_angle_r", "grf_vz_r"])
            made["validation"] += 1
    t0 = time.perf_counter()
    if not a.no_bye:
        tw.close(timeout=a.close_timeout)
    close_s = time.perf_counter() - t0
    with open(a.out, "w") as fh:
        json.dump({"stats": tw.stats, "made": made, "close_s": close_s,
                   "max_step_s": max(step_times), "mean_step_s": sum(step_times) /
                   len(step_times)}, fh)
    if a.no_bye:
        time.sleep(0.5)  # let the sender hand over what it has, then die without a goodbye
        os._exit(0)


if __name__ == "__main__":
    main()
