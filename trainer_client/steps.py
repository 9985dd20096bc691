"""A step on its way: the device vector ``log_step`` builds, its layout, and the body the
sender thread reads back from it (or from host values), without a host read on the
training thread."""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from . import reductions, wire
from .tensors import BadArgument, raw

__all__ = ["GradWatch", "StepVector", "as_float", "epoch_vector", "host_step", "scalar",
           "step_vector", "versions"]

_log = logging.getLogger("trainwatch.client")


def versions(*values: Any) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, dict):
            out += versions(*v.values())
        elif isinstance(v, torch.Tensor):
            out.append(v._version)
    return out


def host_step(h: tuple) -> tuple:
    """A step's wire body from host values (sender thread); see ``log_step``."""
    loss, comps, grad_norm, lr, seen = h
    if versions(loss, comps, grad_norm, lr) != seen:
        raise reductions.MutatedError("a logged tensor was changed in place before it was sent")
    try:
        body = [as_float(loss), None if grad_norm is None else as_float(grad_norm),
                [str(k) for k in comps], [as_float(v) for v in comps.values()],
                None if lr is None else as_float(lr)]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"log_step takes scalars (tensors of one element or floats): {exc}"
                         ) from None
    return body, []


def as_float(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


class StepVector(NamedTuple):
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
    grads: GradWatch | None = None  # told when every param norm is zero
    step: int = 0

    def body(self, h: torch.Tensor | None) -> tuple:
        """The step's wire body from the host copy of the vector (sender thread)."""
        pn = h[self.n_scalars:] if self.has_param_norms else None
        if pn is not None and self.grads is not None and not self.grads.zero_settled:
            self.grads.zeros(pn, self.step)
        head = h[:self.n_scalars].tolist() if h is not None else []
        at = 0 if self.loss is not None else 1
        loss = self.loss if self.loss is not None else head[0]
        terms = head[at:at + len(self.tensor_names)]
        at += len(self.tensor_names)
        gn = head[at] if self.has_grad_norm else self.grad_norm
        at += self.has_grad_norm
        lr = head[at] if self.has_lr else self.lr
        body = [loss, gn, self.tensor_names + self.float_names, terms + self.float_values, lr]
        return body, [] if pn is None else [raw(pn, "param_norms", "float32")]


class GradWatch:
    """Says once when a model's gradients are all None (metadata, training thread) or all
    zero (from the values the sender thread reads anyway): the loop logs after zero_grad."""

    _HOW = ("log_step reads the model's .grad: call it after backward() (and clipping) and "
            "before opt.zero_grad()")

    def __init__(self) -> None:
        self.none_warned = False
        # Settled once a step had a nonzero norm (the loop's order is right: later zeros
        # are the collector's to judge) or once it was said: no check per step after that.
        self.zero_settled = False

    def none(self, params: list[tuple[str, torch.Tensor]], step: int) -> None:
        if self.none_warned:
            return
        self.none_warned = True  # said once; grads left out by the reductions were named
        if not params:
            _log.warning("trainwatch: log_step(model=...) at step %d: the model has no "
                         "trainable parameters, so no gradient norms", step)
        elif all(p.grad is None for _, p in params):
            _log.warning("trainwatch: log_step(model=...) at step %d found every gradient "
                         "None, so no per-parameter gradient norms: %s, which sets them to "
                         "None", step, self._HOW)

    def zeros(self, norms: torch.Tensor, step: int) -> None:
        if not norms.numel():
            return
        self.zero_settled = True
        if not norms.numpy().any():
            _log.warning("trainwatch: log_step(model=...) at step %d found every gradient "
                         "zero: %s (with set_to_none=False it zeroes them, and the gradient "
                         "metrics read 0)", step, self._HOW)


def scalar(t: torch.Tensor, name: str) -> torch.Tensor:
    """``t`` as a 0-d tensor (metadata only, no device work), or a clear error."""
    if t.dim() == 0:
        return t
    if t.numel() != 1:
        raise BadArgument(f"log_step: {name} must be a scalar, got shape {tuple(t.shape)}")
    return t.reshape(())


def step_vector(loss: Any, components: Any, pn: tuple | None, grad_norm: Any, lr: Any,
                grads: GradWatch, step: int) -> tuple[StepVector, Any, Any]:
    """One step's values on the device as one vector, its copy to the host started:
    (layout, host tensor, event). ``pn``: the per-parameter gradient norms, or None."""
    # Vector layout on the device: [loss?, tensor terms..., grad_norm?, lr?, param norms...]
    tensor = torch.Tensor
    parts: list[torch.Tensor] = []
    t_names: list[str] = []
    f_names: list[str] = []
    f_vals: list[float] = []
    loss_is_tensor = isinstance(loss, tensor)
    if loss_is_tensor:
        parts.append(scalar(loss, "loss"))
    if components:
        for name, value in components.items():
            if isinstance(value, tensor):
                parts.append(scalar(value, name))
                t_names.append(str(name))
            else:
                f_names.append(str(name))
                f_vals.append(float(value))
    gn_float: float | None = None
    has_gn = isinstance(grad_norm, tensor)
    if has_gn:
        parts.append(scalar(grad_norm, "grad_norm"))
    elif grad_norm is not None:
        gn_float = float(grad_norm)
    elif pn is not None:
        parts.append(torch.linalg.vector_norm(pn[1]))
        has_gn = True
    lr_float: float | None = None
    has_lr = isinstance(lr, tensor)
    if has_lr:  # an optimizer's tensor lr lives on the CPU: copied now, no read
        lr_t = scalar(lr, "lr")
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
    layout = StepVector(None if loss_is_tensor else float(loss), t_names, f_names, f_vals,
                        has_gn, gn_float, has_lr, lr_float, len(parts), pn is not None,
                        grads, step)
    return layout, host, event


_NW, _NE = len(wire.WEIGHT_FIELDS), len(wire.EMA_FIELDS)  # the epoch vector's two parts


def epoch_vector(params: list[tuple[str, torch.Tensor]], ema_model: Any) -> tuple:
    """``log_epoch``'s device work: (host copy, its event, weight fields, EMA fields) of the
    weight summary and, with ``ema_model``, the EMA difference; (None, None, 0, 0) when
    neither can be computed."""
    w = reductions.weight_summary(params)
    e = None
    if ema_model is not None:
        ema = reductions.named_params(reductions.unwrap(ema_model), trainable_only=False)
        e = reductions.ema_summary(params, ema)
    nw, ne = (_NW if w is not None else 0), (_NE if e is not None else 0)
    vecs = [v for v in (w, e) if v is not None]
    if not vecs:
        return None, None, nw, ne
    dev = vecs[0].device
    host, event = reductions.to_host(torch.cat([v.to(dev) for v in vecs]))
    return host, event, nw, ne
