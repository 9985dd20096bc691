"""Synthetic human-gait windows: the training data of the gait-diffusion example.

Each simulated trial is one subject walking: sagittal hip, knee and ankle angles (radians)
and the vertical ground reaction force (newtons) of both legs, the left leg half a gait
cycle behind the right. Subjects differ in body mass, cadence, ranges of motion, the shape
of the curves and noise, and strides vary within a trial, so the windows form a
distribution a generator has to cover rather than one curve.

    data = make_dataset(DataConfig(pseudo_dataset_len=2048, window_len=64))
    data.windows.shape      # (2048, 64, 8), normalized per channel
    data.denormalize(x)     # back to radians / newtons
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

CHANNELS = (
    "hip_angle_r",
    "knee_angle_r",
    "ankle_angle_r",
    "grf_vz_r",
    "hip_angle_l",
    "knee_angle_l",
    "ankle_angle_l",
    "grf_vz_l",
)
GRAVITY_M_S2 = 9.81
# Force plates report nothing below a detection threshold; below it the foot is in swing.
GRF_THRESHOLD_N = 20.0

# Reference curves over one gait cycle (0 = right heel strike), as (cycle fraction, degrees):
# normal walking after Perry & Burnfield, Gait Analysis (2010).
_KNEE_KEYS = ((0.0, 5.0), (0.15, 18.0), (0.40, 3.0), (0.60, 38.0), (0.73, 63.0), (0.90, 22.0))
_HIP_KEYS = ((0.0, 30.0), (0.12, 27.0), (0.30, 8.0), (0.52, -10.0), (0.62, -4.0), (0.76, 20.0),
             (0.88, 33.0))
_ANKLE_KEYS = ((0.0, 0.0), (0.08, -7.0), (0.30, 7.0), (0.46, 12.0), (0.63, -18.0), (0.76, -4.0),
               (0.90, 1.0))


@dataclass(frozen=True)
class DataConfig:
    """Size of the pseudo dataset and of the simulation behind it."""

    pseudo_dataset_len: int = 2048  # windows drawn (with replacement) from the trials
    window_len: int = 64  # samples per window
    num_train_trials: int = 16  # simulated subjects, one trial each
    trial_duration_s: float = 30.0
    sample_rate_hz: float = 50.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.pseudo_dataset_len < 1 or self.num_train_trials < 1:
            raise ValueError("pseudo_dataset_len and num_train_trials must be positive")
        if not 8 <= self.window_len <= int(self.trial_duration_s * self.sample_rate_hz):
            raise ValueError(f"window_len {self.window_len} must fit in one trial")


@dataclass(frozen=True)
class Subject:
    """Per-subject parameters of one simulated trial."""

    body_mass_kg: float
    stride_s: float
    knee_rom_deg: float
    knee_min_deg: float
    knee_loading_deg: float
    hip_rom_deg: float
    hip_offset_deg: float
    ankle_scale: float
    stance_fraction: float
    grf_peaks_bw: tuple[float, float]
    grf_valley_bw: float
    left_lag: float  # left leg's phase lag, in cycles (about one half)
    phase0: float
    angle_noise_deg: float
    grf_noise_n: float


@dataclass
class GaitDataset:
    """Normalized windows ``[N, window_len, C]`` and the constants that undo the normalisation."""

    windows: torch.Tensor  # float32, normalized per channel
    mean: torch.Tensor  # float32 [C], physical units
    std: torch.Tensor  # float32 [C]
    channel_names: tuple[str, ...]
    sample_rate_hz: float

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std.to(x) + self.mean.to(x)


def draw_subject(rng: np.random.Generator) -> Subject:
    """One walker: healthy adult ranges, wide enough that the windows form a distribution."""
    return Subject(
        body_mass_kg=float(rng.uniform(55.0, 95.0)),
        stride_s=float(rng.uniform(0.95, 1.25)),
        knee_rom_deg=float(rng.uniform(61.5, 66.0)),
        knee_min_deg=float(rng.uniform(1.0, 4.0)),
        knee_loading_deg=float(rng.uniform(16.0, 21.0)),
        hip_rom_deg=float(rng.uniform(36.0, 48.0)),
        hip_offset_deg=float(rng.uniform(-4.0, 4.0)),
        ankle_scale=float(rng.uniform(0.8, 1.2)),
        stance_fraction=float(rng.uniform(0.58, 0.63)),
        grf_peaks_bw=(float(rng.uniform(1.05, 1.2)), float(rng.uniform(1.03, 1.15))),
        grf_valley_bw=float(rng.uniform(0.7, 0.8)),
        left_lag=float(rng.uniform(0.48, 0.52)),
        phase0=float(rng.uniform(0.0, 1.0)),
        angle_noise_deg=float(rng.uniform(0.2, 0.5)),
        grf_noise_n=float(rng.uniform(4.0, 10.0)),
    )


def periodic_pchip(keys: tuple[tuple[float, float], ...], phase: np.ndarray) -> np.ndarray:
    """Shape-preserving cubic through ``keys`` (cycle fraction, value), periodic over one cycle.

    Fritsch-Carlson tangents: extrema sit exactly at the key points, no overshoot.
    """
    x = np.array([k[0] for k in keys], dtype=np.float64)
    y = np.array([k[1] for k in keys], dtype=np.float64)
    # Wrap one key on each side so every interval, and every tangent, sees its neighbours.
    xw = np.concatenate([[x[-1] - 1.0], x, [x[0] + 1.0, x[1] + 1.0]])
    yw = np.concatenate([[y[-1]], y, [y[0], y[1]]])
    h = np.diff(xw)
    delta = np.diff(yw) / h
    m = np.zeros_like(yw)
    for i in range(1, len(xw) - 1):
        if delta[i - 1] * delta[i] > 0:
            w1, w2 = 2 * h[i] + h[i - 1], h[i] + 2 * h[i - 1]
            m[i] = (w1 + w2) / (w1 / delta[i - 1] + w2 / delta[i])
    p = np.mod(phase, 1.0)
    idx = np.clip(np.searchsorted(xw, p, side="right") - 1, 1, len(xw) - 3)
    t = (p - xw[idx]) / h[idx]
    h00, h10 = 2 * t**3 - 3 * t**2 + 1, t**3 - 2 * t**2 + t
    h01, h11 = -2 * t**3 + 3 * t**2, t**3 - t**2
    return h00 * yw[idx] + h10 * h[idx] * m[idx] + h01 * yw[idx + 1] + h11 * h[idx] * m[idx + 1]


def knee_curve_deg(subject: Subject, phase: np.ndarray) -> np.ndarray:
    """Knee flexion: small flexion at heel strike, loading-response bump, near extension in
    mid-stance, peak in swing; scaled to the subject's range of motion exactly."""
    keys = tuple((p, subject.knee_loading_deg if p == 0.15 else v) for p, v in _KNEE_KEYS)
    grid = np.linspace(0.0, 1.0, 1001)
    ref = periodic_pchip(keys, grid)
    lo, hi = ref.min(), ref.max()
    return subject.knee_min_deg + subject.knee_rom_deg * (periodic_pchip(keys, phase) - lo) / (
        hi - lo
    )


def grf_curve_n(subject: Subject, phase: np.ndarray) -> np.ndarray:
    """Vertical GRF: double hump in stance (peaks ~1.1 BW, valley ~0.75 BW), zero in swing."""
    s = subject.stance_fraction
    p1, p2 = subject.grf_peaks_bw
    keys = (
        (0.0, 0.0), (0.05 * s, 0.45), (0.23 * s, p1), (0.5 * s, subject.grf_valley_bw),
        (0.77 * s, p2), (0.95 * s, 0.40), (s, 0.0), (s + 0.5 * (1 - s), 0.0),
    )
    bw = subject.body_mass_kg * GRAVITY_M_S2
    force = np.clip(periodic_pchip(keys, phase), 0.0, None) * bw
    force[np.mod(phase, 1.0) >= s] = 0.0
    return force


def simulate_trial(subject: Subject, n_samples: int, sample_rate_hz: float,
                   rng: np.random.Generator) -> np.ndarray:
    """One trial ``[n_samples, len(CHANNELS)]`` in physical units (radians, newtons)."""
    dt = 1.0 / sample_rate_hz
    # Stride-to-stride variability: the cadence wanders by ~2 % around the subject's own.
    wander = np.cumsum(rng.normal(0.0, 1.0, n_samples)) * np.sqrt(dt)
    wander = 0.02 * (wander - wander.mean()) / max(wander.std(), 1e-9)
    phase = subject.phase0 + np.cumsum((1.0 + wander) * dt / subject.stride_s)

    out = np.empty((n_samples, len(CHANNELS)), dtype=np.float64)
    for side, lag in (("r", 0.0), ("l", subject.left_lag)):
        ph = phase - lag
        # Hip: the reference's -10..33 deg range, stretched to the subject's range of motion.
        hip = subject.hip_offset_deg - 10.0 + (periodic_pchip(_HIP_KEYS, ph) + 10.0) * (
            subject.hip_rom_deg / 43.0)
        ankle = periodic_pchip(_ANKLE_KEYS, ph) * subject.ankle_scale
        knee = knee_curve_deg(subject, ph)
        noise = rng.normal(0.0, subject.angle_noise_deg, (3, n_samples))
        grf = grf_curve_n(subject, ph)
        grf = grf + rng.normal(0.0, subject.grf_noise_n, n_samples) * (grf > 0)
        grf[grf < GRF_THRESHOLD_N] = 0.0
        for name, value in (("hip_angle", np.deg2rad(hip + noise[0])),
                            ("knee_angle", np.deg2rad(knee + noise[1])),
                            ("ankle_angle", np.deg2rad(ankle + noise[2])),
                            ("grf_vz", grf)):
            out[:, CHANNELS.index(f"{name}_{side}")] = value
    return out


def make_dataset(config: DataConfig) -> GaitDataset:
    """Simulates the trials and draws the pseudo dataset; the same config gives the same data."""
    rng = np.random.default_rng(config.seed)
    n = int(config.trial_duration_s * config.sample_rate_hz)
    trials = [simulate_trial(draw_subject(rng), n, config.sample_rate_hz, rng)
              for _ in range(config.num_train_trials)]
    which = rng.integers(0, config.num_train_trials, config.pseudo_dataset_len)
    start = rng.integers(0, n - config.window_len + 1, config.pseudo_dataset_len)
    pairs = zip(which, start, strict=True)
    windows = np.stack([trials[i][s:s + config.window_len] for i, s in pairs])
    mean = windows.mean(axis=(0, 1))
    std = windows.std(axis=(0, 1))
    normalized = (windows - mean) / std
    return GaitDataset(
        windows=torch.from_numpy(normalized).float(),
        mean=torch.from_numpy(mean).float(),
        std=torch.from_numpy(std).float(),
        channel_names=CHANNELS,
        sample_rate_hz=config.sample_rate_hz,
    )
