"""Trains the gait-diffusion example on the CPU, watched by trainwatch.

    python examples/gait_diffusion/train.py                        # one process
    torchrun --nproc_per_node 2 examples/gait_diffusion/train.py   # two ranks, gloo, DDP
    python examples/gait_diffusion/train.py --inject collapse      # reproduce a failure

Every metric of the training-health guide goes through ``TrainerClient`` (endpoint from
``--endpoint`` or ``TRAINWATCH_ENDPOINT``); with no collector listening the client drops
its messages and training is unaffected.

``--inject`` makes a failure really happen in this training run:

- ``exploding``: from epoch 3 the learning rate is 2000x and clipping is off: the weights
  run away, gradient norms pass 100, then the loss turns NaN.
- ``collapse``: the denoiser's view of the noisy window is cut and it predicts the clean
  window, so it can only learn one constant signal; every generated sample is that signal.
- ``stall``: from epoch 3 the learning rate is 0 (a schedule stuck at zero). The stalled
  epochs replay one epoch's batches and noise, so their losses repeat exactly: the loss
  stops decreasing, with no sampling jitter to hide it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.gait_diffusion.data import DataConfig, GaitDataset, make_dataset  # noqa: E402
from examples.gait_diffusion.losses import GaitLoss  # noqa: E402
from examples.gait_diffusion.model import (  # noqa: E402
    Denoiser,
    DenoiserConfig,
    Diffusion,
    Ema,
    count_params,
)
from trainer_client import TrainerClient  # noqa: E402

INJECTS = ("none", "exploding", "collapse", "stall")
# Sizes per mode: the healthy default finishes in about a minute on two CPU cores; each
# injected failure shows within seconds. Any option given on the command line wins.
MODE_DEFAULTS: dict[str, dict[str, int]] = {
    "none": dict(epochs=30, pseudo_dataset_len=1024, validate_every=10),
    "exploding": dict(epochs=6, pseudo_dataset_len=512, validate_every=3),
    "collapse": dict(epochs=10, pseudo_dataset_len=256, validate_every=5),
    "stall": dict(epochs=14, pseudo_dataset_len=256, validate_every=7),
}
INJECT_FROM_EPOCH = 3  # exploding and stall start here; epochs before it train normally
EXPLODE_LR_FACTOR = 2000.0


@dataclass
class TrainConfig:
    """The seed's hyperparameters first (they are what ``log_config`` ships), then the rest."""

    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 32  # per rank
    pseudo_dataset_len: int = 1024
    epochs: int = 30
    window_len: int = 64
    num_train_trials: int = 16
    validate_every: int = 10  # and at the last epoch
    seed: int = 0
    inject: str = "none"
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.995
    diffusion_steps: int = 50
    val_samples: int = 64
    endpoint: str | None = None
    curve_keys: str | None = None
    run: str | None = None

    def __post_init__(self) -> None:
        if self.inject not in INJECTS:
            raise ValueError(f"inject must be one of {INJECTS}, not {self.inject!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.validate_every < 1:
            raise ValueError("epochs, batch_size and validate_every must be positive")

    def hyperparameters(self) -> dict[str, object]:
        skip = ("endpoint", "curve_keys", "run")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class RunResult:
    """What the run produced, on the host after training (for tests and the summary line)."""

    config: TrainConfig
    rank: int
    world_size: int
    num_params: int
    epoch_loss: np.ndarray  # [epochs] mean step loss of this rank's epoch
    step_loss: np.ndarray  # [steps]
    step_epoch: np.ndarray  # [steps] the epoch of each step
    grad_norm: np.ndarray  # [steps] global norm before clipping
    components: dict[str, np.ndarray]  # term -> [steps]
    validation: dict[int, np.ndarray] = field(default_factory=dict)  # epoch -> samples (norm.)
    channel_names: tuple[str, ...] = ()
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    seconds: float = 0.0
    client_stats: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    d = TrainConfig()
    ap.add_argument("--learning-rate", type=float, default=d.learning_rate)
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay)
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help="per rank")
    ap.add_argument("--pseudo-dataset-len", type=int, default=None,
                    help="windows in the pseudo dataset (default per --inject mode)")
    ap.add_argument("--epochs", type=int, default=None, help="default per --inject mode")
    ap.add_argument("--window-len", type=int, default=d.window_len)
    ap.add_argument("--num-train-trials", type=int, default=d.num_train_trials)
    ap.add_argument("--validate-every", type=int, default=None,
                    help="generate validation samples every N epochs and at the last")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--inject", choices=INJECTS, default="none")
    ap.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0 disables")
    ap.add_argument("--endpoint", default=None, help="default: TRAINWATCH_ENDPOINT")
    ap.add_argument("--curve-keys", default=None, help="default: TRAINWATCH_CURVE_KEYS")
    ap.add_argument("--run", default=None, help="run id (default: derived from the launcher)")
    a = ap.parse_args(argv)
    mode = MODE_DEFAULTS[a.inject]
    return TrainConfig(
        learning_rate=a.learning_rate, weight_decay=a.weight_decay, batch_size=a.batch_size,
        pseudo_dataset_len=a.pseudo_dataset_len or mode["pseudo_dataset_len"],
        epochs=a.epochs or mode["epochs"], window_len=a.window_len,
        num_train_trials=a.num_train_trials,
        validate_every=a.validate_every or mode["validate_every"], seed=a.seed, inject=a.inject,
        grad_clip=a.grad_clip, endpoint=a.endpoint, curve_keys=a.curve_keys, run=a.run,
    )


import os as _os
STRAT = _os.environ.get("GD_STRAT") == "1"
COSINE = _os.environ.get("GD_COSINE") == "1"


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The epoch's learning rate: cosine decay to a tenth over the run, then the inject."""
    lr = config.learning_rate
    if COSINE:
        lr *= 0.55 + 0.45 * math.cos(math.pi * (epoch - 1) / max(config.epochs - 1, 1))
    if epoch >= INJECT_FROM_EPOCH and config.inject == "exploding":
        return lr * EXPLODE_LR_FACTOR
    if epoch >= INJECT_FROM_EPOCH and config.inject == "stall":
        return 0.0
    return lr


def _timesteps(n: int, steps: int, gen: torch.Generator, stratified: bool) -> torch.Tensor:
    if not stratified:
        return torch.randint(0, steps, (n,), generator=gen)
    u = (torch.arange(n) + torch.rand(n, generator=gen)) / n
    return (u[torch.randperm(n, generator=gen)] * steps).long().clamp(max=steps - 1)


def _setup_distributed() -> tuple[int, int]:
    """Join the torchrun group (gloo, CPU) when launched by torchrun; else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(config: TrainConfig) -> RunResult:
    """Runs the whole training job; returns this rank's numbers (read back after the loop)."""
    started = time.perf_counter()
    rank, world = _setup_distributed()
    torch.manual_seed(config.seed)
    data = make_dataset(DataConfig(pseudo_dataset_len=config.pseudo_dataset_len,
                                   window_len=config.window_len,
                                   num_train_trials=config.num_train_trials, seed=config.seed))
    channels = len(data.channel_names)
    collapse = config.inject == "collapse"
    net = Denoiser(DenoiserConfig(channels=channels, prediction="x0" if collapse else "eps",
                                  sees_input=not collapse))
    model = DistributedDataParallel(net) if world > 1 else net
    ema = Ema(net, config.ema_decay)
    diffusion = Diffusion(config.diffusion_steps)
    loss_fn = GaitLoss(data.channel_names, data.mean, data.std, data.sample_rate_hz)
    opt = torch.optim.AdamW(net.parameters(), lr=config.learning_rate,
                            weight_decay=config.weight_decay)
    clip = config.grad_clip if config.grad_clip > 0 and config.inject != "exploding" else math.inf

    dataset = TensorDataset(data.windows)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                 seed=config.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, drop_last=True)

    tw = TrainerClient(endpoint=config.endpoint, run=config.run, rank=rank, world_size=world,
                       curve_keys=config.curve_keys)
    if rank == 0:  # identical on every rank: one copy is enough
        tw.log_config(config.hyperparameters(), model=net)
        tw.log_data_stats(data.windows, list(data.channel_names), mean=data.mean, std=data.std)

    steps: list[torch.Tensor] = []  # per step: [loss, grad_norm, *terms], kept on the device
    step_epoch: list[int] = []
    term_names: list[str] = []
    validation: dict[int, np.ndarray] = {}
    for epoch in range(1, config.epochs + 1):
        for group in opt.param_groups:
            group["lr"] = learning_rate(config, epoch)
        # The stalled epochs replay one epoch's batches and noise (see the module docstring).
        data_epoch = min(epoch, INJECT_FROM_EPOCH) if config.inject == "stall" else epoch
        sampler.set_epoch(data_epoch)
        gen = torch.Generator().manual_seed(config.seed * 1_000_003 + data_epoch * 1009 + rank)
        model.train()
        epoch_sum = torch.zeros(())
        n_steps = 0
        for (x0,) in loader:
            t = _timesteps(x0.shape[0], diffusion.steps, gen, STRAT)
            eps = torch.randn(x0.shape, generator=gen)
            x_t = diffusion.add_noise(x0, t, eps)
            eps_hat, x0_hat = diffusion.predict(model, x_t, t)
            loss, terms = loss_fn(eps_hat, eps, x0_hat, x0, diffusion.alpha_bar[t])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
            opt.step()
            ema.update(net)
            tw.log_step(loss.detach(), {k: v.detach() for k, v in terms.items()}, model=net,
                        grad_norm=grad_norm)
            term_names = list(terms)
            steps.append(torch.stack([loss.detach(), grad_norm.detach(),
                                      *(v.detach() for v in terms.values())]))
            step_epoch.append(epoch)
            epoch_sum += loss.detach()
            n_steps += 1

        if rank == 0 and (epoch % config.validate_every == 0 or epoch == config.epochs):
            gen_val = torch.Generator().manual_seed(config.seed * 7919 + epoch)
            samples = diffusion.sample(ema.module, config.val_samples, config.window_len,
                                       channels, generator=gen_val)
            tw.log_validation(epoch, samples, list(data.channel_names))
            validation[epoch] = samples.numpy().copy()
            _print_validation(epoch, samples, data)
        tw.log_epoch(epoch, model=net, ema_model=ema.module)
        if rank == 0:
            # One host read per epoch, for the progress line only (never per step).
            print(f"epoch {epoch:3d}  loss {float(epoch_sum) / max(n_steps, 1):.4f}", flush=True)

    tw.close(timeout=5.0)
    table = torch.stack(steps).double().numpy() if steps else np.zeros((0, 2 + len(term_names)))
    epochs_arr = np.asarray(step_epoch, dtype=np.int64)
    epoch_loss = np.array([table[epochs_arr == e, 0].mean() for e in range(1, config.epochs + 1)])
    result = RunResult(
        config=config, rank=rank, world_size=world, num_params=count_params(net),
        epoch_loss=epoch_loss, step_loss=table[:, 0], step_epoch=epochs_arr,
        grad_norm=table[:, 1],
        components={name: table[:, 2 + i] for i, name in enumerate(term_names)},
        validation=validation, channel_names=data.channel_names,
        mean=data.mean.double().numpy(), std=data.std.double().numpy(),
        seconds=time.perf_counter() - started, client_stats=tw.stats,
    )
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def _print_validation(epoch: int, samples: torch.Tensor, data: GaitDataset) -> None:
    phys = data.denormalize(samples)
    knee = data.channel_names.index("knee_angle_r")
    grf = data.channel_names.index("grf_vz_r")
    print(f"validation epoch {epoch}: gen_std {float(samples.std()):.3f}  "
          f"knee_r_std {float(phys[..., knee].std()):.3f} rad  "
          f"grf_vz_r_std {float(phys[..., grf].std()):.1f} N", flush=True)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    result = train(config)
    if result.rank == 0:
        first, last = result.epoch_loss[0], result.epoch_loss[-1]
        print(f"done: {result.config.epochs} epochs x {result.world_size} rank(s), "
              f"{result.num_params} params, loss {first:.4f} -> {last:.4f}, "
              f"{result.seconds:.1f} s, trainwatch {result.client_stats}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
