"""trainwatch for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[TrainwatchCallback()])``.

What it sends, and from where:

- config (process 0, ``on_train_begin``): ``TrainingArguments`` (with the guide's names
  ``batch_size``/``epochs`` beside HF's) and the model config's non-default entries
  under ``model/``;
- data statistics (process 0, once), when given ``data``;
- every optimizer step (``on_step_end``): the step's loss, the global gradient norm
  before clipping, per-parameter gradient norms (taken in ``on_pre_optimizer_step``) and
  the learning rate;
- every epoch (``on_epoch_end``): weights (and the EMA difference when given
  ``ema_model``); every ``samples_every`` epochs (and the last), process 0's samples
  from the given function.

Callbacks see neither the loss nor the pre-clip norm: the Trainer keeps both in locals
(and reads its loss with ``.item()`` only at logging steps). So at ``on_train_begin``
the callback finds the Trainer that called it (the ``self`` of the calling frame: a
callback is only ever called from the Trainer's own methods) and observes two of its
calls on that instance: ``training_step``, whose return value is the micro-batch's
detached loss tensor (scaled for gradient accumulation, so the step's micro-batch sum
is the step's loss, the value HF logs), and ``accelerator.clip_grad_norm_``, whose
return value is the norm before clipping. Both are kept as tensors, never read; the
wrappers come off at ``on_train_end``. When the collector decides to stop the run
(``trainwatch collect --stop-on ...``), ``control.should_training_stop`` is set at the stop
step on every process (the client's ``should_stop``: no collective).
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .. import identity, reductions
from ..client import TrainerClient
from ._common import (
    StepBuffer,
    check_channels,
    current_lr,
    fit_run,
    job_key,
    log_samples,
    make_client,
)

__all__ = ["TrainwatchCallback"]

_log = logging.getLogger("trainwatch.transformers")


class TrainwatchCallback(TrainerCallback):
    """Ships a Hugging Face Trainer's training health to a trainwatch collector.

    ``endpoint``/``run``/``local_collector`` as for ``TrainerClient`` (``local_collector``
    only for a single process). ``data``: the normalised training data (a tensor), with
    ``channel_names`` and optional ``data_mean``/``data_std``. ``samples``: a callable
    taking the model and returning generated samples (last dim = channels), called under
    ``torch.no_grad()`` every ``samples_every`` epochs on process 0. ``ema_model``: an
    EMA copy of the model (e.g. a ``torch.optim.swa_utils.AveragedModel``).
    """

    def __init__(self, *, endpoint: str | None = None, run: str | None = None,
                 local_collector: str | os.PathLike[str] | None = None,
                 data: torch.Tensor | None = None,
                 channel_names: Sequence[str] | None = None,
                 data_mean: Any = None, data_std: Any = None,
                 samples: Callable[[nn.Module], torch.Tensor] | None = None,
                 samples_every: int = 1, ema_model: nn.Module | None = None) -> None:
        if samples is not None and not callable(samples):
            raise TypeError("samples is a callable taking the model and returning a tensor")
        if data is not None and not isinstance(data, torch.Tensor):
            raise TypeError(f"data is a tensor, not {type(data).__name__}")
        if int(samples_every) < 1:
            raise ValueError(f"samples_every must be >= 1, got {samples_every}")
        if ema_model is not None and not isinstance(ema_model, nn.Module):
            raise TypeError("ema_model is an nn.Module")
        self.channel_names = check_channels(channel_names, data)
        self.endpoint, self.run, self.local_collector = endpoint, run, local_collector
        self.data, self.data_mean, self.data_std = data, data_mean, data_std
        self.samples, self.samples_every, self.ema_model = samples, int(samples_every), ema_model
        self._job = job_key()
        self._fits = 0
        self.client: TrainerClient | None = None
        self._trainer: Trainer | None = None
        self._buf = StepBuffer()
        self._reset_step()

    def _reset_step(self) -> None:
        self._clip: tuple[torch.Tensor, float] | None = None
        self._norms: tuple[list[str], torch.Tensor] | None = None
        self._lr: torch.Tensor | float | None = None
        self._buf.clear()

    # -- start -------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       **kwargs: Any) -> None:
        trainer = _calling_trainer()
        if trainer is None:
            raise RuntimeError("TrainwatchCallback is called by a transformers.Trainer; "
                               "none was found among its callers")
        self._close()  # a previous train() that ended in an exception
        self._attach(trainer)
        model = model if model is not None else trainer.model
        self._params = reductions.named_params(reductions.unwrap(model))
        self._epoch = int(state.epoch or 0)  # epochs done (a resumed run starts later)
        self._reset_step()
        self._fits += 1
        run = self._run_id(args.world_size)
        self.client = make_client(self.endpoint, run, args.process_index, args.world_size,
                                  self.local_collector)
        if state.is_world_process_zero:
            self.client.log_config(_config(args, model))
            if self.data is not None:
                self.client.log_data_stats(self.data, self.channel_names, mean=self.data_mean,
                                           std=self.data_std)

    def _run_id(self, world_size: int) -> str:
        if self.run or os.environ.get("TRAINWATCH_RUN") or world_size > 1 or self._job is None:
            return identity.resolve_run(self.run)  # several ranks: the launcher's ids
        return fit_run(f"hf-{self._job}", self._fits)

    def _attach(self, trainer: Trainer) -> None:
        """Observe the Trainer's ``training_step`` and its accelerator's
        ``clip_grad_norm_`` on these instances (undone by ``_detach``)."""
        self._detach()
        cb = self
        step_fn = trainer.training_step
        acc = trainer.accelerator
        clip_fn = acc.clip_grad_norm_

        def training_step(*a: Any, **k: Any) -> Any:
            loss = step_fn(*a, **k)
            cb._observe_loss(loss)
            return loss

        def clip_grad_norm_(parameters: Any, max_norm: float, *a: Any, **k: Any) -> Any:
            total = clip_fn(parameters, max_norm, *a, **k)
            cb._observe_clip(total, max_norm)
            return total

        self._undo = [_patch(trainer, "training_step", training_step),
                      _patch(acc, "clip_grad_norm_", clip_grad_norm_)]
        self._trainer = trainer

    def _detach(self) -> None:
        for undo in getattr(self, "_undo", []):
            undo()
        self._undo = []
        self._trainer = None

    # -- every step --------------------------------------------------------------------
    def _observe_loss(self, loss: Any) -> None:
        if self.client is not None and isinstance(loss, torch.Tensor):
            self._buf.add(loss.detach())

    def _observe_clip(self, total: Any, max_norm: float) -> None:
        if self.client is not None and isinstance(total, torch.Tensor):
            self._clip = (total, float(max_norm))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._reset_step()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any,
                              optimizer: Any = None, **kwargs: Any) -> None:
        # After the backward pass, unscaling and clipping, before optimizer.step().
        if self.client is None:
            return
        pn = reductions.grad_norms(self._params)
        if pn is not None and self._clip is not None and math.isfinite(self._clip[1]):
            # The Trainer already clipped: every gradient was scaled by one factor,
            # min(1, max_norm / (norm + 1e-6)) as in clip_grad_norm_; undo it on the device.
            total, max_norm = self._clip
            coef = torch.clamp(max_norm / (total.to(pn[1].device, torch.float32) + 1e-6),
                               max=1.0)
            pn = (pn[0], pn[1] / coef)
        self._norms = pn
        self._lr = current_lr(optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.client is None:
            return
        loss, _ = self._buf.take()
        grad_norm = self._clip[0] if self._clip is not None else None
        if loss is not None:
            self.client.log_step(loss, grad_norm=grad_norm, lr=self._lr, grad_norms=self._norms)
        if self.client.should_stop:
            control.should_training_stop = True
        self._reset_step()

    # -- every epoch -------------------------------------------------------------------
    def on_epoch_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        if self.client is None:
            return
        self._epoch += 1
        epoch = self._epoch
        model = model if model is not None else self._trainer.model
        last = epoch >= math.ceil(args.num_train_epochs) or state.global_step >= state.max_steps
        if self.samples is not None and state.is_world_process_zero \
                and (epoch % self.samples_every == 0 or last):
            log_samples(self.client, epoch, lambda: self.samples(model), "the samples function",
                        self.channel_names, _log)
        self.client.log_epoch(epoch, model=model, ema_model=self.ema_model)

    # -- end ---------------------------------------------------------------------------
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close()

    def _close(self) -> None:
        self._detach()
        client, self.client = self.client, None
        if client is not None:
            client.close()


def _calling_trainer() -> Trainer | None:
    frame = sys._getframe(1)
    while frame is not None:
        obj = frame.f_locals.get("self")
        if isinstance(obj, Trainer):
            return obj
        frame = frame.f_back
    return None


def _patch(obj: Any, name: str, fn: Any) -> Callable[[], None]:
    """Set ``obj.name = fn`` on the instance; return what puts it back."""
    had = name in vars(obj)
    before = vars(obj).get(name)
    setattr(obj, name, fn)

    def undo() -> None:
        if vars(obj).get(name) is not fn:
            return  # someone patched over us: leave theirs
        if had:
            setattr(obj, name, before)
        else:
            delattr(obj, name)

    return undo


def _config(args: Any, model: nn.Module) -> dict[str, Any]:
    cfg = {k: v for k, v in args.to_dict().items() if not k.startswith("_")}
    cfg["batch_size"] = args.per_device_train_batch_size  # the guide's names, per device
    cfg["epochs"] = args.num_train_epochs
    mc = getattr(model, "config", None)
    if mc is not None and hasattr(mc, "to_diff_dict"):
        cfg.update({f"model/{k}": v for k, v in mc.to_diff_dict().items()})
    cfg["num_params"] = sum(p.numel() for p in model.parameters())
    return cfg
