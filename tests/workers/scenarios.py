"""A real training process whose runs are engineered to trip trainwatch's health rules.

Each scenario is one run, ``rule-<name>``: a small MLP trained for real (forward, backward,
``clip_grad_norm_``, SGD, an EMA copy) through the real ``TrainerClient``. Where a rule
needs particular dynamics they are made with real tensors: gradients scaled before
``clip_grad_norm_`` measures them, weights set under ``no_grad``, a damped or saturating
sampler, a NaN in a batch, a learning rate of 0. Nothing the collector computes is
computed here on its behalf: the client ships tensors and the collector reduces them.
What was sent is written to ``OUT/rule-<name>.rank<r>.json`` (losses, gradient norms, loss
terms, per-parameter gradient norms, numpy statistics of the weights taken after each
epoch, the validation samples) so the tests can recompute every figure with numpy.

    python tests/workers/scenarios.py --endpoint ipc:///tmp/tw.sock --out sent healthy stalled
    # ddp and rank_desync are three-rank jobs (gradients all-reduced over gloo): start one
    # process per rank; any other scenario named runs afterwards as a one-rank job.
    python tests/workers/scenarios.py --endpoint ipc:///tmp/tw.sock --out sent \
        --rank 1 --world 3 --init file:///tmp/pg ddp rank_desync nonfinite

The phase-dependent scenarios assume phases ending at epochs 3 and 6, the override the
tests hand the collector with ``--rules``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from trainer_client import TrainerClient

STEPS, BATCH = 4, 16  # steps per epoch, samples per step
CHANNELS = ("knee_angle_r", "grf_vz_r")
DATA_MEAN = (0.6, 700.0)  # rad, N: physical = normalised * std + mean
DATA_STD = (0.5, 250.0)
TERM_WEIGHTS = {"simple": 1.0, "vel": 0.5, "fk": 0.5, "drift": 1.0, "slide": 1.0}


class Net(nn.Module):
    """The model: 8 features -> the two normalised gait channels."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.inp(x)))


class Run:
    """One run: model, plain SGD, an EMA copy, the client, and a log of what it shipped."""

    def __init__(self, name: str, args: argparse.Namespace, client: TrainerClient | None = None,
                 *, lr: float = 0.05, clip: float = 10.0, decay: float = 0.9,
                 target_scale: float = 1.0, target_offset: float = 0.0, noise: float = 0.1,
                 n_data: int = 0, seed: int = 0) -> None:
        self.run, self.rank, self.world = f"rule-{name}", args.rank, args.world
        self.out_dir = args.out
        torch.manual_seed(seed)
        self.net = Net()
        if self.world > 1:  # every rank starts from rank 0's parameters, as under DDP
            with torch.no_grad():
                for p in self.net.parameters():
                    dist.broadcast(p, 0)
        self.ema = copy.deepcopy(self.net)
        g = torch.Generator().manual_seed(1000 * seed + self.rank)  # each rank its own data
        n = n_data or STEPS * BATCH
        x = torch.randn(n, 8, generator=g)
        w_true = torch.randn(8, 2, generator=torch.Generator().manual_seed(seed)) / 8 ** 0.5
        y = (x @ w_true + noise * torch.randn(n, 2, generator=g)) * target_scale + target_offset
        self.x, self.y, self.offset = x, y, 0  # an epoch's steps read rows offset.. on
        self.gen = torch.Generator().manual_seed(2000 + 10 * seed + self.rank)
        self.lr, self.clip, self.decay, self.ema_drift = lr, clip, decay, 0.0
        self.term_weights = dict(TERM_WEIGHTS)
        self.params = dict(self.net.named_parameters())
        self.tw = client or TrainerClient(args.endpoint, run=self.run, rank=self.rank,
                                          world_size=self.world)
        config = {"learning_rate": lr, "weight_decay": 0.0, "batch_size": BATCH,
                  "pseudo_dataset_len": n, "window_len": 1, "num_train_trials": 1}
        self.tw.log_config(config, model=self.net)
        if self.rank == 0:
            self.tw.log_data_stats(y, CHANNELS, mean=DATA_MEAN, std=DATA_STD)
        self.sent: dict[str, Any] = {
            "run": self.run, "rank": self.rank, "world": self.world, "config": config,
            "channels": list(CHANNELS), "data_mean": list(DATA_MEAN),
            "data_std": list(DATA_STD), "data": y.tolist() if self.rank == 0 else None,
            "param_names": list(self.params), "epochs": []}
        self._open = self._fresh()

    # -- training ------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        self.lr = lr

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        o = self.offset
        return [(self.x[i:i + BATCH], self.y[i:i + BATCH])
                for i in range(o, o + STEPS * BATCH, BATCH)]

    def train(self, step_hook: Callable[[int], dict] | None = None, **step_kw: Any) -> None:
        """One epoch's steps; ``step_hook(s)`` may give per-step ``step`` keywords."""
        for s, (x, y) in enumerate(self.batches()):
            self.step(x, y, **{**step_kw, **(step_hook(s) if step_hook else {})})

    def step(self, x: torch.Tensor, y: torch.Tensor, grad_scale: dict[str, float] | None = None,
             loss_scale: float = 1.0) -> None:
        err = self.net(x) - y
        raw = {"simple": err.pow(2).mean(), "vel": err[:, 0].pow(2).mean(),
               "fk": err[:, 1].pow(2).mean(), "drift": err.mean(0).pow(2).sum(),
               "slide": err.abs().mean()}
        terms = {k: v * self.term_weights[k] for k, v in raw.items()}
        loss = torch.stack(list(terms.values())).sum()
        self.net.zero_grad()
        (loss * loss_scale).backward()
        if self.world > 1:
            self._all_reduce_grads()
        for name, factor in (grad_scale or {}).items():
            self.params[name].grad.mul_(factor)
        norm = torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
        self.tw.log_step(loss, terms, model=self.net, grad_norm=norm)
        o = self._open
        o["loss"].append(loss.item())
        o["grad_norm"].append(norm.item())
        for k, v in terms.items():
            o["components"].setdefault(k, []).append(v.item())
        # What the client measures: each gradient after clipping, at the log_step call.
        o["param_norms"].append([torch.linalg.vector_norm(p.grad).item()
                                 for p in self.params.values()])
        if not torch.isfinite(norm):  # a non-finite step is skipped, as a GradScaler does
            return
        with torch.no_grad():
            # Plain SGD written out: torch.optim imports torch._dynamo, seconds per process.
            for p in self.net.parameters():
                p.sub_(p.grad, alpha=self.lr)
            for e, p in zip(self.ema.parameters(), self.net.parameters(), strict=True):
                e.lerp_(p, 1.0 - self.decay)
                if self.ema_drift:
                    e.add_(self.ema_drift)

    @torch.no_grad()
    def _all_reduce_grads(self) -> None:
        """What DDP does after backward: every rank gets the mean gradient (one bucket)."""
        grads = [p.grad for p in self.net.parameters()]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    # -- weights and samples -------------------------------------------------------
    @torch.no_grad()
    def scale_weights(self, factor: float) -> None:
        for p in self.net.parameters():
            p.mul_(factor)

    @torch.no_grad()
    def perturb_weights(self, std: float) -> None:
        for p in self.net.parameters():
            p.add_(std * torch.randn(p.shape, generator=self.gen))

    @torch.no_grad()
    def reset_ema(self, source: nn.Module | None = None) -> None:
        for e, p in zip(self.ema.parameters(), (source or self.net).parameters(), strict=True):
            e.copy_(p)

    @torch.no_grad()
    def generate(self, damp: tuple[float, float] = (1.0, 1.0), squash: float | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Generated windows (32 x 8 x 2, normalised) from noise; ``damp`` shrinks a
        channel, ``squash`` saturates the output at +-squash."""
        z = torch.randn(32 * 8, 8, generator=self.gen)
        out = self.net(z) * torch.tensor(damp)
        if squash is not None:
            out = squash * torch.tanh(out / squash)
        return out.reshape(32, 8, 2).to(dtype)

    # -- epochs and the end ----------------------------------------------------------
    def epoch(self, epoch: int, samples: torch.Tensor | None = None) -> None:
        if samples is not None:
            self.tw.log_validation(epoch, samples, CHANNELS)
            self._open["samples"] = samples.float().reshape(-1, len(CHANNELS)).tolist()
            self._open["samples_dtype"] = str(samples.dtype).removeprefix("torch.")
        self.tw.log_epoch(epoch, model=self.net, ema_model=self.ema)
        w = np.concatenate([p.detach().numpy().ravel() for p in self.net.parameters()])
        w64 = w.astype(np.float64)
        diff = np.concatenate([(e.detach().numpy() - p.detach().numpy()).ravel() for e, p in
                               zip(self.ema.parameters(), self.net.parameters(), strict=True)])
        self._open.update(
            epoch=epoch, weights={"count": int(w.size), "mean_abs": float(np.abs(w64).mean()),
                                  "std": float(w64.std()), "max_abs": float(np.abs(w64).max())},
            ema_diff=float(np.abs(diff).astype(np.float64).mean()))
        self.sent["epochs"].append(self._open)
        self._open = self._fresh()

    def close(self) -> None:
        self.tw.close(timeout=10.0)
        self.sent["stats"] = self.tw.stats
        path = Path(self.out_dir) / f"{self.run}.rank{self.rank}.json"
        path.write_text(json.dumps(self.sent))

    @staticmethod
    def _fresh() -> dict[str, Any]:
        return {"loss": [], "grad_norm": [], "components": {}, "param_norms": [],
                "samples": None, "samples_dtype": None}


Args = argparse.Namespace  # endpoint, out, rank, world
Client = TrainerClient | None  # a client made before the ranks rendezvous, or None
Scenario = Callable[[Args, Client], None]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def _epochs(r: Run, n: int, hooks: dict[int, Callable[[], Any]] | None = None,
            validate: Callable[[int], torch.Tensor | None] | None = None,
            steps: dict[int, dict[str, Any]] | None = None) -> None:
    """``n`` epochs, then close: ``hooks[e]()`` runs before epoch e's steps, ``steps[e]``
    are its ``Run.train`` keywords, ``validate(e)`` its samples (or None)."""
    for e in range(1, n + 1):
        if hooks and e in hooks:
            hooks[e]()
        r.train(**(steps or {}).get(e, {}))
        r.epoch(e, validate(e) if validate else None)
    r.close()


# -- the run in which nothing may fire ------------------------------------------------------
@scenario
def healthy(a: Args, c: Client) -> None:
    r = Run("healthy", a, c, noise=0.3)
    # From epoch 6 a learning rate low enough that phase 3 (fine-tuning, from epoch 7)
    # moves the loss by under 1 % an epoch. Validation every other epoch, as a real run
    # validates every N epochs.
    _epochs(r, 8, hooks={6: lambda: r.set_lr(2e-4)},
            validate=lambda e: None if e % 2 else r.generate())


# -- 3. gradients ---------------------------------------------------------------------------
@scenario
def exploding_gradients(a: Args, c: Client) -> None:
    r = Run("exploding_gradients", a, c, clip=1.0)
    # Epoch 2: inp.bias's gradient is 10^4 times too large; clip_grad_norm_ reports it and
    # clips, so the weights stay sane and epoch 3 is normal again.
    _epochs(r, 3, steps={2: {"grad_scale": {"inp.bias": 1e4}}})


@scenario
def vanishing_gradients(a: Args, c: Client) -> None:
    r = Run("vanishing_gradients", a, c)
    _epochs(r, 3, steps={2: {"loss_scale": 1e-5}})  # a loss scale far too small in epoch 2


@scenario
def grad_norm_unstable(a: Args, c: Client) -> None:
    r = Run("grad_norm_unstable", a, c)
    spike = {"grad_scale": {n: 20.0 for n in r.params}}
    _epochs(r, 5, steps={4: {"step_hook": lambda s: spike if s == 0 else {}}})


# -- 4. batch losses --------------------------------------------------------------------------
@scenario
def batch_loss_flat(a: Args, c: Client) -> None:
    # small targets, a quiet model that hardly learns: every batch's loss is ~the same
    r = Run("batch_loss_flat", a, c, lr=1e-4, target_scale=0.005)
    with torch.no_grad():
        r.net.out.weight.mul_(0.001)
        r.net.out.bias.zero_()
    _epochs(r, 2)


@scenario
def batch_loss_cv_low(a: Args, c: Client) -> None:
    # Every batch's loss is dominated by the same offset: large, nearly equal losses.
    r = Run("batch_loss_cv_low", a, c, lr=1e-4, target_scale=0.02, target_offset=3.0)
    with torch.no_grad():
        r.net.out.weight.mul_(0.01)
        r.net.out.bias.zero_()
    _epochs(r, 2)


# -- 5. weights -----------------------------------------------------------------------------
@scenario
def exploding_weights(a: Args, c: Client) -> None:
    r = Run("exploding_weights", a, c)
    w = r.net.inp.weight
    keep = w.detach()[0, 0].item()

    def set_w(v: float) -> None:
        with torch.no_grad():
            w[0, 0] = v

    _epochs(r, 3, hooks={2: lambda: set_w(50.0), 3: lambda: set_w(keep)})


@scenario
def dead_neurons(a: Args, c: Client) -> None:
    r = Run("dead_neurons", a, c)
    r.train()
    r.epoch(1)
    r.train()
    r.scale_weights(1e-4)  # the weights collapsed to ~0 by the end of epoch 2
    r.epoch(2)
    r.close()


@scenario
def weights_jump(a: Args, c: Client) -> None:
    r = Run("weights_jump", a, c)
    _epochs(r, 3, hooks={2: lambda: r.scale_weights(2.5)})


# -- 6. EMA ---------------------------------------------------------------------------------
@scenario
def ema_diff_high(a: Args, c: Client) -> None:
    r = Run("ema_diff_high", a, c)
    r.ema_drift = 0.25  # the EMA copy drifts away from the model every step

    def stop() -> None:
        r.ema_drift = 0.0
        r.reset_ema()

    _epochs(r, 3, hooks={3: stop})


@scenario
def ema_diff_surge(a: Args, c: Client) -> None:
    r = Run("ema_diff_surge", a, c)
    torch.manual_seed(123)
    other = Net()  # epoch 4: the EMA is restored from the wrong checkpoint; epoch 5: fixed
    _epochs(r, 5, hooks={4: lambda: r.reset_ema(other), 5: lambda: r.reset_ema()})


# -- 7. loss improvement ----------------------------------------------------------------------
@scenario
def stalled(a: Args, c: Client) -> None:
    _epochs(Run("stalled", a, c, lr=0.0), 11)


@scenario
def loss_increasing(a: Args, c: Client) -> None:
    # The targets drift away step after step in epochs 2 and 3, faster in 3 (a data stream
    # that shifts ever faster): the model lags behind more and more, and the loss rises from
    # one epoch to the next; then it settles.
    r = Run("loss_increasing", a, c)

    def drift(rate: float) -> Callable[[int], dict]:
        def hook(s: int) -> dict:
            r.y.add_(rate)  # the batches are views of r.y: this step's targets move too
            return {}
        return hook

    # a copy to drift: the tensor given to log_data_stats is the client's until it is sent
    _epochs(r, 6, hooks={2: lambda: setattr(r, "y", r.y.clone())},
            steps={2: {"step_hook": drift(0.5)}, 3: {"step_hook": drift(1.5)}})


# -- 8. loss terms ---------------------------------------------------------------------------
@scenario
def loss_term_dominant(a: Args, c: Client) -> None:
    r = Run("loss_term_dominant", a, c)
    r.term_weights["simple"] = 60.0  # simple takes over 90 % of the loss in epoch 1

    def rebalance() -> None:
        r.term_weights["simple"] = 1.0

    _epochs(r, 3, hooks={2: rebalance})


# -- 9-11. validation samples -----------------------------------------------------------------
def _validation_scenario(name: str, a: Args, c: Client, **bad: Any) -> None:
    r = Run(name, a, c)
    _epochs(r, 2, validate=lambda e: r.generate(**bad) if e == 1 else r.generate())


@scenario
def gen_std_low(a: Args, c: Client) -> None:
    _validation_scenario("gen_std_low", a, c, damp=(0.02, 0.02))


@scenario
def gen_range_low(a: Args, c: Client) -> None:
    _validation_scenario("gen_range_low", a, c, squash=0.2)


@scenario
def knee_collapsed(a: Args, c: Client) -> None:
    _validation_scenario("knee_collapsed", a, c, damp=(0.05, 1.0))


@scenario
def grf_collapsed(a: Args, c: Client) -> None:
    _validation_scenario("grf_collapsed", a, c, damp=(1.0, 0.002))


@scenario
def samples_unlike_data(a: Args, c: Client) -> None:
    # Phase 2 (from epoch 4): the samples of epoch 4 are shifted by 3 data stds in the
    # normalised units; those of epoch 5 are the model's own again.
    r = Run("samples_unlike_data", a, c)
    _epochs(r, 5, validate=lambda e: r.generate() + 3.0 if e == 4 else
            (r.generate() if e == 5 else None))


# -- facts ----------------------------------------------------------------------------------
@scenario
def nonfinite(a: Args, c: Client) -> None:
    r = Run("nonfinite", a, c)

    def corrupt(v: float) -> None:
        r.x[BATCH, 3] = v  # one sample of the second batch

    _epochs(r, 3, hooks={2: lambda: corrupt(math.nan), 3: lambda: corrupt(0.0)})


# -- phase expectations (phases end at epochs 3 and 6) ------------------------------------------
@scenario
def phase3_expectations(a: Args, c: Client) -> None:
    r = Run("phase3_expectations", a, c)
    # One validation, in epoch 1, that never reached quality; the loss still falls fast.
    _epochs(r, 7, validate=lambda e: r.generate(damp=(0.15, 0.02)) if e == 1 else None)


# -- diagnoses ------------------------------------------------------------------------------
@scenario
def gradient_explosion(a: Args, c: Client) -> None:
    # A learning rate far too high and no clipping: the run really diverges.
    _epochs(Run("gradient_explosion", a, c, lr=3.0, clip=math.inf), 3)


@scenario
def mode_collapse(a: Args, c: Client) -> None:
    r = Run("mode_collapse", a, c, lr=0.0)
    x, y = r.batches()[0]
    for e in (1, 2):  # the same batch every step, nothing learns, the sampler collapsed
        for _ in range(STEPS):
            r.step(x, y)
        r.epoch(e, r.generate(damp=(0.01, 0.01)))
    r.close()


@scenario
def loss_not_falling(a: Args, c: Client) -> None:
    # A learning rate so low that the difference between the two halves of the data, read
    # in alternate epochs, hides any progress: the loss goes up every other epoch.
    r = Run("loss_not_falling", a, c, lr=1e-5, n_data=2 * STEPS * BATCH)
    half = STEPS * BATCH
    with torch.no_grad():
        first, second = (r.net(r.x[i:i + half]).sub(r.y[i:i + half]).pow(2).mean()
                         for i in (0, half))
    low, high = (0, half) if first < second else (half, 0)
    _epochs(r, 10, hooks={e: partial(setattr, r, "offset", low if e % 2 else high)
                          for e in range(1, 11)})


@scenario
def validation_bad_while_loss_falls(a: Args, c: Client) -> None:
    r = Run("validation_bad_while_loss_falls", a, c)
    _epochs(r, 4, validate=lambda e: r.generate(damp=(0.15, 0.02)))


# -- several ranks (real DDP over gloo, one process per rank) ------------------------------------
@scenario
def ddp(a: Args, c: Client) -> None:
    r = Run("ddp", a, c)
    _epochs(r, 2, validate=lambda e: r.generate(dtype=torch.bfloat16) if a.rank < 2 else None)


@scenario
def rank_desync(a: Args, c: Client) -> None:
    r = Run("rank_desync", a, c)

    def desync() -> None:
        if a.rank == 2:
            with torch.no_grad():
                for p in r.net.parameters():
                    p.add_(0.01)

    def resync() -> None:
        with torch.no_grad():
            for p in r.net.parameters():
                dist.broadcast(p, 0)

    _epochs(r, 3, hooks={2: desync, 3: resync})


MULTI_RANK = ("ddp", "rank_desync")  # run by every rank; the rest as one-rank jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=0, help="this process's rank in ddp/rank_desync")
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--init", default=None, help="torch.distributed init_method (world > 1)")
    ap.add_argument("names", nargs="+", choices=sorted(SCENARIOS))
    a = ap.parse_args()
    torch.set_num_threads(1)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    multi = [n for n in a.names if n in MULTI_RANK]
    if multi:
        # Every run says hello before the ranks rendezvous, so the collector knows of them
        # all while a slow rank is still starting.
        clients = {n: TrainerClient(a.endpoint, run=f"rule-{n}", rank=a.rank,
                                    world_size=a.world) for n in multi}
        dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world)
        for name in multi:
            SCENARIOS[name](a, clients[name])
        dist.destroy_process_group()
    one = argparse.Namespace(**{**vars(a), "rank": 0, "world": 1})
    for name in a.names:
        if name not in MULTI_RANK:
            SCENARIOS[name](one, None)


if __name__ == "__main__":
    main()
