"""The Lightning callback end to end: real Lightning fits on the CPU -> a real collector
process -> JSONL and recording, checked against what the test's own module recorded
while it trained (losses, pre-clip gradient norms, rates, weights, EMA, samples)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import lightning as L
import numpy as np
import pytest
import torch
import zmq
from conftest import ROOT, CollectorProc, env, rank_list
from support.wandb_readback import find_offline_runs, read_offline_run
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from workers.integration_util import (
    READS,
    hook_names,
    messages,
    run_example,
    scope_ops,
    short_tmp,
    tensor,
)

from trainer_client import TrainerClient, reductions, wire
from trainer_client.integrations._common import make_client
from trainer_client.integrations.lightning import TrainwatchCallback

EPOCHS = 3
CLIP = 0.05  # far below every gradient norm here: the trainer clips at every step
REL = 1e-5


class Recorder(L.LightningModule):
    """A tiny regressor that writes down what it trains on, the way the callback must see it."""

    def __init__(self, hidden: int = 16, lr: float = 0.3, dict_output: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.8))
        self.ema.requires_grad_(False)
        self.gen = torch.Generator().manual_seed(7)
        self.micro: list[list[float]] = []  # [loss, mse, l1] per batch
        self.steps: list[dict] = []  # per optimizer step: micro-batch count, norms, rate
        self.epochs: list[dict] = []
        self.samples: dict[int, np.ndarray] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        mse = nn.functional.mse_loss(out, y)
        l1 = (out - y).abs().mean()
        loss = mse + 0.5 * l1
        self.micro.append([float(v.detach()) for v in (loss, mse, l1)])
        return {"loss": loss, "mse": mse, "l1": l1} if self.hparams.dict_output else loss

    def on_before_optimizer_step(self, optimizer):
        # Runs right after the callbacks' hook, before Lightning clips.
        pn = [float(p.grad.norm()) for p in self.net.parameters()]
        self.steps.append({"micro": len(self.micro), "pn": pn,
                           "gn": float(np.linalg.norm(pn)),
                           "lr": optimizer.param_groups[0]["lr"]})

    def on_train_batch_end(self, outputs, batch, batch_idx):
        self.ema.update_parameters(self.net)

    def on_train_epoch_end(self):
        w = torch.cat([p.detach().flatten() for p in self.net.parameters()]).double()
        e = torch.cat([p.detach().flatten() for p in self.ema.module.parameters()]).double()
        self.epochs.append({"steps": len(self.steps), "weight_mean": float(w.abs().mean()),
                            "weight_std": float(w.std(correction=0)),
                            "weight_max": float(w.abs().max()),
                            "ema_diff": float((e - w).abs().mean())})

    def sample(self):
        s = torch.randn(5, 12, 3, generator=self.gen)
        self.samples[self.current_epoch + 1] = s.numpy().copy()
        return s

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.net.parameters(), lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.tanh(x[:, :3] * 2.0) + 0.1 * torch.randn(n, 3, generator=g)
    return x, y


def _trainer(callbacks: list, epochs: int = EPOCHS, **kw) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, **kw)


def _loader(x, y, batch=8):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _steps(module: Recorder) -> list[dict]:
    """Each optimizer step's expected loss and terms: the mean of its micro-batches."""
    out, start = [], 0
    for s in module.steps:
        micro = np.array(module.micro[start:s["micro"]])
        start = s["micro"]
        out.append({**s, "loss": micro[:, 0].mean(), "mse": micro[:, 1].mean(),
                    "l1": micro[:, 2].mean()})
    return out


def _epoch_steps(module: Recorder) -> list[list[dict]]:
    steps, out, start = _steps(module), [], 0
    for e in module.epochs:
        out.append(steps[start:e["steps"]])
        start = e["steps"]
    return out


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lightning")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1").start()
    x, y = _data(64)
    module = Recorder()
    cb = TrainwatchCallback(endpoint=col.endpoint, data=y, channel_names=["a", "b", "c"],
                            samples="sample", samples_every=2, ema="ema")
    _trainer([cb], gradient_clip_val=CLIP).fit(module, _loader(x, y))
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    return col, module, y


def test_config_holds_the_hparams_and_the_trainers_settings(fit):
    col, module, _ = fit
    recs = col.records()
    runs = [r for r in recs if r["type"] == "run"]
    assert len(runs) == 1 and runs[0]["metrics"]["world_size"] == 1
    assert runs[0]["run"].startswith("lightning-")
    cfg = next(r for r in recs if r["type"] == "config")["metrics"]
    assert cfg["hidden"] == 16 and cfg["lr"] == 0.3 and cfg["dict_output"] is True
    assert cfg["max_epochs"] == cfg["epochs"] == EPOCHS and cfg["precision"] == "32-true"
    assert cfg["accumulate_grad_batches"] == 1 and cfg["gradient_clip_val"] == CLIP
    assert cfg["world_size"] == 1 and cfg["batch_size"] == 8
    assert cfg["learning_rate"] == 0.3 and cfg["optimizer"] == "SGD"
    # the model proper, not its EMA copy
    assert cfg["num_params"] == sum(p.numel() for p in module.net.parameters()) == 163


def test_data_stats_of_the_given_tensor(fit):
    col, _, y = fit
    ds = next(r for r in col.records() if r["type"] == "data_stats")["metrics"]
    assert ds["data_stats/normalized_mean"] == pytest.approx(float(y.mean()), rel=REL)
    assert ds["data_stats/normalized_std"] == pytest.approx(float(y.std(correction=0)), rel=REL)
    assert ds["data_stats/b_mean"] == pytest.approx(float(y[:, 1].mean()), rel=REL)


def test_every_epoch_matches_what_the_module_trained_on(fit):
    col, module, _ = fit
    epochs = [r for r in col.records() if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    assert all(len(s) == 8 for s in _epoch_steps(module))  # 64 rows / 8 per batch
    for rec, steps, w in zip(epochs, _epoch_steps(module), module.epochs, strict=True):
        m = rec["metrics"]
        loss = np.array([s["loss"] for s in steps])
        gn = np.array([s["gn"] for s in steps])
        assert m["train/batch_loss_mean"] == pytest.approx(loss.mean(), rel=REL)
        assert m["train/batch_loss_std"] == pytest.approx(loss.std(), rel=1e-4)
        assert m["train/batch_loss_max"] == pytest.approx(loss.max(), rel=REL)
        assert m["train/batch_loss_min"] == pytest.approx(loss.min(), rel=REL)
        # before clipping: every norm is far above the clip value
        assert gn.min() > 5 * CLIP
        assert m["train/grad_norm_mean"] == pytest.approx(gn.mean(), rel=REL)
        assert m["train/grad_norm_max"] == pytest.approx(gn.max(), rel=REL)
        assert m["train/grad_norm_min"] == pytest.approx(gn.min(), rel=REL)
        mse, l1 = np.mean([s["mse"] for s in steps]), np.mean([s["l1"] for s in steps])
        assert m["loss_ratio/mse"] == pytest.approx(mse / (mse + l1), rel=REL)
        assert m["train/lr"] == pytest.approx(steps[-1]["lr"], rel=1e-12)
        assert m["train/lr_max"] == pytest.approx(max(s["lr"] for s in steps), rel=1e-12)
        for key in ("weight_mean", "weight_std", "weight_max"):
            assert m[f"model/{key}"] == pytest.approx(w[key], rel=REL)
        assert m["model/ema_diff"] == pytest.approx(w["ema_diff"], rel=1e-4)
    lrs = [s["lr"] for s in _steps(module)]
    assert lrs[0] == 0.3 and lrs[-1] < 0.3 / 8  # the scheduler really moved the rate


def test_samples_every_second_epoch_and_the_last(fit):
    col, module, _ = fit
    epochs = {e["epoch"]: e["metrics"] for e in col.records() if e["type"] == "epoch"}
    assert sorted(module.samples) == [2, 3]
    assert "validation/gen_std" not in epochs[1]
    for epoch, s in module.samples.items():
        m = epochs[epoch]
        assert m["validation/gen_std"] == pytest.approx(float(s.std()), rel=REL)
        assert m["validation/gen_mean"] == pytest.approx(float(s.mean()), rel=1e-4)
        assert m["validation/gen_range"] == pytest.approx(float(s.max() - s.min()), rel=REL)


def test_per_parameter_norms_are_taken_before_clipping(fit):
    col, module, _ = fit
    msgs = messages(col.record)
    steps = [m for m in msgs if m.kind == wire.KIND_STEP]
    names = next(m for m in msgs if m.kind == wire.KIND_EPOCH).body["param_names"]
    assert names == [n for n, _ in module.net.named_parameters(prefix="net")]
    assert len(steps) == len(module.steps)
    for msg, want in zip(steps, module.steps, strict=True):
        np.testing.assert_allclose(tensor(msg, "param_norms"), want["pn"], rtol=REL)


# -- gradient accumulation, a tensor output, a second fit in the same process ---------

@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("accumulate")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1").start()
    x, y = _data(56, seed=1)  # 7 batches: 3 steps of 2 micro-batches, then 1 of one
    module = Recorder(dict_output=False)
    cb = TrainwatchCallback(endpoint=col.endpoint, data="train_targets",
                            channel_names=["a", "b", "c"])
    _trainer([cb], epochs=2, accumulate_grad_batches=2).fit(module, datamodule=Data(x, y))
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    return col, module, y


class Data(L.LightningDataModule):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x, self.train_targets = x, y

    def train_dataloader(self):
        return _loader(self.x, self.train_targets)


def test_accumulated_micro_batches_make_one_step(accumulated, fit):
    col, module, y = accumulated
    recs = col.records()
    ds = next(r for r in recs if r["type"] == "data_stats")["metrics"]  # from the datamodule
    assert ds["data_stats/c_std"] == pytest.approx(float(y[:, 2].std(correction=0)), rel=REL)
    assert [s["micro"] for s in module.steps[:4]] == [2, 4, 6, 7]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert len(epochs) == 2
    for rec, steps in zip(epochs, _epoch_steps(module), strict=True):
        loss = np.array([s["loss"] for s in steps])
        assert len(loss) == 4
        m = rec["metrics"]
        assert m["train/batch_loss_mean"] == pytest.approx(loss.mean(), rel=REL)
        assert m["train/batch_loss_min"] == pytest.approx(loss.min(), rel=REL)
        assert m["train/batch_loss_max"] == pytest.approx(loss.max(), rel=REL)
        assert not any(k.startswith("loss_ratio/") for k in m)  # a tensor output: no terms
    run = next(r for r in recs if r["type"] == "run")["run"]
    first = next(r for r in fit[0].records() if r["type"] == "run")["run"]
    assert run != first and run.startswith("lightning-")  # two fits, two runs


def test_one_callback_fitting_twice_sends_two_runs(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--quiet", "1").start()
    cb = TrainwatchCallback(endpoint=col.endpoint)
    x, y = _data(16)
    for _ in range(2):
        _trainer([cb], epochs=1).fit(Recorder(), _loader(x, y))
    col.stop()
    runs = [r["run"] for r in col.records() if r["type"] == "run"]
    assert len(runs) == 2 and runs[1] == runs[0] + "-fit2"
    assert len([r for r in col.records() if r["type"] == "epoch"]) == 2


def test_bad_configuration_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="channel_names"):
        TrainwatchCallback(data=torch.zeros(4, 3))
    with pytest.raises(TypeError, match="method name"):
        TrainwatchCallback(samples=3)
    with pytest.raises(ValueError, match="single-process"):
        make_client(None, "r", 0, 2, tmp_path)
    x, y = _data(16)
    for kw, msg in (({"samples": "no_such_method"}, "has no such method"),
                    ({"ema": "net"}, "not an EMA copy"), ({"ema": "hparams"}, "not an nn.Module"),
                    ({"data": "train_targets"}, "no datamodule")):
        cb = TrainwatchCallback(endpoint=f"ipc://{tmp_path}/none.sock",
                                channel_names=["a", "b", "c"], **kw)
        with pytest.raises(ValueError, match=msg):
            _trainer([cb], epochs=1).fit(Recorder(), _loader(x, y))


# -- no host sync ------------------------------------------------------------------------

class ReadsTheLoss(TrainwatchCallback):
    """What the check must catch: a callback that reads the loss on the host."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        outputs["loss"].item()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def test_the_callback_reads_no_tensor_value_on_the_training_thread(tmp_path):
    x, y = _data(32)
    hooks = hook_names(TrainwatchCallback)
    good = TrainwatchCallback(endpoint=f"ipc://{tmp_path}/none.sock", data=y,
                              channel_names=["a", "b", "c"], samples="sample", ema="ema")
    bad = ReadsTheLoss(endpoint=f"ipc://{tmp_path}/none2.sock")
    ops, bad_ops = scope_ops(good, hooks), scope_ops(bad, hooks)
    _trainer([good, bad], epochs=2, gradient_clip_val=CLIP).fit(Recorder(), _loader(x, y))
    assert {"on_before_optimizer_step", "on_train_batch_end", "on_train_epoch_end"} <= set(hooks)
    assert any(op.startswith("aten._foreach_norm") for op in ops)  # it saw the reductions
    assert not READS & set(ops), sorted(READS & set(ops))
    assert READS & set(bad_ops)  # the same check sees a .item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda(tmp_path):
    x, y = _data(32)
    cb = TrainwatchCallback(endpoint=f"ipc://{tmp_path}/none.sock", ema="ema")
    for name in hook_names(TrainwatchCallback):
        fn = getattr(cb, name)

        def strict(*a, _fn=fn, **k):
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return _fn(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        setattr(cb, name, strict)
    L.Trainer(max_epochs=1, accelerator="gpu", devices=1, callbacks=[cb], logger=False,
              enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(Recorder(), _loader(x, y))


# -- 2-rank DDP --------------------------------------------------------------------------

def test_two_rank_ddp_is_one_run(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "1").start()
    worker = ROOT / "tests" / "workers" / "lightning_ddp.py"
    r = subprocess.run([sys.executable, str(worker), "--endpoint", col.endpoint,
                        "--out", str(tmp_path)], env=env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["run"] == ranks[1]["run"] and ranks[0]["run"].startswith("lightning-")
    recs = col.records()
    runs = [x for x in recs if x["type"] == "run"]
    assert len(runs) == 1 and runs[0]["metrics"]["world_size"] == 2
    assert runs[0]["run"] == ranks[0]["run"]
    epochs = [x for x in recs if x["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    for e, epoch in zip(epochs, (1, 2), strict=True):
        assert rank_list(e["ranks"]) == [0, 1] and rank_list(e["missing"]) == []
        m = e["metrics"]
        loss = np.concatenate([rk["loss"][str(epoch)] for rk in ranks])  # both ranks pooled
        assert len(loss) == 2 * 4
        assert m["train/batch_loss_mean"] == pytest.approx(loss.mean(), rel=REL)
        assert m["train/batch_loss_max"] == pytest.approx(loss.max(), rel=REL)
        gn = np.array(ranks[0]["grad_norm"][str(epoch)])  # all-reduced: the same on both
        np.testing.assert_allclose(ranks[1]["grad_norm"][str(epoch)], gn, rtol=1e-5)
        assert m["train/grad_norm_mean"] == pytest.approx(gn.mean(), rel=REL)
        assert m.get("health/rank_desync", 0) == 0


# -- the client's grad_norms= -------------------------------------------------------------

def test_log_step_ships_precomputed_grad_norms(tmp_path):
    """Norms taken before zero_grad travel with a later log_step, and name the epoch's."""
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    ep = f"ipc://{tmp_path}/pull.sock"
    pull.bind(ep)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    model(torch.randn(16, 4)).pow(2).mean().backward()
    pn = reductions.grad_norms(reductions.named_params(model))
    want = [float(p.grad.norm()) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    tw = TrainerClient(endpoint=ep, run="pn", rank=0, world_size=1)
    tw.log_step(torch.tensor(0.5), grad_norms=pn)
    tw.log_step(torch.tensor(0.25), model=model, grad_norms=pn)  # grad_norms wins
    tw.log_epoch(1, model=model)
    tw.close(timeout=5.0)
    got = []
    while pull.poll(2000):
        got.append(wire.decode(pull.recv_multipart()))
    pull.close(0)
    ctx.term()
    steps = [m for m in got if m.kind == wire.KIND_STEP]
    assert [m.body[0] for m in steps] == [0.5, 0.25]
    for m in steps:
        np.testing.assert_allclose(tensor(m, "param_norms"), want, rtol=1e-6)
        assert m.body[1] == pytest.approx(float(np.linalg.norm(want)), rel=1e-6)
    epoch = next(m for m in got if m.kind == wire.KIND_EPOCH)
    assert epoch.body["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


# -- the README --------------------------------------------------------------------------

def test_the_readme_example_runs_as_written():
    with short_tmp() as tmp:
        _check_readme_run(tmp)


def _check_readme_run(tmp):
    run_example("lightning", tmp, env())
    out = tmp / "runs" / "trainwatch"
    (jsonl,) = out.glob("*.jsonl")
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    epochs = [r for r in recs if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5]
    for e in epochs:
        for key in ("train/batch_loss_mean", "train/grad_norm_mean", "model/weight_mean",
                    "train/lr", "train/batch_loss_cv"):
            assert np.isfinite(e["metrics"][key]), key
    first, last = (epochs[i]["metrics"]["train/total_loss"] for i in (0, -1))
    assert last < 0.5 * first
    assert recs[-1]["type"] == "summary" and recs[-1]["metrics"]["summary/dropped"] == 0
    (run_dir,) = find_offline_runs(out)
    got = read_offline_run(run_dir)
    assert got["config"]["lr"] == 0.05 and got["config"]["max_epochs"] == 5
    rows = [h for h in got["history"] if "train/batch_loss_mean" in h]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["train/grad_norm_mean"] == pytest.approx(
        epochs[-1]["metrics"]["train/grad_norm_mean"], rel=1e-9)


# -- a stop action -------------------------------------------------------------------------

class Exploding(L.LightningModule):
    """Gradient norms far past 100 at every step (the loss x1e5; a tiny rate keeps the
    weights finite), and a step of some cost: 100 epochs would take a while."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        time.sleep(0.01)
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) * 1e5

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=1e-9)


def test_a_stop_action_ends_the_fit_early(tmp_path):
    from test_stop_ddp import DIAGNOSIS, stop_collector

    col = stop_collector(tmp_path, "--stop-on", DIAGNOSIS)
    cb = TrainwatchCallback(endpoint=col.endpoint)
    trainer = _trainer([cb], epochs=100)
    trainer.fit(Exploding(), _loader(*_data(64)))
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    (stop,) = [r for r in recs if r["type"] == "stop"]
    assert stop["rule"] == DIAGNOSIS
    # the fit ended at the stop step, long before its 100 epochs of 8 steps
    assert trainer.global_step == stop["step"] < 50 * 8
    assert trainer.current_epoch < 50
    assert next(r for r in recs if r["type"] == "summary")["ended"] == "stopped"
