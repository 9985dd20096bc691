"""The Hugging Face Trainer callback end to end: a real Trainer training a tiny GPT-2 on
the CPU -> a real collector process -> JSONL and recording, checked against what the
test's own Trainer subclass recorded at each step (loss, pre-clip norms, rate)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from conftest import CollectorProc, env
from support.wandb_readback import find_offline_runs, read_offline_run
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments
from workers.integration_util import (
    READS,
    hook_names,
    messages,
    run_example,
    scope_ops,
    short_tmp,
    tensor,
)

from trainer_client import wire
from trainer_client.integrations.transformers import TrainwatchCallback

EPOCHS = 3
CLIP = 0.05  # far below the gradient norms here: the Trainer clips at every step
REL = 1e-5


class RecordingTrainer(Trainer):
    """Writes down each micro-batch's loss and, after its backward pass and before the
    Trainer clips, every parameter's gradient norm and the rate the step will use."""

    def __init__(self, *a, **k) -> None:
        super().__init__(*a, **k)
        self.seen: list[dict] = []

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        pn = [float(p.grad.norm()) for p in model.parameters() if p.grad is not None]
        self.seen.append({"loss": float(loss), "pn": pn, "gn": float(np.linalg.norm(pn)),
                          "lr": self.optimizer.param_groups[0]["lr"],
                          "step": self.state.global_step})
        return loss


class EpochRecorder(TrainerCallback):
    """EMA updates after each step; weights and EMA difference at each epoch's end."""

    def __init__(self, ema: AveragedModel | None) -> None:
        self.ema = ema
        self.epochs: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kw):
        if self.ema is not None:
            self.ema.update_parameters(model)

    def on_epoch_end(self, args, state, control, model=None, **kw):
        w = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
        out = {"global_step": state.global_step, "weight_mean": float(w.abs().mean()),
               "weight_std": float(w.std(correction=0)), "weight_max": float(w.abs().max())}
        if self.ema is not None:
            e = torch.cat([p.detach().flatten() for p in self.ema.module.parameters()])
            out["ema_diff"] = float((e.double() - w).abs().mean())
        self.epochs.append(out)


def _model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32,
                                      n_positions=16))


def _data(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    tokens = (torch.randint(0, 32, (n, 1), generator=g) + torch.arange(8)) % 32
    return [{"input_ids": t, "labels": t} for t in tokens]


def _args(out, **kw) -> TrainingArguments:
    base = {"num_train_epochs": EPOCHS, "per_device_train_batch_size": 8,
            "learning_rate": 3e-3, "save_strategy": "no", "report_to": [], "use_cpu": True,
            "disable_tqdm": True, "logging_steps": 5, "seed": 0}
    return TrainingArguments(str(out), **{**base, **kw})


def _steps(trainer: RecordingTrainer) -> dict[int, dict]:
    """Per optimizer step: the micro-batches' summed loss (each is already divided by the
    accumulation count), the last micro-batch's norms (the accumulated gradient) and rate."""
    steps: dict[int, dict] = {}
    for s in trainer.seen:
        cur = steps.setdefault(s["step"], {"loss": 0.0})
        cur.update({k: s[k] for k in ("pn", "gn", "lr")})
        cur["loss"] += s["loss"]
    return steps


def _by_epoch(trainer: RecordingTrainer, rec: EpochRecorder) -> list[list[dict]]:
    steps, out, start = _steps(trainer), [], 0
    for e in rec.epochs:
        out.append([steps[k] for k in range(start, e["global_step"])])
        start = e["global_step"]
    return out


@pytest.fixture(scope="module")
def fit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1").start()
    model = _model()
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8)).requires_grad_(False)
    rec = EpochRecorder(ema)
    g = torch.Generator().manual_seed(3)
    samples: list[np.ndarray] = []

    def sample(m):
        s = torch.randn(4, 8, 2, generator=g)
        samples.append(s.numpy().copy())
        return s

    data = torch.randn(100, 2, generator=g)
    cb = TrainwatchCallback(endpoint=col.endpoint, data=data, channel_names=["x", "y"],
                            samples=sample, samples_every=2, ema_model=ema)
    trainer = RecordingTrainer(model=model, args=_args(tmp / "out", max_grad_norm=CLIP),
                               train_dataset=_data(64), callbacks=[cb, rec])
    trainer.train()
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    return col, trainer, rec, samples, data


def test_config_from_the_training_arguments_and_the_model_config(fit):
    col, trainer, _, _, _ = fit
    recs = col.records()
    runs = [r for r in recs if r["type"] == "run"]
    assert len(runs) == 1 and runs[0]["metrics"]["world_size"] == 1
    assert runs[0]["run"].startswith("hf-")
    cfg = next(r for r in recs if r["type"] == "config")["metrics"]
    assert cfg["learning_rate"] == 3e-3 and cfg["max_grad_norm"] == CLIP
    assert cfg["batch_size"] == cfg["per_device_train_batch_size"] == 8
    assert cfg["epochs"] == cfg["num_train_epochs"] == EPOCHS
    assert cfg["gradient_accumulation_steps"] == 1
    assert cfg["model/n_embd"] == 16 and cfg["model/vocab_size"] == 32
    assert cfg["num_params"] == sum(p.numel() for p in trainer.model.parameters())


def test_data_stats_of_the_given_tensor(fit):
    col, *_, data = fit
    ds = next(r for r in col.records() if r["type"] == "data_stats")["metrics"]
    assert ds["data_stats/normalized_mean"] == pytest.approx(float(data.mean()), rel=REL)
    assert ds["data_stats/y_std"] == pytest.approx(float(data[:, 1].std(correction=0)),
                                                   rel=REL)


def test_every_epoch_matches_what_the_trainer_trained_on(fit):
    col, trainer, rec, _, _ = fit
    epochs = [r for r in col.records() if r["type"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1))
    by_epoch = _by_epoch(trainer, rec)
    assert [len(s) for s in by_epoch] == [8] * EPOCHS  # 64 sequences / 8 per batch
    for e, steps, w in zip(epochs, by_epoch, rec.epochs, strict=True):
        m = e["metrics"]
        loss = np.array([s["loss"] for s in steps])
        gn = np.array([s["gn"] for s in steps])
        assert m["train/batch_loss_mean"] == pytest.approx(loss.mean(), rel=REL)
        assert m["train/batch_loss_std"] == pytest.approx(loss.std(), rel=1e-4)
        assert m["train/batch_loss_min"] == pytest.approx(loss.min(), rel=REL)
        assert gn.min() > 5 * CLIP  # so these are the norms before clipping
        assert m["train/grad_norm_mean"] == pytest.approx(gn.mean(), rel=REL)
        assert m["train/grad_norm_max"] == pytest.approx(gn.max(), rel=REL)
        assert m["train/lr"] == pytest.approx(steps[-1]["lr"], rel=1e-12)
        assert m["train/lr_max"] == pytest.approx(max(s["lr"] for s in steps), rel=1e-12)
        for key in ("weight_mean", "weight_std", "weight_max"):
            assert m[f"model/{key}"] == pytest.approx(w[key], rel=REL)
        assert m["model/ema_diff"] == pytest.approx(w["ema_diff"], rel=1e-4)
    lrs = [s["lr"] for s in _steps(trainer).values()]
    assert lrs[0] == pytest.approx(3e-3) and lrs[-1] < 3e-4  # the linear decay is seen


def test_samples_every_second_epoch_and_the_last(fit):
    col, _, _, samples, _ = fit
    epochs = {e["epoch"]: e["metrics"] for e in col.records() if e["type"] == "epoch"}
    assert len(samples) == 2 and "validation/gen_std" not in epochs[1]
    for epoch, s in zip((2, 3), samples, strict=True):
        assert epochs[epoch]["validation/gen_std"] == pytest.approx(float(s.std()), rel=REL)


def test_per_parameter_norms_are_the_unclipped_ones(fit):
    col, trainer, _, _, _ = fit
    msgs = messages(col.record)
    steps = [m for m in msgs if m.kind == wire.KIND_STEP]
    want = list(_steps(trainer).values())
    assert len(steps) == len(want) == 8 * EPOCHS
    for msg, w in zip(steps, want, strict=True):
        np.testing.assert_allclose(tensor(msg, "param_norms"), w["pn"], rtol=1e-4)
    # the Trainer zeroed the gradients before each epoch ended: the steps' names label them
    names = [m.body["param_names"] for m in msgs if m.kind == wire.KIND_EPOCH]
    assert names == [[n for n, _ in trainer.model.named_parameters()]] * EPOCHS


def test_accumulated_micro_batches_make_one_step(tmp_path):
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "1").start()
    rec = EpochRecorder(None)
    # 7 batches an epoch: 3 steps of two micro-batches and one of one; no clipping
    trainer = RecordingTrainer(model=_model(1), args=_args(tmp_path / "out", num_train_epochs=2,
                                                           gradient_accumulation_steps=2,
                                                           max_grad_norm=0.0),
                               train_dataset=_data(56, seed=1),
                               callbacks=[TrainwatchCallback(endpoint=col.endpoint), rec])
    trainer.train()
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    assert [e["global_step"] for e in rec.epochs] == [4, 8]
    epochs = [r for r in col.records() if r["type"] == "epoch"]
    for e, steps in zip(epochs, _by_epoch(trainer, rec), strict=True):
        loss = np.array([s["loss"] for s in steps])
        gn = np.array([s["gn"] for s in steps])
        assert len(loss) == 4
        assert e["metrics"]["train/batch_loss_mean"] == pytest.approx(loss.mean(), rel=REL)
        assert e["metrics"]["train/batch_loss_max"] == pytest.approx(loss.max(), rel=REL)
        assert e["metrics"]["train/grad_norm_mean"] == pytest.approx(gn.mean(), rel=REL)


# -- no host sync ------------------------------------------------------------------------

class ReadsTheLoss(TrainwatchCallback):
    """What the check must catch: a callback that reads the loss on the host."""

    def _observe_loss(self, loss):
        float(loss)
        super()._observe_loss(loss)


def test_the_callback_reads_no_tensor_value_on_the_training_thread(tmp_path):
    hooks = hook_names(TrainwatchCallback, ("_observe_loss", "_observe_clip"))
    model = _model()
    ema = AveragedModel(model).requires_grad_(False)
    good = TrainwatchCallback(endpoint=f"ipc://{tmp_path}/none.sock",
                              data=torch.randn(50, 2), channel_names=["x", "y"],
                              samples=lambda m: torch.randn(4, 8, 2), ema_model=ema)
    bad = ReadsTheLoss(endpoint=f"ipc://{tmp_path}/none2.sock")
    ops, bad_ops = scope_ops(good, hooks), scope_ops(bad, hooks)
    Trainer(model=model, args=_args(tmp_path / "out", num_train_epochs=2, max_grad_norm=CLIP),
            train_dataset=_data(32), callbacks=[good, bad]).train()
    assert {"on_pre_optimizer_step", "on_step_end", "on_epoch_end"} <= set(hooks)
    assert any(op.startswith("aten._foreach_norm") for op in ops)  # it saw the reductions
    assert any(op.startswith("aten.clamp") for op in ops)  # and the unclipping
    assert not READS & set(ops), sorted(READS & set(ops))
    assert READS & set(bad_ops)  # the same check sees a read


def test_the_callback_outside_a_trainer_is_a_clear_error():
    cb = TrainwatchCallback(endpoint="ipc:///tmp/tw-none.sock")
    with pytest.raises(RuntimeError, match="transformers.Trainer"):
        cb.on_train_begin(None, None, None)


# -- the README --------------------------------------------------------------------------

def test_the_readme_example_runs_as_written():
    with short_tmp() as tmp:
        run_example("transformers", tmp, env())
        out = tmp / "runs" / "trainwatch"
        (jsonl,) = out.glob("*.jsonl")
        recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
        epochs = [r for r in recs if r["type"] == "epoch"]
        assert [e["epoch"] for e in epochs] == [1, 2, 3]
        for e in epochs:
            for key in ("train/batch_loss_mean", "train/grad_norm_mean", "model/weight_mean",
                        "train/lr"):
                assert np.isfinite(e["metrics"][key]), key
        first, last = (epochs[i]["metrics"]["train/total_loss"] for i in (0, -1))
        assert last < 0.8 * first
        assert recs[-1]["type"] == "summary" and recs[-1]["metrics"]["summary/dropped"] == 0
        (run_dir,) = find_offline_runs(out)
        got = read_offline_run(run_dir)
        assert got["config"]["learning_rate"] == 5e-3 and got["config"]["model/n_embd"] == 32
        rows = [h for h in got["history"] if "train/batch_loss_mean" in h]
        assert [r["epoch"] for r in rows] == [1, 2, 3]
        assert rows[-1]["train/total_loss"] == pytest.approx(last, rel=1e-9)


# -- a stop action -------------------------------------------------------------------------

class ExplodingTrainer(Trainer):
    """Gradient norms far past 100 at every step (the loss x1e5; a tiny rate keeps the
    weights finite), and a step of some cost: 100 epochs would take a while."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        time.sleep(0.01)
        return super().compute_loss(model, inputs, False, num_items_in_batch) * 1e5


def test_a_stop_action_ends_training_early(tmp_path):
    from test_stop_ddp import DIAGNOSIS, stop_collector

    col = stop_collector(tmp_path, "--stop-on", DIAGNOSIS)
    trainer = ExplodingTrainer(model=_model(), args=_args(tmp_path / "out", num_train_epochs=100,
                                                          learning_rate=1e-9),
                               train_dataset=_data(64),
                               callbacks=[TrainwatchCallback(endpoint=col.endpoint)])
    trainer.train()
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    (stop,) = [r for r in recs if r["type"] == "stop"]
    assert stop["rule"] == DIAGNOSIS
    # training ended at the stop step, long before its 100 epochs of 8 steps
    assert trainer.state.global_step == stop["step"] < 50 * 8
    assert next(r for r in recs if r["type"] == "summary")["ended"] == "stopped"
