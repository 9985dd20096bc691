"""The monitoring never crashes the training loop: real models whose parameters the fused
reductions cannot take as they are (complex, meta, sparse gradients, integer, float64,
none trainable) are logged with what can be reduced, the rest left out with one warning
naming each, and the figures that do travel equal one's own computation.

Every message is read back from a real ZeroMQ socket and decoded with the wire module.
"""

from __future__ import annotations

import math

import pytest
import torch
from client_support import Receiver, warnings_with
from torch import nn

from trainer_client import TrainerClient, reductions, wire


def _client(rx: Receiver) -> TrainerClient:
    return TrainerClient(endpoint=rx.endpoint, run="robust", rank=0, world_size=1)


def _kind(msgs: list[wire.Message], kind: int) -> list[wire.Message]:
    return [m for m in msgs if m.kind == kind]


def _norms(step: wire.Message) -> list[float]:
    t = step.tensors["param_norms"]
    return torch.frombuffer(bytearray(t.data), dtype=torch.float32).tolist()


class SpectralFilter(nn.Module):
    """A learned complex frequency response: a complex-valued parameter, as in FNOs."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.filt = nn.Parameter(torch.randn(5, dtype=torch.cfloat))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = torch.fft.rfft(self.lin(x), dim=-1) * self.filt
        return torch.fft.irfft(spec, n=8, dim=-1)


def test_a_complex_parameter_is_reduced_through_its_real_view(tmp_path, caplog):
    torch.manual_seed(0)
    model = SpectralFilter()
    ema = torch.optim.swa_utils.AveragedModel(model).requires_grad_(False)
    with torch.no_grad():
        ema.module.filt.mul_(1.5)
    loss = model(torch.randn(16, 8)).pow(2).mean()
    loss.backward()
    rx = Receiver(tmp_path)
    tw = _client(rx)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        tw.log_step(loss, model=model)
        tw.log_epoch(1, model=model, ema_model=ema)
        tw.close(timeout=10)
    msgs = rx.until_bye()
    assert tw.stats["dropped"] == 0 and not warnings_with(caplog, "left out")
    (step,) = _kind(msgs, wire.KIND_STEP)
    names = [n for n, _ in model.named_parameters()]
    own = [float(torch.linalg.vector_norm(p.grad)) for p in model.parameters()]  # |z| for complex
    assert _norms(step) == pytest.approx(own, rel=1e-6)
    assert step.body[1] == pytest.approx(math.sqrt(sum(v * v for v in own)), rel=1e-6)
    (epoch,) = _kind(msgs, wire.KIND_EPOCH)
    assert epoch.body["param_names"] == names
    flat = torch.cat([torch.view_as_real(p.detach()).reshape(-1) if p.is_complex()
                      else p.detach().reshape(-1) for p in model.parameters()]).double()
    count, sum_abs, total, sum_sq, max_abs = epoch.body["weights"]
    assert count == flat.numel() == 8 * 8 + 8 + 2 * 5
    assert sum_abs == pytest.approx(float(flat.abs().sum()), rel=1e-9)
    assert total == pytest.approx(float(flat.sum()), rel=1e-9, abs=1e-12)
    assert sum_sq == pytest.approx(float(flat.pow(2).sum()), rel=1e-9)
    assert max_abs == pytest.approx(float(flat.abs().max()), rel=1e-9)
    diff = torch.view_as_real(ema.module.filt - model.filt).detach().abs().sum()
    assert epoch.body["ema"] == pytest.approx([count, float(diff)], rel=1e-6)


def test_sparse_gradients_are_left_out_with_one_warning_and_the_rest_travel(tmp_path, caplog):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(50, 8, sparse=True), nn.Flatten(), nn.Linear(24, 1))
    rx = Receiver(tmp_path)
    tw = _client(rx)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        for _ in range(5):
            model.zero_grad()
            loss = model(torch.randint(0, 50, (4, 3))).pow(2).mean()
            loss.backward()
            assert model[0].weight.grad.is_sparse
            tw.log_step(loss, model=model)
        tw.log_epoch(1, model=model)
        tw.close(timeout=10)
    msgs = rx.until_bye()
    warned = warnings_with(caplog, "left out")
    assert len(warned) == 1 and "0.weight" in warned[0] and "sparse" in warned[0]
    steps = _kind(msgs, wire.KIND_STEP)
    assert len(steps) == 5 and tw.stats["dropped"] == 0
    dense = [(n, p) for n, p in model.named_parameters() if not n.startswith("0.")]
    assert _norms(steps[-1]) == pytest.approx(
        [float(p.grad.norm()) for _, p in dense], rel=1e-6)
    # the epoch names the norm columns the steps really carried
    assert _kind(msgs, wire.KIND_EPOCH)[0].body["param_names"] == [n for n, _ in dense]


def test_a_meta_device_model_never_raises_into_the_loop(tmp_path, caplog):
    real = nn.Linear(4, 2)
    with torch.device("meta"):
        lazy = nn.Linear(4, 2)  # not materialised yet (deferred init)
    model = nn.ModuleDict({"real": real, "lazy": lazy})
    x = torch.randn(3, 4)
    loss = real(x).pow(2).mean()
    loss.backward()
    lazy(torch.randn(3, 4, device="meta")).sum().backward()  # meta gradients too
    rx = Receiver(tmp_path)
    tw = _client(rx)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        tw.log_config({"lr": 0.1}, model=model)
        for _ in range(3):
            tw.log_step(loss, model=model)
            tw.log_step(loss, model=lazy)  # nothing left to reduce: no norms, no raise
        tw.log_epoch(1, model=model)
        tw.log_epoch(2, model=lazy)
        meta_loss = lazy(torch.randn(3, 4, device="meta")).sum()
        # a loss with no value: dropped and counted, never raised (read on the sender
        # thread without a model; by the call's own device work with one)
        tw.log_step(meta_loss)
        tw.log_step(meta_loss, model=real)
        tw.log_step(meta_loss, model=real)
        tw.close(timeout=10)
    msgs = rx.until_bye()
    warned = warnings_with(caplog, "left out")
    for name in ("lazy.weight", "lazy.bias", "weight", "bias"):
        assert sum(f" {name} left out of the gradient norms" in w for w in warned) == 1, warned
    assert any("lazy.weight left out of the weight statistics" in w for w in warned)
    steps = _kind(msgs, wire.KIND_STEP)
    assert len(steps) == 6
    assert _norms(steps[0]) == pytest.approx([float(p.grad.norm()) for p in real.parameters()])
    assert all("param_norms" not in s.tensors for s in steps[1::2])
    e1, e2 = _kind(msgs, wire.KIND_EPOCH)
    assert e1.body["weights"][0] == sum(p.numel() for p in real.parameters())
    assert e2.body["weights"] is None and e2.epoch == 2  # the epoch still closes
    by = tw.stats["dropped_by_reason"]
    assert by["log_failed"] == 2 and by["build_failed"] == 1 and tw.stats["dropped"] == 3
    assert len(warnings_with(caplog, "log_step failed")) == 1
    # the lost steps are reported in the BYE header, as the sequence gaps the collector sees
    bye = _kind(msgs, wire.KIND_BYE)[0]
    assert bye.dropped == 3 and bye.seq + 1 - len(msgs) == 3


def test_integer_float64_and_frozen_models(tmp_path, caplog):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    model.register_parameter("codebook", nn.Parameter(torch.arange(6), requires_grad=False))
    frozen = nn.Linear(3, 3).requires_grad_(False)
    loss = model(torch.randn(8, 3, dtype=torch.float64)).pow(2).mean()
    loss.backward()
    rx = Receiver(tmp_path)
    tw = _client(rx)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        tw.log_step(loss, model=model)  # float64 gradients: no narrowing error
        tw.log_epoch(1, model=model, ema_model=model)  # integer buffers, an integer param
        tw.log_step(loss, model=frozen)
        tw.log_epoch(2, model=frozen)
        tw.close(timeout=10)
    msgs = rx.until_bye()
    s1, _ = _kind(msgs, wire.KIND_STEP)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert _norms(s1) == pytest.approx([float(p.grad.norm()) for p in trainable], rel=1e-6)
    e1, e2 = _kind(msgs, wire.KIND_EPOCH)
    assert e1.body["weights"][0] == sum(p.numel() for p in trainable)
    assert e1.body["ema"] == [sum(p.numel() for p in trainable), 0.0]
    assert e2.body["weights"] is None
    assert len(warnings_with(caplog, "no trainable parameters")) == 1
    # all named parameters, as an integration might pass them: the integer one is left out
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        summary = reductions.weight_summary(list(model.named_parameters()))
    assert summary[0] == sum(p.numel() for p in trainable)
    assert len(warnings_with(caplog, "codebook left out of the weight statistics")) == 1


def test_grad_norms_keeps_its_signature_and_float32_result():
    model = SpectralFilter()
    model(torch.randn(4, 8)).sum().backward()
    names, vec = reductions.grad_norms(reductions.named_params(model))
    assert names == ["filt", "lin.weight", "lin.bias"] and vec.dtype == torch.float32
    assert vec.tolist() == pytest.approx([float(p.grad.norm()) for p in model.parameters()])
    assert reductions.grad_norms([("w", nn.Parameter(torch.ones(2)))]) is None  # no grad
