"""What the framework callbacks share: the job's run id, a step's micro-batch sums, the
client they talk through. Nothing here reads a tensor's value."""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .. import reductions
from ..client import TrainerClient

# "<pid>:<base>" of the process that launched the job (see job_key).
_JOB_ENV = "TRAINWATCH_JOB_KEY"
_callbacks = itertools.count(1)


def job_key() -> str | None:
    """An id for the job that this process and the processes it launches agree on.

    Call it once per callback, in its constructor: before Lightning launches the ranks.
    The first call in a process makes a base (host, pid, time) and exports it; Lightning's
    own DDP launcher starts the other ranks as children that re-run the script with that
    environment and ``LOCAL_RANK`` set, so they take the base over from their parent.
    Each process counts its callbacks, and a script re-run by a rank builds them in the
    same order: the n-th callback of every rank names the same fit, and two fits in one
    script are two runs. None when an outside launcher (torchrun, ...) started this
    process (``LOCAL_RANK`` set, no base from the parent): then only its ids are shared.
    """
    n = next(_callbacks)
    pid, _, base = os.environ.get(_JOB_ENV, "").partition(":")
    local_rank = os.environ.get("LOCAL_RANK")
    if base and pid == str(os.getpid()):
        return f"{base}-{n}"  # ours (a launcher sets LOCAL_RANK=0 here after the first fit)
    if base and pid == str(os.getppid()) and local_rank not in (None, "0"):
        return f"{base}-{n}"  # a rank Lightning started: its parent's base
    if local_rank is not None:
        return None
    base = f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
    os.environ[_JOB_ENV] = f"{os.getpid()}:{base}"
    return f"{base}-{n}"


def fit_run(job: str, fits: int) -> str:
    """The run of a callback's ``fits``-th fit: a callback used twice sends two runs."""
    return job if fits == 1 else f"{job}-fit{fits}"


def make_client(endpoint: str | None, run: str, rank: int, world_size: int,
                local_collector: str | os.PathLike[str] | None) -> TrainerClient:
    if local_collector is not None and world_size > 1:
        raise ValueError("TrainwatchCallback(local_collector=...) is for single-process "
                         "training; with several ranks run `trainwatch collect --bind ...` and "
                         "set TRAINWATCH_ENDPOINT (or endpoint=) instead")
    return TrainerClient(endpoint=endpoint, run=run, rank=rank, world_size=world_size,
                         local_collector=local_collector)


def scalar_terms(output: Mapping[str, Any], skip: str = "loss") -> dict[str, Any]:
    """The scalar entries of a step's output dict besides the loss: its loss terms.

    Tensors of one element (detached: a term must not keep the graph alive until the step
    is logged) and plain numbers; anything else (predictions, strings) is not a term.
    """
    terms: dict[str, Any] = {}
    for k, v in output.items():
        if k == skip:
            continue
        if isinstance(v, torch.Tensor):
            if v.numel() == 1 and v.is_floating_point():
                terms[str(k)] = v.detach().reshape(())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            terms[str(k)] = float(v)
    return terms


class StepBuffer:
    """One optimizer step's micro-batch losses and terms, summed on the device."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.n = 0
        self.loss: torch.Tensor | None = None
        self.terms: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, loss: torch.Tensor, terms: Mapping[str, Any] | None = None) -> None:
        self.n += 1
        self.loss = loss if self.loss is None else self.loss + loss
        for k, v in (terms or {}).items():
            self.terms[k] = v if k not in self.terms else self.terms[k] + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def take(self, loss_scale: float = 1.0) -> tuple[torch.Tensor | None, dict[str, Any]]:
        """(summed loss * loss_scale, each term's mean), and start the next step."""
        loss = self.loss
        if loss is not None and loss_scale != 1.0:
            loss = loss * loss_scale
        terms = {k: v / self.counts[k] if self.counts[k] > 1 else v
                 for k, v in self.terms.items()}
        self.clear()
        return loss, terms


class GradNorms:
    """Per-parameter gradient norms taken at each optimizer's step, merged for the log.

    Several optimizers stepping in one batch (a GAN's two) each contribute their own
    parameters' norms, in the order they stepped."""

    def __init__(self, params: list[tuple[str, torch.Tensor]]) -> None:
        self._params = params
        self._by_opt: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._taken: dict[int, tuple[list[str], torch.Tensor]] = {}

    def take_from(self, optimizer: Any) -> None:
        key = id(optimizer)
        params = self._by_opt.get(key)
        if params is None:
            mine = {id(p) for g in optimizer.param_groups for p in g["params"]}
            params = self._by_opt[key] = [(n, p) for n, p in self._params if id(p) in mine]
        pn = reductions.grad_norms(params)
        if pn is not None:
            self._taken[key] = pn

    def pop(self) -> tuple[list[str], torch.Tensor] | None:
        taken, self._taken = list(self._taken.values()), {}
        if len(taken) <= 1:
            return taken[0] if taken else None
        order = {n: i for i, (n, _) in enumerate(self._params)}
        taken.sort(key=lambda t: order.get(t[0][0], 0))  # the model's order, as epochs name them
        names = [n for t in taken for n in t[0]]
        return names, torch.cat([t[1].to(taken[0][1].device) for t in taken])


def current_lr(optimizer: Any) -> torch.Tensor | float | None:
    """The first parameter group's rate as the optimizer holds it (a float or a CPU tensor:
    never read here)."""
    groups = getattr(optimizer, "param_groups", None)
    if not groups:
        return None
    lr = groups[0].get("lr")
    return lr if isinstance(lr, (torch.Tensor, float, int)) else None


class ParamView(nn.Module):
    """Named parameters shaped as a module: all the client reads of a model.

    Lets a callback hand the client "the module without its EMA copy" or "the EMA copy
    under the model's names" without building a module."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self._named = list(named)

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Any:
        return iter(self._named)

    def parameters(self, recurse: bool = True) -> Any:
        return (p for _, p in self._named)


def ema_prefix(model_names: Sequence[str], ema_names: Sequence[str]) -> str | None:
    """The prefix that maps the EMA copy's parameter names onto the model's (``"net."``
    for an ``AveragedModel(self.net)``), or None when they do not match."""
    if not ema_names:
        return None
    have = set(model_names)
    first = ema_names[0]
    best, hits = None, 0
    for m in model_names:
        if m.endswith(first):
            p = m[: len(m) - len(first)]
            n = sum(1 for e in ema_names if p + e in have)
            if n > hits:
                best, hits = p, n
    return best


def log_samples(client: TrainerClient, epoch: int, fn: Callable[[], Any], what: str,
                channel_names: Sequence[str] | None, log: logging.Logger) -> None:
    """Run the user's sample hook under no_grad and send what it gave as epoch ``epoch``'s
    validation samples. A hook that gives no tensor is the user's error (a TypeError into
    the fit); samples the client refuses are logged on ``log`` and the fit goes on."""
    with torch.no_grad():
        out = fn()
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{what} must return a tensor of samples (last dim = channels), "
                        f"got {type(out).__name__}")
    try:
        client.log_validation(epoch, out, channel_names)
    except (TypeError, ValueError) as exc:
        log.error("trainwatch: samples of epoch %d not sent: %s", epoch, exc)


def check_channels(channel_names: Sequence[str] | None, data: Any) -> list[str] | None:
    if channel_names is None:
        if data is not None:
            raise ValueError("TrainwatchCallback(data=...) needs channel_names=[...] "
                             "(one name per channel, the data's last dim)")
        return None
    if isinstance(channel_names, str):
        raise TypeError("channel_names is a sequence of names, not one string")
    return [str(c) for c in channel_names]
