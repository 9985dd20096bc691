"""The gait-diffusion example: physical data, a loss that falls, failures that really happen.

Every figure is computed here with numpy from what the model itself produced (its step
losses, gradient norms and generated samples), never read back from the monitor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from examples.gait_diffusion import data as gd  # noqa: E402
from examples.gait_diffusion.losses import GaitLoss, foot_position  # noqa: E402
from examples.gait_diffusion.train import (  # noqa: E402
    INJECT_FROM_EPOCH,
    RunResult,
    TrainConfig,
    train,
)

SMALL = dict(pseudo_dataset_len=256, batch_size=32, val_samples=16)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared two-core machine more threads only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def sink(tmp_path: Path):
    """A real PULL socket that takes whatever a run sends, so close() never waits."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    endpoint = f"ipc://{tmp_path}/gait.sock"
    sock.bind(endpoint)
    yield endpoint, sock
    sock.close(linger=0)
    ctx.term()


def _received(sock: zmq.Socket, timeout_ms: int = 2000) -> int:
    n = 0
    while sock.poll(timeout_ms if n == 0 else 200):
        sock.recv_multipart()
        n += 1
    return n


def _run(endpoint: str, **kw: object) -> RunResult:
    opts = {**SMALL, **kw}
    return train(TrainConfig(endpoint=endpoint, run="gait-test", **opts))


def _physical(result: RunResult, samples: np.ndarray, channel: str) -> np.ndarray:
    i = result.channel_names.index(channel)
    return samples[..., i] * result.std[i] + result.mean[i]


# -- data ----------------------------------------------------------------------------------
def _trials(n: int = 6) -> list[tuple[gd.Subject, np.ndarray]]:
    rng = np.random.default_rng(11)
    out = []
    for _ in range(n):
        s = gd.draw_subject(rng)
        out.append((s, gd.simulate_trial(s, 1500, 50.0, rng)))
    return out


def test_knee_angle_is_a_walking_knee():
    for subject, trial in _trials():
        knee = np.rad2deg(trial[:, gd.CHANNELS.index("knee_angle_r")])
        assert 60.0 <= knee.max() - knee.min() <= 70.0
        # The cycle, sampled without noise: heel strike, loading response, extension, swing.
        phase = np.linspace(0.0, 1.0, 201)
        curve = gd.knee_curve_deg(subject, phase)
        assert 0.0 <= curve[0] <= 10.0
        loading = curve[(phase > 0.08) & (phase < 0.25)].max()
        assert 13.0 <= loading <= 23.0
        assert curve[(phase > 0.3) & (phase < 0.5)].min() <= 6.0
        peak = phase[np.argmax(curve)]
        assert 0.65 <= peak <= 0.8 and 60.0 <= curve.max() <= 71.0


def test_grf_is_a_double_hump_with_zero_swing():
    for subject, trial in _trials():
        grf = trial[:, gd.CHANNELS.index("grf_vz_r")]
        bw = subject.body_mass_kg * gd.GRAVITY_M_S2
        assert 0.35 <= np.mean(grf == 0.0) <= 0.45  # swing: ~40 % of the cycle, no force
        stance = np.flatnonzero(np.diff((grf > 0).astype(int)) == 1) + 1
        ends = np.flatnonzero(np.diff((grf > 0).astype(int)) == -1) + 1
        humps = 0
        for a in stance:
            later = ends[ends > a]
            if not len(later):
                break
            f = grf[a:later[0]] / bw
            n = len(f)
            first, second = f[: n // 3].max(), f[2 * n // 3:].max()
            mid = f[n // 3: 2 * n // 3].min()
            assert 1.0 <= first <= 1.25 and 1.0 <= second <= 1.25
            assert 0.65 <= mid <= 0.85
            humps += 1
        assert humps >= 20


def test_dataset_is_normalized_and_reproducible():
    cfg = gd.DataConfig(pseudo_dataset_len=512, num_train_trials=8, seed=3)
    a, b = gd.make_dataset(cfg), gd.make_dataset(cfg)
    assert a.windows.shape == (512, cfg.window_len, len(gd.CHANNELS))
    assert torch.equal(a.windows, b.windows)
    flat = a.windows.reshape(-1, len(gd.CHANNELS))
    assert torch.allclose(flat.mean(0), torch.zeros(8), atol=1e-4)
    assert torch.allclose(flat.std(0), torch.ones(8), atol=1e-3)
    knee = a.denormalize(a.windows)[..., gd.CHANNELS.index("knee_angle_r")]
    assert 0.3 <= float(knee.std()) <= 0.52  # the guide's normal walking: 0.35-0.52 rad


# -- losses --------------------------------------------------------------------------------
def test_loss_terms_add_up_and_vanish_for_a_perfect_prediction():
    data = gd.make_dataset(gd.DataConfig(pseudo_dataset_len=32))
    fn = GaitLoss(data.channel_names, data.mean, data.std, data.sample_rate_hz)
    x0 = data.windows[:8]
    eps = torch.randn_like(x0)
    abar = torch.linspace(0.1, 0.99, 8)
    total, terms = fn(eps, eps, x0, x0, abar)
    assert set(terms) == {"simple", "vel", "fk", "drift", "slide"}
    assert float(total) == 0.0
    off = x0 + 0.3 * torch.randn_like(x0)
    total, terms = fn(eps + 0.1, eps, off, x0, abar)
    assert all(float(v) > 0 for v in terms.values())
    assert torch.isclose(total, torch.stack(list(terms.values())).sum())


def test_foot_position_of_a_straight_and_a_bent_leg():
    straight = foot_position(torch.tensor(0.0), torch.tensor(0.0))
    assert torch.allclose(straight, torch.tensor([0.0, -0.87]))
    # Thigh forward 90 deg, knee bent 90 deg: foot in front of the hip, one shank below.
    bent = foot_position(torch.tensor(np.pi / 2), torch.tensor(np.pi / 2))
    assert torch.allclose(bent, torch.tensor([0.44, -0.43]), atol=1e-6)


# -- training ------------------------------------------------------------------------------
def test_training_loss_falls_and_samples_are_healthy(sink):
    endpoint, sock = sink
    # 128 small steps: enough for samples that look like the data, not like noise.
    r = _run(endpoint, epochs=8, batch_size=16, learning_rate=2e-3, validate_every=8)
    assert np.isfinite(r.step_loss).all()
    assert r.epoch_loss[-1] < 0.25 * r.epoch_loss[0]
    assert (r.grad_norm < 100).all()
    samples = r.validation[8]
    # Healthy per the guide (lower bounds), and near the data's own spread (upper bounds:
    # pure noise would give ~4, ~1.5 rad, ~1400 N).
    assert 0.5 < samples.std() < 1.5
    assert 0.1 < _physical(r, samples, "knee_angle_r").std() < 0.6
    assert 10.0 < _physical(r, samples, "grf_vz_r").std() < 600.0
    assert r.client_stats["dropped"] == 0
    assert _received(sock) == r.client_stats["sent"] > 8 * 16


def test_inject_exploding_gradients(sink):
    r = _run(sink[0], inject="exploding", epochs=INJECT_FROM_EPOCH, validate_every=99)
    before = r.step_epoch < INJECT_FROM_EPOCH
    assert np.nanmax(r.grad_norm[before]) < 20.0
    after = r.grad_norm[~before]
    assert np.isnan(after).any() or np.nanmax(after) > 100.0


def test_inject_collapse(sink):
    r = _run(sink[0], inject="collapse", epochs=3, validate_every=3)
    samples = r.validation[3]
    assert samples.std() < 0.1
    assert _physical(r, samples, "knee_angle_r").std() < 0.05
    assert _physical(r, samples, "grf_vz_r").std() < 1.0


def test_inject_stall(sink):
    r = _run(sink[0], inject="stall", epochs=INJECT_FROM_EPOCH + 10, pseudo_dataset_len=128,
             validate_every=99)
    assert r.epoch_loss[1] < r.epoch_loss[0]  # it learned before the stall
    stalled = r.epoch_loss[INJECT_FROM_EPOCH - 1:]
    assert len(stalled) == 11
    assert (np.diff(stalled) >= 0).all()  # ten epochs in a row without a decrease


@pytest.mark.timeout(120)
def test_two_ranks_under_torchrun(sink, tmp_path: Path):
    endpoint, sock = sink
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRAINWATCH_") and k not in ("RANK", "WORLD_SIZE")}
    script = ROOT / "examples" / "gait_diffusion" / "train.py"
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
         "--epochs", "2", "--pseudo-dataset-len", "128", "--validate-every", "2",
         "--endpoint", endpoint],
        capture_output=True, text=True, timeout=110, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 epochs x 2 rank(s)" in out.stdout
    assert "'dropped': 0" in out.stdout
    assert _received(sock) > 2 * 2 * 2  # both ranks' steps and epochs arrived
