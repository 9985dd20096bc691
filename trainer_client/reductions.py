"""On-device reductions: a whole model's statistics become a few numbers on the device.

Nothing here reads a value on the host. Each function returns a small device tensor;
``to_host`` starts its copy to (pinned) host memory and records a CUDA event that the
sender thread waits on, so the training thread never meets a device-to-host sync.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

_log = logging.getLogger("trainwatch.client")


def named_params(model: nn.Module, trainable_only: bool = True
                 ) -> list[tuple[str, torch.Tensor]]:
    """Parameters (trainable ones by default), with DDP's ``module.`` prefix taken off.

    An EMA copy is usually frozen (``requires_grad_(False)``): read it with
    ``trainable_only=False``.
    """
    out = []
    for name, p in model.named_parameters():
        if p.requires_grad or not trainable_only:
            out.append((name[7:] if name.startswith("module.") else name, p))
    return out


def grad_norms(params: list[tuple[str, torch.Tensor]]) -> tuple[list[str], torch.Tensor] | None:
    """Per-parameter gradient L2 norms as one float32 vector, and the parameters' names.

    A complex gradient counts as its real view (the same L2 norm). One the fused norms
    cannot take (sparse, meta, integer or float8) is left out, with one warning naming it.
    """
    names, grads = [], []
    for name, p in params:
        g = p.grad
        if g is None:
            continue
        if g.dtype not in _NORMAL or g.layout is not _STRIDED or g.is_meta:
            g = _reducible(name, g, "the gradient norms")
            if g is None:
                continue
        names.append(name)
        grads.append(g.detach())
    if not grads:
        return None
    device = grads[0].device
    # One fused launch per device/dtype group on CUDA; float32 results, so a float16
    # gradient's norm cannot overflow (float64 ones reduce in float64: no narrowing).
    norms = _norms(grads, 2, torch.float32)
    return names, torch.stack([n.to(device, torch.float32, non_blocking=True) for n in norms])


def weight_summary(params: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """float64 [count, sum |w|, sum w, sum w^2, max |w|] over every element of every parameter.

    Per-parameter norms reduce straight into float64: a float16 parameter's L1 norm
    overflows float16, and float32 accumulation on the CPU loses ~0.5 % over 10^6 values.
    A complex parameter counts as its real and imaginary parts; parameters the reductions
    cannot take are left out with one warning. None when none is left.
    """
    ps = [t for t in (_usable(n, p, "the weight statistics") for n, p in params)
          if t is not None]
    if not ps:
        return None
    device = ps[0].device
    count = float(sum(p.numel() for p in ps))  # metadata only, no device read
    l1 = torch._foreach_norm(ps, 1, dtype=torch.float64)
    l2 = torch._foreach_norm(ps, 2, dtype=torch.float64)
    linf = torch._foreach_norm(ps, float("inf"), dtype=torch.float64)
    sums = [p.sum(dtype=torch.float64) for p in ps]

    def total(xs: list[torch.Tensor], sq: bool = False) -> torch.Tensor:
        v = torch.stack([x.to(device, torch.float64) for x in xs])
        return (v * v).sum() if sq else v.sum()

    return torch.stack([
        torch.full((), count, dtype=torch.float64, device=device),  # a fill, no copy
        total(l1),
        total(sums),
        total(l2, sq=True),
        torch.stack([x.to(device, torch.float64) for x in linf]).max(),
    ])


def ema_summary(params: list[tuple[str, torch.Tensor]],
                ema_params: list[tuple[str, torch.Tensor]]) -> torch.Tensor | None:
    """float64 [count, sum |w_ema - w|] over parameters matched by name (one at a time,
    so the extra memory is one parameter, not a model). Complex parameters compare their
    real views; pairs the reductions cannot take are left out. None when none is left."""
    ema = dict(ema_params)
    acc = None
    count = 0
    for name, p in params:
        e = ema.get(name)
        if e is None:
            continue
        p = _usable(name, p, "the EMA difference")
        e = _usable(name, e, "the EMA difference")
        if p is None or e is None or e.shape != p.shape:
            continue
        d = (e.to(p.device) - p).abs().sum(dtype=torch.float64)
        acc = d if acc is None else acc + d
        count += p.numel()
    if acc is None:
        return None
    return torch.stack([torch.full((), float(count), dtype=torch.float64, device=acc.device),
                        acc])


_NORMAL = frozenset((torch.float16, torch.bfloat16, torch.float32))
_REAL = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_STRIDED = torch.strided
_left_out: set[tuple[str, str]] = set()  # (parameter, what): warned once per process


def _usable(name: str, t: torch.Tensor, what: str) -> torch.Tensor | None:
    t = t.detach()
    if t.dtype in _REAL and t.layout is _STRIDED and not t.is_meta:
        return t
    return _reducible(name, t, what)


def _reducible(name: str, t: torch.Tensor, what: str) -> torch.Tensor | None:
    """``t`` as the fused reductions take it, or None: left out, one warning per name."""
    if t.is_meta:
        why = "it is on the meta device (no values)"
    elif t.layout is not _STRIDED:
        why = f"its layout is {str(t.layout).removeprefix('torch.')}"
    elif t.dtype in _REAL:
        return t
    elif t.dtype.is_complex:
        # |z|^2 = re^2 + im^2: the real view has the same L2 norm.
        return torch.view_as_real(t.resolve_conj() if t.is_conj() else t)
    else:
        why = f"its dtype is {str(t.dtype).removeprefix('torch.')}"
    key = (name, what)
    if key not in _left_out:
        _left_out.add(key)
        _log.warning("trainwatch: %s left out of %s: %s", name, what, why)
    return None


def _norms(ts: list[torch.Tensor], ord: float, dtype: torch.dtype) -> list[torch.Tensor]:
    """``torch._foreach_norm`` in ``dtype``; float64 inputs reduce in float64 (the fused
    norm refuses to narrow), in their own call, results in the inputs' order."""
    wide = [i for i, t in enumerate(ts) if t.dtype == torch.float64]
    if not wide or dtype == torch.float64:
        return list(torch._foreach_norm(ts, ord, dtype=dtype))
    out: list[torch.Tensor] = [None] * len(ts)  # type: ignore[list-item]
    narrow = [i for i, t in enumerate(ts) if t.dtype != torch.float64]
    for idx, dt in ((narrow, dtype), (wide, torch.float64)):
        if idx:
            for i, n in zip(idx, torch._foreach_norm([ts[i] for i in idx], ord, dtype=dt),
                            strict=True):
                out[i] = n
    return out


def to_host(t: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start the copy of ``t`` to host memory; return the host tensor and an event to wait on.

    On CUDA this is an asynchronous copy into pinned memory (``non_blocking=True``): the
    host tensor is valid only after the event completes. A CPU tensor is already there.
    """
    if t.device.type == "cuda":
        host = t.to("cpu", non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    if t.device.type == "cpu":
        return t, None
    # Other accelerators: a synchronous copy would block; use their own non_blocking copy.
    return t.to("cpu", non_blocking=True), None


class MutatedError(RuntimeError):
    """A logged CPU tensor changed in place before the sender read it: its message drops."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / AveragedModel wrappers."""
    return getattr(model, "module", model)
