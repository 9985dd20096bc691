"""Real training runs of the gait-diffusion example, each with one thing right or wrong.

The model, data, loss, sampler and EMA are the example's (``examples/gait_diffusion``);
this loop is its training loop, small (256 windows, 8 steps an epoch) and with hooks for
what goes wrong. Every step ships its loss, terms, gradient norms and the optimizer's
learning rate; the collector computes everything else.

    python tests/workers/detection_runs.py --endpoint ipc:///tmp/c.sock --out sent \
        healthy flat copies nan_step exploding renamed

Runs (``det-<name>``):
- healthy: 24 epochs at lr 1e-3, samples every 6 epochs.
- flat: lr 1e-8, 14 epochs: the loss is flat noise.
- copies: 6 epochs; the sampler of the validation at epoch 6 returns 64 copies of one
  training window (a realistic sample), the one at epoch 3 samples properly.
- nan_step: one batch of epoch 3 holds a NaN: that step's loss and gradients are NaN and
  the step is skipped, as a GradScaler skips it; 5 epochs.
- exploding: from epoch 3 the learning rate is 2000x and clipping is off; 5 epochs.
- renamed: healthy, but its channels are named c0..c7 (a model the gait profile does not
  know); 4 epochs, samples at epoch 4.
What each sent is written to ``OUT/det-<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.gait_diffusion.data import DataConfig, make_dataset  # noqa: E402
from examples.gait_diffusion.losses import GaitLoss  # noqa: E402
from examples.gait_diffusion.model import Denoiser, DenoiserConfig, Diffusion, Ema  # noqa: E402
from trainer_client import TrainerClient  # noqa: E402

LR = 1e-3
BATCH = 32
WINDOWS = 256
PLANS = {
    "healthy": dict(epochs=24, validate=(6, 12, 18, 24)),
    "flat": dict(epochs=14, validate=(7, 14), lr=1e-8),
    "copies": dict(epochs=6, validate=(3, 6), copies_at=6, val_samples=64),
    "nan_step": dict(epochs=5, validate=(), nan_at=(3, 3)),
    "exploding": dict(epochs=5, validate=(), explode_from=3),
    "renamed": dict(epochs=4, validate=(4,), renamed=True),
}


def run(name: str, endpoint: str, out: Path) -> None:
    plan = PLANS[name]
    torch.manual_seed(0)
    data = make_dataset(DataConfig(pseudo_dataset_len=WINDOWS, window_len=64, seed=0))
    channels = [f"c{i}" for i in range(8)] if plan.get("renamed") else list(data.channel_names)
    net = Denoiser(DenoiserConfig(channels=len(channels)))
    ema, diffusion = Ema(net), Diffusion(50)
    loss_fn = GaitLoss(data.channel_names, data.mean, data.std, data.sample_rate_hz)
    base_lr = plan.get("lr", LR)
    opt = torch.optim.AdamW(net.parameters(), lr=base_lr, weight_decay=1e-2)
    config = {"learning_rate": base_lr, "weight_decay": 1e-2, "batch_size": BATCH,
              "pseudo_dataset_len": WINDOWS, "epochs": plan["epochs"], "window_len": 64,
              "num_train_trials": 16}
    tw = TrainerClient(endpoint, run=f"det-{name}", rank=0, world_size=1)
    tw.log_config(config, model=net)
    tw.log_data_stats(data.windows, channels, mean=data.mean, std=data.std)
    sent: dict = {"run": f"det-{name}", "config": config, "channels": channels,
                  "epochs": [], "nan_steps": [], "lr": []}
    gen = torch.Generator().manual_seed(1)
    step = 0
    for epoch in range(1, plan["epochs"] + 1):
        exploding = epoch >= plan.get("explode_from", 10 ** 9)
        lr = base_lr * (2000.0 if exploding else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        clip = math.inf if exploding else 1.0
        order = torch.randperm(WINDOWS, generator=gen)
        losses = []
        for b in range(WINDOWS // BATCH):
            x0 = data.windows[order[b * BATCH:(b + 1) * BATCH]].clone()
            if (epoch, b) == plan.get("nan_at"):
                x0[5, 10, 2] = math.nan  # one bad value in one batch
            t = torch.randint(0, diffusion.steps, (BATCH,), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            eps_hat, x0_hat = diffusion.predict(net, diffusion.add_noise(x0, t, eps), t)
            loss, terms = loss_fn(eps_hat, eps, x0_hat, x0, diffusion.alpha_bar[t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            step += 1
            tw.log_step(loss.detach(), {k: v.detach() for k, v in terms.items()}, model=net,
                        grad_norm=norm, lr=opt.param_groups[0]["lr"])
            losses.append(float(loss))  # after log_step: the worker's own record only
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                sent["nan_steps"].append(step)  # skipped, as a GradScaler skips it
                continue
            opt.step()
            ema.update(net)
        sent["lr"].append(lr)
        if epoch in plan["validate"]:
            n = plan.get("val_samples", 32)
            if epoch == plan.get("copies_at"):
                samples = data.windows[100:101].repeat(n, 1, 1)  # one real window, n times
            else:
                samples = diffusion.sample(ema.module, n, 64, len(channels),
                                           generator=torch.Generator().manual_seed(epoch))
            tw.log_validation(epoch, samples, channels)
        tw.log_epoch(epoch, model=net, ema_model=ema.module)
        sent["epochs"].append({"epoch": epoch, "losses": losses})
    tw.close(timeout=10.0)
    sent["stats"] = tw.stats
    (out / f"det-{name}.json").write_text(json.dumps(sent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("names", nargs="+", choices=sorted(PLANS))
    a = ap.parse_args()
    torch.set_num_threads(1)
    a.out.mkdir(parents=True, exist_ok=True)
    for name in a.names:
        run(name, a.endpoint, a.out)


if __name__ == "__main__":
    main()
