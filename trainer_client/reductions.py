"""On-device reductions: a whole model's statistics become a few numbers on the device.

Nothing here reads a value on the host. Each function returns a small device tensor;
``to_host`` starts its copy to (pinned) host memory and records a CUDA event that the
sender thread waits on, so the training thread never meets a device-to-host sync.
"""

from __future__ import annotations

import torch
from torch import nn


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
    """Per-parameter gradient L2 norms as one float32 vector, and the parameters' names."""
    names, grads = [], []
    for name, p in params:
        g = p.grad
        if g is not None and not g.is_sparse:
            names.append(name)
            grads.append(g.detach())
    if not grads:
        return None
    device = grads[0].device
    # One fused launch per device/dtype group on CUDA; float32 results, so a float16
    # gradient's norm cannot overflow.
    norms = torch._foreach_norm(grads, dtype=torch.float32)
    return names, torch.stack([n.to(device, torch.float32, non_blocking=True) for n in norms])


def weight_summary(params: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """float64 [count, sum |w|, sum w, sum w^2, max |w|] over every element of every parameter.

    Per-parameter norms reduce straight into float64: a float16 parameter's L1 norm
    overflows float16, and float32 accumulation on the CPU loses ~0.5 % over 10^6 values.
    """
    ps = [p.detach() for _, p in params]
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
                ema_params: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """float64 [count, sum |w_ema - w|] over parameters matched by name (one at a time,
    so the extra memory is one parameter, not a model)."""
    ema = dict(ema_params)
    device = params[0][1].device
    acc = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for name, p in params:
        e = ema.get(name)
        if e is None or e.shape != p.shape:
            continue
        acc = acc + (e.detach().to(p.device) - p.detach()).abs().sum(dtype=torch.float64)
        count += p.numel()
    return torch.stack([torch.full((), float(count), dtype=torch.float64, device=device), acc])


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
