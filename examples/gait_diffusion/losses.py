"""The gait-diffusion loss: noise MSE plus four physical terms on the predicted clean window.

    loss_fn = GaitLoss(data.channel_names, data.mean, data.std, data.sample_rate_hz)
    total, terms = loss_fn(eps_hat, eps, x0_hat, x0, alpha_bar_t)

``terms`` holds each term's weighted contribution (``simple``, ``vel``, ``fk``, ``drift``,
``slide``), so they add up to ``total`` and ``term / total`` is that term's share.
Everything stays a tensor on the device: no host synchronisation here.

The four physical terms compare the predicted clean window ``x0_hat`` with the true one.
At high noise levels ``x0_hat`` is an extrapolation with error variance ``(1 - abar) / abar``
times the noise error, so each sample's physical terms are weighted by ``abar_t``: their
error is then bounded by the noise error instead of growing without limit as abar -> 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Two-segment sagittal leg (adult reference lengths, metres).
THIGH_M = 0.44
SHANK_M = 0.43
# Vertical GRF above which a foot counts as in stance (newtons).
STANCE_GRF_N = 50.0
# Foot velocity is a central difference over +-2 samples (80 ms at 50 Hz): motion-capture
# velocities are always taken over a few samples, never from sample-to-sample jitter.
VELOCITY_HALF_SPAN = 2


@dataclass(frozen=True)
class LossWeights:
    """Weights of the five terms, chosen from their raw sizes so that no term dominates: in
    the default run every share stays between about 2 % and 70 %, the noise term the
    largest once training settles."""

    simple: float = 1.0
    vel: float = 1.0
    fk: float = 30.0  # raw term in m^2
    drift: float = 2.0
    slide: float = 0.25  # raw term in (m/s)^2


class GaitLoss(nn.Module):
    """simple + vel + fk + drift + slide, as weighted tensors on the device."""

    term_names = ("simple", "vel", "fk", "drift", "slide")

    def __init__(self, channel_names: tuple[str, ...] | list[str], mean: torch.Tensor,
                 std: torch.Tensor, sample_rate_hz: float,
                 weights: LossWeights | None = None) -> None:
        super().__init__()
        self.weights = weights or LossWeights()
        self.sample_rate_hz = sample_rate_hz
        names = list(channel_names)
        self.legs = [
            (names.index(f"hip_angle_{s}"), names.index(f"knee_angle_{s}"),
             names.index(f"grf_vz_{s}"))
            for s in ("r", "l")
        ]
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("std", std.detach().float().clone())

    def forward(self, eps_hat: torch.Tensor, eps: torch.Tensor, x0_hat: torch.Tensor,
                x0: torch.Tensor, alpha_bar: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Inputs ``[B, T, C]`` normalized; ``alpha_bar`` ``[B]`` of each sample's timestep."""
        w = alpha_bar.reshape(-1, 1, 1)
        raw = {
            "simple": (eps_hat - eps).pow(2).mean(),
            "vel": (w * (_diff(x0_hat) - _diff(x0)).pow(2)).mean(),
            "drift": (w * drift_error(x0_hat, x0)).mean(),
        }
        phys_hat = x0_hat * self.std + self.mean
        phys = x0 * self.std + self.mean
        fk, slide = [], []
        for hip, knee, grf in self.legs:
            foot_hat = foot_position(phys_hat[..., hip], phys_hat[..., knee])
            foot = foot_position(phys[..., hip], phys[..., knee])
            fk.append((w * (foot_hat - foot).pow(2)).mean())
            # Slide: in stance the foot is planted in the world, so its velocity relative to
            # the hip is minus the pelvis velocity, which the true window fixes. Any other
            # horizontal foot velocity of the prediction during stance is sliding.
            v_hat = _velocity(foot_hat[..., 0], self.sample_rate_hz)
            v = _velocity(foot[..., 0], self.sample_rate_hz)
            h = VELOCITY_HALF_SPAN
            stance = (phys[:, h:-h, grf] > STANCE_GRF_N).float()
            err = w[..., 0] * stance * (v_hat - v).pow(2)
            slide.append(err.sum() / stance.sum().clamp(min=1.0))
        raw["fk"] = torch.stack(fk).mean()
        raw["slide"] = torch.stack(slide).mean()
        terms = {name: getattr(self.weights, name) * raw[name]
                 for name in self.term_names}
        total = torch.stack(list(terms.values())).sum()
        return total, terms


def foot_position(hip_rad: torch.Tensor, knee_rad: torch.Tensor) -> torch.Tensor:
    """Ankle position relative to the hip ``[..., 2]`` (forward, up; metres).

    Hip flexion swings the thigh forward; knee flexion swings the shank back from the thigh.
    """
    shank = hip_rad - knee_rad
    x = THIGH_M * torch.sin(hip_rad) + SHANK_M * torch.sin(shank)
    z = -THIGH_M * torch.cos(hip_rad) - SHANK_M * torch.cos(shank)
    return torch.stack([x, z], dim=-1)


def drift_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Squared error of each channel's low-frequency part ``[B, 1, C]``: window mean and
    linear trend (least-squares slope, as the change over half the window)."""
    n = x.shape[1]
    tau = torch.linspace(-1.0, 1.0, n, device=x.device, dtype=x.dtype)[None, :, None]
    d = x_hat - x
    mean_err = d.mean(dim=1, keepdim=True)
    slope_err = (tau * d).sum(dim=1, keepdim=True) / tau.pow(2).sum()
    return mean_err.pow(2) + slope_err.pow(2)


def _velocity(x: torch.Tensor, sample_rate_hz: float) -> torch.Tensor:
    """Central-difference velocity along time (dim 1), per second; loses the edge samples."""
    h = VELOCITY_HALF_SPAN
    return (x[:, 2 * h:] - x[:, :-2 * h]) * (sample_rate_hz / (2 * h))


def _diff(x: torch.Tensor) -> torch.Tensor:
    """First difference along time (dim 1), per sample."""
    return x[:, 1:] - x[:, :-1]
