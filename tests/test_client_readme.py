"""The README's training loop, pasted into a fresh script, gives the gradient figures one
computes oneself; the loop it used to show (zero_grad before log_step) is said on the
console instead of silently dropping or zeroing them.

The README block runs as written, in its own process, against a real collector process.
Around it, the script's own code (the names the block expects) records the gradients
independently: per-parameter norms as backward finishes each one (before clipping), and
again when the optimizer steps (after clipping, as log_step finds them).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from client_support import kill_leftovers
from conftest import ROOT, CollectorProc, env

from collector.recording.format import MESSAGE
from collector.recording.reader import read_records
from trainer_client import TrainerClient, wire

PREAMBLE = '''
import argparse, json, sys
import torch
from torch import nn

torch.manual_seed(0)
args = argparse.Namespace(epochs=2, lr=0.05)
channel_names = ["a", "b", "c"]
train_x = torch.randn(64, 10, 3)
mu, sd = [0.1, 0.2, 0.3], [1.0, 2.0, 3.0]
model = nn.Sequential(nn.Linear(3, 32), nn.Tanh(), nn.Linear(32, 3))


class EMA(torch.optim.swa_utils.AveragedModel):
    def sample(self, n):
        return self.module(torch.randn(n, 10, 3))


ema_model = EMA(model).requires_grad_(False)
opt = torch.optim.SGD(model.parameters(), lr=args.lr)
loader = [train_x[i:i + 16] for i in range(0, 64, 16)]


def compute_loss(model, batch):
    out = model(batch)
    simple = (out - batch.flip(-1)).pow(2).mean()
    vel = (out[:, 1:] - out[:, :-1]).abs().mean()
    return simple + 0.1 * vel, {"simple": simple.detach(), "vel": vel.detach()}


# One's own record of the gradients, independent of trainwatch.
own = {"pre_clip": [], "at_step": []}
params = list(model.parameters())
current = {}


def grad_done(p):
    current[id(p)] = float(p.grad.double().norm())
    if len(current) == len(params):
        own["pre_clip"].append([current[id(q)] for q in params])
        current.clear()


for p in params:
    p.register_post_accumulate_grad_hook(grad_done)
opt.register_step_pre_hook(
    lambda o, a, k: own["at_step"].append([float(p.grad.double().norm()) for p in params]))
'''

EPILOGUE = '''
json.dump(own, open(sys.argv[1], "w"))
'''


@pytest.fixture
def started():
    procs: list = []
    yield procs
    kill_leftovers(procs)


def _readme_loop() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Adding it to a training script"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_loop_gives_the_gradient_figures_one_computes(tmp_path, started):
    block = _readme_loop()
    assert block.index("tw.log_step(") < block.index("opt.zero_grad()")  # the order taught
    script = tmp_path / "train.py"
    script.write_text(PREAMBLE + block + EPILOGUE)
    ep = f"ipc://{tmp_path}/c.sock"
    col = CollectorProc(tmp_path, ep, "--once", "--quiet", "1").start()
    started.append(col)
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "own.json")],
                       env={**env(), "TRAINWATCH_ENDPOINT": ep}, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainwatch" not in r.stderr  # no warning of any kind
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    own = json.loads((tmp_path / "own.json").read_text())
    pre, at_step = np.array(own["pre_clip"]), np.array(own["at_step"])
    assert pre.shape == at_step.shape == (8, 4)  # 2 epochs x 4 batches, 4 parameters
    assert (at_step < pre - 1e-9).any()  # clipping really changed some gradients
    # train/grad_norm_*: the global norm before clipping, per epoch
    total = np.sqrt((pre ** 2).sum(axis=1))
    epochs = [rec for rec in col.records() if rec["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e, norms in zip(epochs, (total[:4], total[4:]), strict=True):
        m = e["metrics"]
        assert m["train/grad_norm_mean"] == pytest.approx(norms.mean(), rel=1e-5)
        assert m["train/grad_norm_std"] == pytest.approx(norms.std(), rel=1e-4, abs=1e-7)
        assert m["train/grad_norm_max"] == pytest.approx(norms.max(), rel=1e-5)
        assert m["train/grad_norm_min"] == pytest.approx(norms.min(), rel=1e-5)
        assert not any(k.startswith("health/vanishing") and v for k, v in m.items())
    # the per-parameter norms each step carried: the gradients as the optimizer used them
    steps = [wire.decode(f) for t, f in read_records(col.record) if t == MESSAGE]
    steps = [m for m in steps if m.kind == wire.KIND_STEP]
    shipped = np.array([np.frombuffer(bytes(m.tensors["param_norms"].data), np.float32)
                        for m in steps])
    np.testing.assert_allclose(shipped, at_step, rtol=1e-5)


def _model_and_grads() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_the_old_loop_order_is_said_once(tmp_path, caplog, set_to_none):
    model, opt = _model_and_grads()
    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/none.sock", run="order", rank=0,
                       world_size=1)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        for _ in range(4):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
            tw.log_step(loss, model=model, grad_norm=norm)  # too late: gradients are gone
        tw.close(timeout=2.0)  # the sender has read (or dropped) every step by now
    said = [r.getMessage() for r in caplog.records if "found every gradient" in r.getMessage()]
    assert len(said) == 1
    assert ("None" if set_to_none else "zero") in said[0]
    assert "before opt.zero_grad()" in said[0]


def test_the_right_order_says_nothing(tmp_path, caplog):
    model, opt = _model_and_grads()
    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/none.sock", run="order", rank=0,
                       world_size=1)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        for _ in range(4):
            loss = model(torch.randn(8, 4)).pow(2).mean()
            loss.backward()
            tw.log_step(loss, model=model)
            opt.step()
            opt.zero_grad()
        tw.close(timeout=2.0)
    assert not [r for r in caplog.records
                if r.levelno >= logging.WARNING and "gradient" in r.getMessage()]
