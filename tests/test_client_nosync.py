"""The training thread never reads a tensor's value: every log_* call is checked with a
dispatch mode that sees each aten op the calling thread runs (modes are thread-local, so
the sender thread's reads, which are allowed, are not seen).

A value read (``.item()``, ``bool(t)``, ``float(t)``) goes through
``aten._local_scalar_dense``, which must not appear. (``.tolist()`` of a CPU tensor does
not dispatch, so this check cannot see it; on a CUDA machine the second test, under
``torch.cuda.set_sync_debug_mode("error")``, catches every kind of host sync.)
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trainer_client import TrainerClient

READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.equal.default"}


class OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.thread = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _model():
    m = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    ema = torch.optim.swa_utils.AveragedModel(m).requires_grad_(False)  # frozen, as usual
    return m, ema


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_calls_read_no_tensor_values_on_the_training_thread(tmp_path, dtype):
    model, ema = _model()
    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/none.sock", run="nosync", rank=0,
                       world_size=1)
    x = torch.randn(32, 6)
    out = model(x)
    loss = out.pow(2).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    terms = {"simple": out[:, 0].pow(2).mean(), "vel": out[:, 1].abs().mean(), "fk": 0.25}
    samples = torch.randn(4, 10, 3).to(dtype)
    with OpLog() as log:
        tw.log_step(loss, terms, model=model, grad_norm=norm, lr=torch.tensor(0.01))
        tw.log_step(loss, terms, model=model, lr=0.01)  # norm computed on the device
        tw.log_validation(1, samples, ["a", "b", "c"])
        tw.log_epoch(1, model=model, ema_model=ema)
    tw.close(timeout=1.0)
    assert log.ops, "the dispatch mode saw nothing: the check would be vacuous"
    # it did see the device reductions
    assert any(op.startswith("aten._foreach_norm") for op in log.ops)
    assert not READS & set(log.ops), sorted(READS & set(log.ops))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda(tmp_path):
    model, ema = _model()
    model, ema = model.cuda(), ema.cuda()
    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/none.sock", run="cuda", rank=0,
                       world_size=1)
    x = torch.randn(32, 6, device="cuda")
    out = model(x)
    loss = out.pow(2).mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tw.log_step(loss, {"simple": loss * 0.5}, model=model, grad_norm=norm)
        tw.log_step(loss, {"simple": loss * 0.5}, model=model)
        tw.log_validation(1, out.detach().unsqueeze(1).to(torch.bfloat16))
        tw.log_epoch(1, model=model, ema_model=ema)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    tw.close(timeout=2.0)


def test_frozen_ema_copy_is_compared(tmp_path):
    """An EMA copy with requires_grad off still yields model/ema_diff inputs."""
    from trainer_client import reductions

    model, ema = _model()
    with torch.no_grad():
        for p in ema.module.parameters():
            p.add_(0.5)
    params = reductions.named_params(model)
    frozen = reductions.named_params(reductions.unwrap(ema), trainable_only=False)
    count, diff = reductions.ema_summary(params, frozen).tolist()
    n = sum(p.numel() for p in model.parameters())
    assert count == n and diff == pytest.approx(0.5 * n, rel=1e-6)


def test_cpu_tensor_changed_in_place_before_sending_is_dropped_not_misreported(tmp_path):
    """CPU scalars are read by the sender thread later; a version check guards them."""
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    ep = f"ipc://{tmp_path}/pull.sock"
    pull.bind(ep)
    tw = TrainerClient(endpoint=ep, run="mut", rank=0, world_size=1)
    loss = torch.tensor(2.0)
    tw.log_step(loss, {"a": torch.tensor(1.0)})
    loss.add_(1.0)  # in place, before the sender's next poll read it
    tw.log_step(torch.tensor(5.0), {"a": 0.5})
    tw.close(timeout=5.0)
    from trainer_client import wire

    got = []
    while pull.poll(2000):
        m = wire.decode(pull.recv_multipart())
        got.append(m)
    steps = [m.body for m in got if m.kind == wire.KIND_STEP]
    assert tw.stats["dropped_by_reason"]["mutated"] == 1
    assert steps == [[5.0, None, ["a"], [0.5], None]]
    assert got[-1].kind == wire.KIND_BYE and got[-1].dropped == 1
    pull.close(0)
    ctx.term()


def test_the_learning_rate_travels_with_each_step_as_given(tmp_path):
    import zmq

    from trainer_client import wire

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    ep = f"ipc://{tmp_path}/pull.sock"
    pull.bind(ep)
    model, _ = _model()
    model(torch.randn(4, 6)).sum().backward()
    opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.125))  # a tensor lr
    tw = TrainerClient(endpoint=ep, run="lr", rank=0, world_size=1)
    loss = torch.tensor(1.5)
    tw.log_step(loss, lr=0.25)  # host values
    tw.log_step(loss, lr=torch.tensor(0.5))
    tw.log_step(loss, model=model, lr=opt.param_groups[0]["lr"])  # the device path
    tw.log_step(loss, {"a": torch.tensor(2.0)}, model=model, lr=1e-3)
    tw.log_step(loss, model=model)
    tw.close(timeout=5.0)
    got = []
    while pull.poll(2000):
        got.append(wire.decode(pull.recv_multipart()))
    steps = [m.body for m in got if m.kind == wire.KIND_STEP]
    assert [b[4] for b in steps] == [0.25, 0.5, 0.125, 1e-3, None]
    assert [b[0] for b in steps] == [1.5] * 5 and steps[3][2:4] == [["a"], [2.0]]
    pull.close(0)
    ctx.term()


def test_non_scalar_loss_is_a_clear_error(tmp_path, caplog):
    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/none.sock", run="bad", rank=0,
                       world_size=1)
    with caplog.at_level("ERROR", logger="trainwatch.client"):
        tw.log_step(torch.ones(3))
        tw.close(timeout=1.0)
    assert tw.stats["dropped_by_reason"]["build_failed"] == 1
    assert "log_step takes scalars" in caplog.text


def test_back_channel_reads_and_callbacks_read_no_tensor_values(tmp_path):
    """``on_finding`` delivery (inside the log_* calls), ``should_stop`` and ``health``
    reads on the training thread: no value read, and the callbacks run on this thread.
    A real PUB (this test, as the collector) publishes to the client's real SUB."""
    import time

    import zmq

    from trainer_client.wire import health as hw

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(f"ipc://{tmp_path}/tw.sock.health")  # beside the (absent) collector's endpoint
    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/tw.sock", run="fb", rank=0, world_size=1)
    here, calls = threading.get_ident(), []
    tw.on_finding(lambda f: calls.append((f.seq, f.rule, threading.get_ident() == here)))
    found = hw.Finding(1, 1, "exploding_gradients", hw.RAISED, "critical", "norm 1e4", "clip")
    news = [found, hw.Stop(2, 1, 3, "diagnosis/gradient_explosion")]
    deadline = time.monotonic() + 20
    while tw.stats["health"]["received"] < 2 and time.monotonic() < deadline:
        for m in (hw.State(0, 0, "healthy", (), None), *news):  # until the SUB has joined
            pub.send_multipart(hw.encode(m, "fb"))
        time.sleep(0.05)
    assert tw._feedback.stop is not None, "the client never heard the publisher"
    model, _ = _model()
    out = model(torch.randn(8, 6))
    loss = out.pow(2).mean()
    loss.backward()
    stops = []
    with OpLog() as log:
        for _ in range(4):
            tw.log_step(loss, {"a": out[:, 0].mean()}, model=model)  # delivers the findings
            stops.append(tw.should_stop)
            level = tw.health.level
    tw.close(timeout=1.0)
    pub.close(0)
    ctx.term()
    assert calls == [(1, "exploding_gradients", True)]
    assert stops == [False, False, True, True] and level == "critical"
    assert any(op.startswith("aten._foreach_norm") for op in log.ops)
    assert not READS & set(log.ops), sorted(READS & set(log.ops))
