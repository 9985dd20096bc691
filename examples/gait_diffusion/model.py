"""A small DDPM over gait windows: a 1-D conv denoiser, its noise schedule, an EMA copy.

Knows nothing about training. ``Denoiser`` maps a noisy window ``[B, T, C]`` and integer
timesteps ``[B]`` to a prediction of the noise (epsilon parameterisation).

    net = Denoiser(DenoiserConfig(channels=8))
    diffusion = Diffusion(steps=50)
    x_t = diffusion.add_noise(x0, t, eps)
    eps_hat, x0_hat = diffusion.predict(net, x_t, t)
    samples = diffusion.sample(net, n=32, window_len=64, channels=8)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DenoiserConfig:
    channels: int = 8  # signal channels
    hidden: int = 48  # feature channels of the residual blocks
    blocks: int = 4  # residual blocks, dilation doubling per block
    kernel: int = 5
    emb_dim: int = 64  # timestep embedding width
    # "eps": the network predicts the noise. "x0": it predicts the clean window.
    prediction: str = "eps"
    # False cuts the network's view of the noisy window: its output then depends on the
    # timestep alone (a broken input path; used to reproduce a collapsed generator).
    sees_input: bool = True

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "x0"):
            raise ValueError(f"prediction must be 'eps' or 'x0', not {self.prediction!r}")


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of the integer timestep, then a small MLP."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None, :]
        return self.mlp(torch.cat([angles.sin(), angles.cos()], dim=1))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep entering as a per-channel scale and shift."""

    def __init__(self, hidden: int, emb_dim: int, kernel: int, dilation: int) -> None:
        super().__init__()
        pad = dilation * (kernel - 1) // 2
        # Replicate padding: a window's edges are not periodic, and a signal that is constant
        # in time stays constant through the stack.
        conv = dict(kernel_size=kernel, dilation=dilation, padding=pad, padding_mode="replicate")
        self.norm1 = nn.GroupNorm(8, hidden)
        self.conv1 = nn.Conv1d(hidden, hidden, **conv)
        self.film = nn.Linear(emb_dim, 2 * hidden)
        self.norm2 = nn.GroupNorm(8, hidden)
        self.conv2 = nn.Conv1d(hidden, hidden, **conv)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None].chunk(2, dim=1)
        y = self.conv1(F.silu(self.norm1(h)))
        y = self.norm2(y) * (1 + scale) + shift
        return h + self.conv2(F.silu(y))


class Denoiser(nn.Module):
    """1-D conv denoiser over ``[B, T, C]`` windows (~130k parameters by default)."""

    def __init__(self, config: DenoiserConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or DenoiserConfig()
        self.register_buffer("input_gate", torch.tensor(1.0 if config.sees_input else 0.0))
        self.embed = TimestepEmbedding(config.emb_dim)
        self.inp = nn.Conv1d(config.channels, config.hidden, 1)
        self.blocks = nn.ModuleList(
            ResBlock(config.hidden, config.emb_dim, config.kernel, 2**i)
            for i in range(config.blocks)
        )
        self.out_norm = nn.GroupNorm(8, config.hidden)
        self.out = nn.Conv1d(config.hidden, config.channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(t)
        h = self.inp(x_t.transpose(1, 2) * self.input_gate)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.out_norm(h))).transpose(1, 2)


class Diffusion:
    """Cosine noise schedule (Nichol & Dhariwal 2021) and ancestral DDPM sampling.

    A short schedule (50 steps by default) keeps CPU sampling cheap; the cosine schedule
    keeps a short chain usable.
    """

    def __init__(self, steps: int = 50, x0_clip: float = 6.0) -> None:
        self.steps = steps
        self.x0_clip = x0_clip  # normalized units; the data lies within about +-4
        s = 0.008
        u = torch.linspace(0, steps, steps + 1, dtype=torch.float64) / steps
        f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        alphas = 1 - betas
        abar = torch.cumprod(alphas, 0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        self.betas = betas.float()
        self.alphas = alphas.float()
        self.alpha_bar = abar.float()
        self.posterior_var = (betas * (1 - abar_prev) / (1 - abar)).float()
        self.coef_x0 = (betas * abar_prev.sqrt() / (1 - abar)).float()
        self.coef_xt = ((1 - abar_prev) * alphas.sqrt() / (1 - abar)).float()

    def _at(self, values: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return values.to(t.device)[t][:, None, None]

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        abar = self._at(self.alpha_bar, t)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * eps

    def predict(self, model: nn.Module, x_t: torch.Tensor,
                t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's noise and clean-window estimates, whichever one it predicts."""
        abar = self._at(self.alpha_bar, t)
        out = model(x_t, t)
        prediction = _unwrap(model).config.prediction
        if prediction == "eps":
            return out, (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
        return (x_t - abar.sqrt() * out) / (1 - abar).sqrt(), out

    @torch.no_grad()
    def sample(self, model: nn.Module, n: int, window_len: int, channels: int,
               generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
        """``n`` normalized windows ``[n, window_len, channels]`` by ancestral sampling."""
        x = torch.randn(n, window_len, channels, generator=generator, device=device)
        for step in reversed(range(self.steps)):
            t = torch.full((n,), step, dtype=torch.long, device=device)
            _, x0_hat = self.predict(model, x, t)
            x0_hat = x0_hat.clamp(-self.x0_clip, self.x0_clip)
            x = self._at(self.coef_x0, t) * x0_hat + self._at(self.coef_xt, t) * x
            if step > 0:
                noise = torch.randn(x.shape, generator=generator, device=device)
                x = x + self._at(self.posterior_var, t).sqrt() * noise
        return x


class Ema:
    """An exponential moving average of a model's weights, in a frozen copy.

    The decay warms up as ``(1 + n) / (10 + n)`` so the copy is useful after a few steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995) -> None:
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        ema = list(self.module.parameters())
        live = [p.detach() for p in _unwrap(model).parameters()]
        torch._foreach_lerp_(ema, live, 1.0 - decay)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _unwrap(model).parameters())


def _unwrap(model: nn.Module) -> nn.Module:
    """The bare module inside a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
