"""TrainerClient: the training loop's whole interface to trainwatch.

Every ``log_*`` call does its arithmetic on the device, starts one asynchronous copy of
a small tensor to host memory and appends an item to a bounded queue. It never calls
``.item()``, ``.tolist()`` or a synchronous ``.cpu()``, never touches the socket and never
waits: when the collector is slow, absent or dead, messages are dropped and counted.

    tw = TrainerClient()                       # TRAINWATCH_ENDPOINT or tcp://127.0.0.1:5555
    tw.log_config(vars(args), model=model)
    for epoch in range(1, args.epochs + 1):
        for x in loader:
            loss, terms = compute_loss(model, x)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); opt.zero_grad()
            tw.log_step(loss, terms, model=model, grad_norm=norm)
        tw.log_epoch(epoch, model=model, ema_model=ema)
    tw.close()
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from . import identity, reductions, wire
from .sender import Item, Sender

__all__ = ["TrainerClient"]

_log = logging.getLogger("trainwatch.client")
_clients: weakref.WeakSet[TrainerClient] = weakref.WeakSet()

_CHUNK_BYTES = 8 << 20  # data-stats chunks: big enough to amortise, small enough to interleave


def _after_fork_in_child() -> None:
    # The sender thread did not survive the fork and the socket belongs to the parent:
    # a forked DataLoader worker must go quiet, never send.
    for client in list(_clients):
        client._forked()


def _close_all_at_exit() -> None:
    # A script that forgets close() still says goodbye, so the collector sees the run end.
    for client in list(_clients):
        client.close(timeout=2.0)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)


def _raw(host: torch.Tensor, name: str, dtype: str) -> wire.Tensor:
    """A host tensor's bytes without a copy (bfloat16 has no numpy type: view as bytes)."""
    data = host.contiguous().view(torch.uint8).numpy() if host.numel() else b""
    return wire.Tensor(name, dtype, tuple(host.shape), data)


class TrainerClient:
    """Ships training-health data to a trainwatch collector without blocking the loop.

    Endpoint: argument, else ``TRAINWATCH_ENDPOINT``, else ``tcp://127.0.0.1:5555``.
    Run id: argument, else ``TRAINWATCH_RUN``, else derived from the launcher so every
    rank agrees. Rank/world size: argument, else ``torch.distributed``, else ``RANK`` /
    ``WORLD_SIZE``, else 0/1. CURVE keys: argument or ``TRAINWATCH_CURVE_KEYS`` (a folder
    made by ``trainwatch keys generate``). ``local_collector=FOLDER``: with no endpoint
    configured, start a collector of this job's own that writes into FOLDER.
    """

    def __init__(self, endpoint: str | None = None, run: str | None = None,
                 rank: int | None = None, world_size: int | None = None,
                 curve_keys: str | None = None, max_queue: int = 10_000,
                 max_queue_bytes: int = 1 << 30,
                 local_collector: str | os.PathLike[str] | None = None) -> None:
        self.run = identity.resolve_run(run)
        self.rank, self.world_size = identity.resolve_rank_world(rank, world_size)
        self._local = None
        if local_collector is not None and endpoint is None \
                and not os.environ.get("TRAINWATCH_ENDPOINT"):
            from .local import LocalCollector

            self._local = LocalCollector(local_collector, self.run)
            endpoint = self._local.endpoint
        self.endpoint = identity.resolve_endpoint(endpoint)
        curve = _load_curve(curve_keys or os.environ.get("TRAINWATCH_CURVE_KEYS"))
        self._pid = os.getpid()
        self._seq = itertools.count()
        self._lock = threading.Lock()  # only against concurrent log_* calls, never the sender
        self._closed = False
        self._after_close = 0
        self._epoch = 0  # the epoch that steps now belong to (last logged + 1)
        self._step = 0
        self._params: dict[int, list[tuple[str, torch.Tensor]]] = {}
        self._pn_names: list[str] | None = None  # of the last grad_norms= given to log_step
        self._sender = Sender(self.endpoint, self.run, self.rank, self.world_size,
                              random.getrandbits(32), max_queue=max_queue,
                              max_queue_bytes=max_queue_bytes, curve=curve,
                              connect_grace_s=60.0 if self._local else 5.0)
        _clients.add(self)
        body = {"host": socket.gethostname(), "pid": self._pid, "env": identity.wandb_env()}
        self._enqueue(wire.KIND_HELLO, lambda _h: (body, []))

    # -- public API ------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, Any]:
        """Counters: ``sent``, ``dropped`` (all reasons), ``dropped_by_reason``, ``queued``."""
        s = self._sender
        drops = dict(s.drops)
        return {"sent": s.sent, "dropped": sum(drops.values()), "dropped_by_reason": drops,
                "queued": s.queued(), "after_close": self._after_close}

    def log_config(self, config: Mapping[str, Any], model: nn.Module | None = None) -> None:
        """Hyperparameters (the seed's section 1); with a model, ``num_params`` is added."""
        cfg = {str(k): _plain(v) for k, v in dict(config).items()}
        num_params = None
        if model is not None:
            num_params = sum(p.numel() for p in reductions.unwrap(model).parameters())
        body = {"config": cfg, "num_params": num_params}
        self._enqueue(wire.KIND_CONFIG, lambda _h: (body, []))

    def log_data_stats(self, data: torch.Tensor, channel_names: Sequence[str],
                       mean: Any = None, std: Any = None) -> None:
        """The normalised training data (last dim = channels), shipped raw in chunks.

        ``mean``/``std`` are the per-channel normalisation constants (physical = x*std+mean);
        the collector keeps them to judge generated samples in physical units.
        """
        names = [str(c) for c in channel_names]
        if data.ndim < 1 or data.shape[-1] != len(names):
            raise ValueError(f"data's last dim {tuple(data.shape)} != {len(names)} channel names")
        dtype = _dtype_name(data)
        flat = data.detach().reshape(-1, len(names))
        rows = max(1, _CHUNK_BYTES // max(1, flat.shape[1] * flat.element_size()))
        chunks = list(torch.split(flat, rows)) or [flat]
        consts = {k: _const(v, len(names), k) for k, v in (("mean", mean), ("std", std))}
        for i, chunk in enumerate(chunks):
            host, event = reductions.to_host(chunk.contiguous())
            extra = consts if i == 0 else {}
            body = {"index": i, "count": len(chunks), "channels": names}

            def build(h: torch.Tensor, body: dict = body, extra: dict = extra) -> tuple:
                ts = [_raw(h, "chunk", dtype)]
                ts += [wire.Tensor(k, "float64", (len(names),), v) for k, v in extra.items()
                       if v is not None]
                return body, ts

            self._enqueue(wire.KIND_DATA, build, host, event, host.numel() * host.element_size())

    def log_step(self, loss: torch.Tensor | float,
                 components: Mapping[str, torch.Tensor | float] | None = None,
                 model: nn.Module | None = None,
                 grad_norm: torch.Tensor | float | None = None,
                 lr: torch.Tensor | float | None = None,
                 grad_norms: tuple[list[str], torch.Tensor] | None = None) -> None:
        """One optimisation step, after backward: loss, loss terms, gradient norms.

        The global gradient L2 norm is ``grad_norm`` when given (e.g. what
        ``clip_grad_norm_`` returned), else computed on the device from ``model``'s
        gradients. With a model, the per-parameter gradient norms travel too. ``lr`` is
        the optimizer's current rate (e.g. ``scheduler.get_last_lr()[0]``), so remedies
        quote the rate the run really had. ``grad_norms``: per-parameter norms taken
        earlier (``reductions.grad_norms(params)``, e.g. before ``zero_grad``), used
        instead of ``model``'s gradients.
        """
        if self._closed:
            self._after_close += 1
            return
        if grad_norms is not None:
            self._pn_names = grad_norms[0]
        if model is None and grad_norms is None and not getattr(loss, "is_cuda", False):
            # Nothing on a device: the values already live in host memory. Queue the
            # references and let the sender thread sort and read them; right after a
            # backward pass every Python line here costs ~10x (cold caches).
            comps = dict(components) if components else {}
            self._step += 1
            self._enqueue(wire.KIND_STEP, _host_step,
                          (loss, comps, grad_norm, lr, _versions(loss, comps, grad_norm, lr)),
                          step=self._step)
            return
        # Vector layout on the device: [loss?, tensor terms..., grad_norm?, lr?, param norms...]
        tensor = torch.Tensor
        parts: list[torch.Tensor] = []
        t_names: list[str] = []
        f_names: list[str] = []
        f_vals: list[float] = []
        loss_is_tensor = isinstance(loss, tensor)
        if loss_is_tensor:
            parts.append(_scalar(loss, "loss"))
        if components:
            for name, value in components.items():
                if isinstance(value, tensor):
                    parts.append(_scalar(value, name))
                    t_names.append(str(name))
                else:
                    f_names.append(str(name))
                    f_vals.append(float(value))
        pn = grad_norms
        if pn is None and model is not None:
            pn = reductions.grad_norms(self._params_of(model))
        gn_float: float | None = None
        has_gn = isinstance(grad_norm, tensor)
        if has_gn:
            parts.append(_scalar(grad_norm, "grad_norm"))
        elif grad_norm is not None:
            gn_float = float(grad_norm)
        elif pn is not None:
            parts.append(torch.linalg.vector_norm(pn[1]))
            has_gn = True
        lr_float: float | None = None
        has_lr = isinstance(lr, tensor)
        if has_lr:  # an optimizer's tensor lr lives on the CPU: copied now, no read
            lr_t = _scalar(lr, "lr")
            parts.append(lr_t.to(parts[0].device, non_blocking=True) if parts else lr_t)
        elif lr is not None:
            lr_float = float(lr)
        host = event = None
        if parts:
            # One stack with grad mode off: a snapshot, no autograd node holding the graph.
            # (torch.no_grad() costs ~3 us of Python here; the raw switch does not.)
            grad_was = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                vec = torch.stack(parts)
                if vec.dtype != torch.float32:
                    vec = vec.float()
                if pn is not None:
                    vec = torch.cat([vec, pn[1].to(vec.device)])
            finally:
                torch._C._set_grad_enabled(grad_was)
            host, event = reductions.to_host(vec)
        layout = _StepVector(None if loss_is_tensor else float(loss), t_names, f_names, f_vals,
                             has_gn, gn_float, has_lr, lr_float, len(parts), pn is not None)
        self._step += 1
        self._enqueue(wire.KIND_STEP, layout.body, host, event, step=self._step)

    def log_epoch(self, epoch: int, model: nn.Module | None = None,
                  ema_model: nn.Module | None = None) -> None:
        """Close ``epoch``: weight statistics and the EMA difference, reduced on the device."""
        if self._closed:
            self._after_close += 1
            return
        epoch = int(epoch)
        if epoch < 0:
            raise ValueError(f"log_epoch: epoch must be >= 0, got {epoch}")
        names: list[str] | None = None
        host = event = None
        if model is not None:
            params = self._params_of(model)
            # After zero_grad(set_to_none) no gradient is left: the names of the norms
            # that steps shipped via grad_norms= then label them.
            names = [n for n, p in params if p.grad is not None] or self._pn_names
            vec = reductions.weight_summary(params)
            if ema_model is not None:
                ema = reductions.named_params(reductions.unwrap(ema_model),
                                              trainable_only=False)
                vec = torch.cat([vec, reductions.ema_summary(params, ema)])
            host, event = reductions.to_host(vec)

        def build(h: torch.Tensor | None) -> tuple:
            v = h.tolist() if h is not None else []
            body = {"weights": v[:_NW] or None, "ema": v[_NW:_NW + _NE] or None,
                    "param_names": names}
            return body, []

        self._enqueue(wire.KIND_EPOCH, build, host, event, epoch=epoch)
        self._epoch = epoch + 1

    def log_validation(self, epoch: int, samples: torch.Tensor,
                       channel_names: Sequence[str] | None = None) -> None:
        """Generated samples (normalised, last dim = channels), shipped raw in their dtype.

        Call it before ``log_epoch(epoch)`` so the samples land in that epoch's record.
        """
        if self._closed:
            self._after_close += 1
            return
        dtype = _dtype_name(samples)
        names = [str(c) for c in channel_names] if channel_names is not None else None
        if names is not None and (samples.ndim < 1 or samples.shape[-1] != len(names)):
            raise ValueError(f"samples' last dim {tuple(samples.shape)} != {len(names)} names")
        host, event = reductions.to_host(samples.detach().contiguous())
        body = {"channels": names, "epoch": int(epoch)}
        self._enqueue(wire.KIND_VALIDATION, lambda h: (body, [_raw(h, "samples", dtype)]),
                      host, event, host.numel() * host.element_size(), epoch=int(epoch))

    def close(self, timeout: float = 5.0) -> None:
        """Send what can be sent within ``timeout`` seconds, then say goodbye. Always returns."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if os.getpid() != self._pid:
            return
        if self._local is not None:  # our own collector may still be starting up
            timeout = max(timeout, 30.0)
        deadline = time.monotonic() + max(0.0, timeout)
        seq = next(self._seq)
        final = Item(wire.KIND_BYE, seq, self._step, self._epoch, self._sender.enq_dropped,
                     lambda _h: ({"stats": self._final_stats()}, []))
        if not self._sender.close(deadline, final):
            _log.warning("trainwatch: close() timed out after %.1fs", timeout)
        if self._local is not None:
            self._local.wait(max(5.0, 6 * timeout))

    def __enter__(self) -> TrainerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------
    def _enqueue(self, kind: int, build: Any, host: Any = None, event: Any = None,
                 nbytes: int = 0, step: int | None = None, epoch: int | None = None) -> None:
        if self._closed:
            self._after_close += 1
            return
        with self._lock:  # uncontended in a single training thread: ~100 ns
            seq = next(self._seq)
            item = Item(kind, seq, self._step if step is None else step,
                        self._epoch if epoch is None else epoch,
                        self._sender.enq_dropped, build, host, event, nbytes)
            self._sender.offer(item)

    def _params_of(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        key = id(model)
        params = self._params.get(key)
        if params is None:
            params = self._params[key] = reductions.named_params(reductions.unwrap(model))
        return params

    def _final_stats(self) -> dict[str, int]:
        s = self._sender
        return {"sent": s.sent + 1, **s.drops}

    def _forked(self) -> None:
        self._closed = True
        self._pid = -1


def _versions(*values: Any) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, dict):
            out += _versions(*v.values())
        elif isinstance(v, torch.Tensor):
            out.append(v._version)
    return out


def _host_step(h: tuple) -> tuple:
    """A step's wire body from host values (sender thread); see ``log_step``."""
    loss, comps, grad_norm, lr, versions = h
    if _versions(loss, comps, grad_norm, lr) != versions:
        raise reductions.MutatedError("a logged tensor was changed in place before it was sent")
    try:
        body = [_float(loss), None if grad_norm is None else _float(grad_norm),
                [str(k) for k in comps], [_float(v) for v in comps.values()],
                None if lr is None else _float(lr)]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"log_step takes scalars (tensors of one element or floats): {exc}"
                         ) from None
    return body, []


def _float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


class _StepVector(NamedTuple):
    """Where a step's values sit in the device vector the sender reads back:
    ``[loss?, tensor terms..., grad_norm?, lr?, param norms...]``; values given as
    floats travel beside it."""

    loss: float | None  # the loss when given as a float; else the vector's first value
    tensor_names: list[str]
    float_names: list[str]
    float_values: list[float]
    has_grad_norm: bool  # in the vector
    grad_norm: float | None  # given as a float
    has_lr: bool
    lr: float | None
    n_scalars: int  # values before the param norms
    has_param_norms: bool

    def body(self, h: torch.Tensor | None) -> tuple:
        """The step's wire body from the host copy of the vector (sender thread)."""
        head = h[:self.n_scalars].tolist() if h is not None else []
        at = 0 if self.loss is not None else 1
        loss = self.loss if self.loss is not None else head[0]
        terms = head[at:at + len(self.tensor_names)]
        at += len(self.tensor_names)
        gn = head[at] if self.has_grad_norm else self.grad_norm
        at += self.has_grad_norm
        lr = head[at] if self.has_lr else self.lr
        body = [loss, gn, self.tensor_names + self.float_names, terms + self.float_values, lr]
        pn = [_raw(h[self.n_scalars:], "param_norms", "float32")] if self.has_param_norms else []
        return body, pn


def _scalar(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as a 0-d tensor (metadata only, no device work), or a clear error."""
    if t.dim() == 0:
        return t
    if t.numel() != 1:
        raise ValueError(f"log_step: {name} must be a scalar, got shape {tuple(t.shape)}")
    return t.reshape(())


_NW, _NE = len(wire.WEIGHT_FIELDS), len(wire.EMA_FIELDS)  # the epoch vector's two parts


def _dtype_name(t: torch.Tensor) -> str:
    name = str(t.dtype).removeprefix("torch.")
    if name not in wire.FLOAT_DTYPES:
        raise TypeError(f"trainwatch ships float16/bfloat16/float32/float64 tensors, not {t.dtype}")
    return name


def _const(v: Any, n: int, what: str) -> bytes | None:
    """Normalisation constants as float64 bytes (host values: they are set once, up front)."""
    if v is None:
        return None
    # float64 from the start: Python floats would otherwise pass through float32.
    t = torch.as_tensor(v, dtype=torch.float64).detach().to("cpu").reshape(-1)
    if t.numel() != n:
        raise ValueError(f"log_data_stats: {what} has {t.numel()} values for {n} channels")
    return t.numpy().tobytes()


def _plain(v: Any) -> Any:
    """A config value msgpack can carry: numbers, strings, bools, lists, dicts; else str()."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu":
        return v.item()
    return str(v)


def _load_curve(folder: str | None) -> dict[str, bytes] | None:
    if not folder:
        return None
    from .curve import client_keys

    return client_keys(folder)
