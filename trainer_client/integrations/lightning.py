"""trainwatch for PyTorch Lightning: ``Trainer(callbacks=[TrainwatchCallback()])``.

    trainer = L.Trainer(max_epochs=100, callbacks=[TrainwatchCallback(
        ema="ema",                         # optional: the module's EMA copy, by attribute
        samples="sample", channel_names=["knee_r", "grf_r"],  # optional: a module method
        data="train_windows")])            # optional: a tensor, or a datamodule attribute

What it sends, and from which hook:

- config (rank 0, ``on_train_start``): the trainer's settings, the optimizer's rate and
  weight decay, the loader's batch size, then the module's ``hparams`` over them;
- data statistics (rank 0, once), when given ``data``;
- every optimizer step: the loss of ``training_step`` (a tensor, or a dict's ``"loss"``;
  its other scalar entries are the loss terms; under gradient accumulation, the mean over
  the step's micro-batches), the per-parameter and global gradient norms taken in
  ``on_before_optimizer_step`` (after AMP unscaling, before clipping and ``zero_grad``,
  on the device) and the optimizer's learning rate;
- every epoch: weights, and the EMA difference when told the EMA's attribute; every
  ``samples_every`` epochs (and the last), rank 0's samples from the named hook.

Nothing reads a tensor's value on the training thread. The run id is one per fit and the
same on every rank without the ranks talking (see ``_common.job_key``); rank and world
size come from the trainer. When the collector decides to stop the run (``trainwatch
collect --stop-on ...``), ``trainer.should_stop`` is set at the stop step on every rank
(the client's ``should_stop``: no collective), and the fit ends after that batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from torch import nn

from .. import identity, reductions
from ..client import TrainerClient
from ._common import (
    GradNorms,
    ParamView,
    StepBuffer,
    check_channels,
    current_lr,
    ema_prefix,
    fit_run,
    job_key,
    log_samples,
    make_client,
    scalar_terms,
)

__all__ = ["TrainwatchCallback"]

_log = logging.getLogger("trainwatch.lightning")

SampleHook = str | Callable[[pl.LightningModule], torch.Tensor]
DataSource = torch.Tensor | str | Callable[[pl.Trainer], torch.Tensor]


class TrainwatchCallback(pl.Callback):
    """Ships a Lightning fit's training health to a trainwatch collector.

    ``endpoint``/``run``/``local_collector`` as for ``TrainerClient`` (``local_collector``
    only for a single process). ``data``: the normalised training data (a tensor, the
    name of a datamodule attribute or method giving one, or a callable taking the
    trainer), with ``channel_names`` and optional ``data_mean``/``data_std``.
    ``samples``: the name of a module method, or a callable taking the module, that
    returns generated samples (last dim = channels); called under ``torch.no_grad()``
    every ``samples_every`` epochs on rank 0. ``ema``: the attribute of the module that
    holds its EMA copy (e.g. a ``torch.optim.swa_utils.AveragedModel``).
    """

    def __init__(self, *, endpoint: str | None = None, run: str | None = None,
                 local_collector: str | os.PathLike[str] | None = None,
                 data: DataSource | None = None,
                 channel_names: Sequence[str] | None = None,
                 data_mean: Any = None, data_std: Any = None,
                 samples: SampleHook | None = None, samples_every: int = 1,
                 ema: str | None = None) -> None:
        if samples is not None and not (isinstance(samples, str) or callable(samples)):
            raise TypeError("samples is a method name of the LightningModule or a callable")
        if data is not None and not isinstance(data, (torch.Tensor, str)) \
                and not callable(data):
            raise TypeError("data is a tensor, a datamodule attribute name or a callable")
        if int(samples_every) < 1:
            raise ValueError(f"samples_every must be >= 1, got {samples_every}")
        if ema is not None and not isinstance(ema, str):
            raise TypeError("ema is the name of the module's attribute holding the EMA copy")
        self.channel_names = check_channels(channel_names, data)
        self.endpoint, self.run, self.local_collector = endpoint, run, local_collector
        self.data, self.data_mean, self.data_std = data, data_mean, data_std
        self.samples, self.samples_every, self.ema = samples, int(samples_every), ema
        self._job = job_key()  # here: the constructor runs before Lightning launches ranks
        self._fits = 0
        self.client: TrainerClient | None = None
        self._buf = StepBuffer()
        self._stepped = False
        self._lr: torch.Tensor | float | None = None

    # -- set-up ------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._close()
        self._sampler = self._resolve_samples(pl_module)
        self._fits += 1
        self.client = make_client(self.endpoint, self._run_id(trainer), trainer.global_rank,
                                  trainer.world_size, self.local_collector)

    def _run_id(self, trainer: pl.Trainer) -> str:
        if self.run or os.environ.get("TRAINWATCH_RUN"):
            return identity.resolve_run(self.run)
        env = getattr(trainer.strategy, "cluster_environment", None)
        if self._job is None or trainer.num_nodes > 1 \
                or not (env is None or isinstance(env, LightningEnvironment)):
            # torchrun, SLURM, MPI ... started the ranks, or several nodes: the launcher's
            # ids (TORCHELASTIC_RUN_ID, SLURM_JOB_ID, MASTER_ADDR/PORT).
            return identity.resolve_run(None)
        # one process, or ranks Lightning itself started
        return fit_run(f"lightning-{self._job}", self._fits)

    def _resolve_samples(self, pl_module: pl.LightningModule) -> Callable[[], Any] | None:
        if self.samples is None:
            return None
        if isinstance(self.samples, str):
            fn = getattr(pl_module, self.samples, None)
            if not callable(fn):
                raise ValueError(f"TrainwatchCallback(samples={self.samples!r}): "
                                 f"{type(pl_module).__name__} has no such method")
            return fn
        hook = self.samples
        return lambda: hook(pl_module)

    def _ema_module(self, pl_module: pl.LightningModule) -> nn.Module | None:
        if self.ema is None:
            return None
        ema = getattr(pl_module, self.ema, None)
        if not isinstance(ema, nn.Module):
            raise ValueError(f"TrainwatchCallback(ema={self.ema!r}): {type(pl_module).__name__}"
                             f".{self.ema} is {type(ema).__name__}, not an nn.Module")
        return ema

    # -- start -------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here, not in setup: configure_model() may build layers (and the EMA) after it.
        if self.client is None:
            return
        ema = self._ema_module(pl_module)
        skip = {id(p) for p in ema.parameters()} if ema is not None else set()
        named = [(n, p) for n, p in reductions.named_params(pl_module) if id(p) not in skip]
        if ema is not None and not named:
            raise ValueError(f"TrainwatchCallback(ema={self.ema!r}): {type(pl_module).__name__}"
                             f".{self.ema} holds all the trainable parameters: it is the "
                             "model, not an EMA copy of it")
        self._model = ParamView(named) if named else None  # the model proper, not its EMA
        self._names = [n for n, _ in named]
        self._num_params = sum(p.numel() for p in pl_module.parameters() if id(p) not in skip)
        self._ema_src: nn.Module | None = None
        self._ema_view: ParamView | None = None
        self._norms = GradNorms(named)
        self._buf.clear()
        self._stepped, self._lr = False, None
        if trainer.global_rank != 0:
            return
        self.client.log_config(self._config(trainer, pl_module))
        if self.data is not None:
            data = self._data(trainer)
            self.client.log_data_stats(data, self.channel_names, mean=self.data_mean,
                                       std=self.data_std)

    def _config(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
            "precision": str(trainer.precision),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "gradient_clip_val": trainer.gradient_clip_val,
            "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
            "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
            "num_devices": trainer.num_devices, "strategy": type(trainer.strategy).__name__,
            "accelerator": type(trainer.accelerator).__name__,
            "epochs": trainer.max_epochs, "num_params": self._num_params,
        }
        if trainer.optimizers:
            opt = trainer.optimizers[0]
            cfg["optimizer"] = type(opt).__name__
            group = opt.param_groups[0] if opt.param_groups else {}
            for key, name in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
                if isinstance(group.get(key), (int, float)):
                    cfg[name] = group[key]
        batch_size = getattr(trainer.train_dataloader, "batch_size", None)
        if isinstance(batch_size, int):
            cfg["batch_size"] = batch_size
        cfg.update(dict(pl_module.hparams))  # the user's names win
        return cfg

    def _data(self, trainer: pl.Trainer) -> torch.Tensor:
        src = self.data
        if isinstance(src, str):
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, src):
                raise ValueError(f"TrainwatchCallback(data={src!r}): the fit has "
                                 + ("no datamodule" if dm is None
                                    else f"a {type(dm).__name__} without {src!r}"))
            src = getattr(dm, src)
            out = src() if callable(src) else src
        elif callable(src):
            out = src(trainer)
        else:
            out = src
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"TrainwatchCallback(data=...) gave {type(out).__name__}, "
                            "not a tensor")
        return out

    # -- every step --------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        # After the backward pass and AMP unscaling, before clipping and zero_grad.
        if self.client is None:
            return
        self._norms.take_from(optimizer)
        if not self._stepped:
            self._lr = current_lr(optimizer)
        self._stepped = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.client is None:
            return
        loss, terms = _split(outputs)
        if loss is not None:
            self._buf.add(loss, terms)
        if not self._stepped:
            return  # accumulating: the step ends at a later batch
        self._stepped = False
        norms, lr, self._lr = self._norms.pop(), self._lr, None
        n = self._buf.n
        # Automatic optimization hands over loss / accumulate_grad_batches: undo that,
        # then average the micro-batches.
        scale = (trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1)
        loss, terms = self._buf.take(scale / n if n else 1.0)
        if loss is not None:
            self.client.log_step(loss, terms, grad_norms=norms, lr=lr)
        if self.client.should_stop and not trainer.should_stop:
            trainer.should_stop = True  # every rank at the same step: the collector's stop

    # -- every epoch -------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.client is None:
            return
        epoch = trainer.current_epoch + 1  # Lightning counts from 0, trainwatch from 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if self._sampler is not None and trainer.global_rank == 0 \
                and (epoch % self.samples_every == 0 or last):
            log_samples(self.client, epoch, self._sampler, f"the samples hook {self.samples!r}",
                        self.channel_names, _log)
        ema = self._ema(pl_module) if self._model is not None else None
        self.client.log_epoch(epoch, model=self._model, ema_model=ema)

    def _ema(self, pl_module: pl.LightningModule) -> ParamView | None:
        """The EMA copy under the model's parameter names (rebuilt if it was replaced)."""
        ema = self._ema_module(pl_module)
        if ema is None:
            return None
        if ema is not self._ema_src:
            named = reductions.named_params(reductions.unwrap(ema), trainable_only=False)
            prefix = ema_prefix(self._names, [n for n, _ in named])
            if prefix is None:
                _log.warning("trainwatch: the parameters of %s.%s do not match the model's: "
                             "no model/ema_diff", type(pl_module).__name__, self.ema)
                prefix = ""
            self._ema_src = ema
            self._ema_view = ParamView([(prefix + n, p) for n, p in named])
        return self._ema_view

    # -- end ---------------------------------------------------------------------------
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._close()

    def _close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.close()


def _split(outputs: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """``training_step``'s output as (loss, loss terms); (None, {}) when it gave none."""
    if isinstance(outputs, torch.Tensor):
        return outputs.detach(), {}
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
        if isinstance(loss, torch.Tensor):
            return loss.detach(), scalar_terms(outputs)
    return None, {}
