"""Images and other layouts: ``channel_dim=`` moves the channels last on the device, and
``log_data_stats`` ships a seeded uniform sample of at most ``max_rows`` rows, saying in
the first chunk how many rows there were and how many were sent. No host read on the
training thread (the same dispatch-mode check as test_client_nosync.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from client_support import Receiver, kill_leftovers
from conftest import CollectorProc
from test_client_nosync import READS, OpLog

from trainer_client import TrainerClient, wire
from trainer_client.client import DATA_MAX_ROWS

NP = {"float32": np.float32, "float64": np.float64, "float16": np.float16}


@pytest.fixture
def started():
    procs: list = []
    yield procs
    kill_leftovers(procs)


def _array(t: wire.Tensor) -> np.ndarray:
    return np.frombuffer(bytes(t.data), NP[t.dtype]).reshape(t.shape)


def _images(n: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    offsets = torch.tensor([-2.0, 0.0, 3.0]).view(1, 3, 1, 1)
    return torch.randn(n, 3, 8, 8, generator=g) + offsets  # NCHW


def test_nchw_images_with_channel_dim_1(tmp_path):
    imgs = _images(20)
    samples = imgs[:6].to(torch.float16)
    rx = Receiver(tmp_path)
    tw = TrainerClient(endpoint=rx.endpoint, run="img", rank=0, world_size=1)
    with OpLog() as log:
        tw.log_validation(1, samples, ["r", "g", "b"], channel_dim=1)
        tw.log_data_stats(imgs, ["r", "g", "b"], mean=[0.4, 0.5, 0.6], std=[0.2, 0.2, 0.2],
                          channel_dim=1, max_rows=None)
        tw.log_data_stats(imgs[:1].flatten(2), ["r", "g", "b"], channel_dim=-2)
    tw.close(timeout=10)
    assert log.ops and not READS & set(log.ops)
    msgs = rx.until_bye()
    (val,) = [m for m in msgs if m.kind == wire.KIND_VALIDATION]
    np.testing.assert_array_equal(_array(val.tensors["samples"]),
                                  samples.permute(0, 2, 3, 1).numpy())
    data = [m for m in msgs if m.kind == wire.KIND_DATA]
    first = data[0]
    assert first.body["rows_total"] == first.body["rows_sent"] == 20 * 8 * 8
    got = np.concatenate([_array(m.tensors["chunk"]) for m in data[:first.body["count"]]])
    np.testing.assert_array_equal(got, imgs.permute(0, 2, 3, 1).reshape(-1, 3).numpy())
    last = data[-1]  # [1, 3, 64] with the channels in dim -2
    assert last.body["rows_total"] == 64
    np.testing.assert_array_equal(_array(last.tensors["chunk"]),
                                  imgs[0].reshape(3, 64).T.numpy())


def test_max_rows_sends_a_seeded_uniform_sample_of_real_rows(tmp_path):
    imgs = _images(200)  # 12,800 pixel rows
    rx = Receiver(tmp_path)
    tw = TrainerClient(endpoint=rx.endpoint, run="rows", rank=0, world_size=1)
    with OpLog() as log:
        tw.log_data_stats(imgs, ["r", "g", "b"], channel_dim=1, max_rows=2000)
        tw.log_data_stats(imgs, ["r", "g", "b"], channel_dim=1, max_rows=2000)
        tw.log_data_stats(imgs.permute(0, 2, 3, 1).contiguous(), ["r", "g", "b"],
                          max_rows=2000)
    tw.close(timeout=10)
    assert log.ops and not READS & set(log.ops)
    assert any("randint" in op for op in log.ops)  # drawn on the device
    chunks = [m for m in rx.until_bye() if m.kind == wire.KIND_DATA]
    assert len(chunks) == 3 and all(m.body["count"] == 1 for m in chunks)
    a, b, c = (_array(m.tensors["chunk"]) for m in chunks)
    for m in chunks:
        assert (m.body["rows_total"], m.body["rows_sent"]) == (12_800, 2000)
    assert a.shape == (2000, 3)
    np.testing.assert_array_equal(a, b)  # seeded: the same rows every time
    np.testing.assert_array_equal(a, c)  # and the same rows whatever the layout
    rows = {tuple(r) for r in imgs.permute(0, 2, 3, 1).reshape(-1, 3).numpy().tolist()}
    assert all(tuple(r) in rows for r in a.tolist())  # whole rows, channels kept together
    # uniform: the sample's per-channel means sit near the data's (offsets -2, 0, 3);
    # 2000 draws put the error near 0.02, a biased or wrong-channel sample misses by > 1
    full = imgs.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    assert np.abs(a.mean(0) - full.mean(0)).max() < 0.2
    assert len({tuple(r) for r in a.tolist()}) > 1800  # few repeats: spread over the set


def test_the_collector_takes_a_sampled_dataset(tmp_path, started):
    imgs = _images(100)
    ep = f"ipc://{tmp_path}/c.sock"
    col = CollectorProc(tmp_path, ep, "--once", "--quiet", "1").start()
    started.append(col)
    tw = TrainerClient(endpoint=ep, run="sampled", rank=0, world_size=1)
    tw.log_data_stats(imgs, ["r", "g", "b"], channel_dim=1, max_rows=3000)
    tw.close(timeout=30)
    assert col.wait(60) == 0, col.log.read_text()[-3000:]
    (rec,) = [r for r in col.records() if r["type"] == "data_stats"]
    full = imgs.permute(0, 2, 3, 1).reshape(-1, 3)
    for name, mean in zip(["r", "g", "b"], full.mean(0).tolist(), strict=True):
        assert rec["metrics"][f"data_stats/{name}_mean"] == pytest.approx(mean, abs=0.2)
    assert tw.stats["dropped"] == 0


def test_layout_arguments_are_checked():
    tw = TrainerClient(endpoint="ipc:///tmp/trainwatch-nobody.sock", run="args", rank=0,
                       world_size=1)
    imgs = _images(2)
    with pytest.raises(ValueError, match="3 channels along dim 1.*4 channel names"):
        tw.log_data_stats(imgs, ["a", "b", "c", "d"], channel_dim=1)
    with pytest.raises(ValueError, match="channel_dim 4 is not a dim"):
        tw.log_validation(1, imgs, ["r", "g", "b"], channel_dim=4)
    with pytest.raises(ValueError, match="8 channels along dim 3"):
        tw.log_validation(1, imgs, ["r", "g", "b"])  # NCHW without channel_dim
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="max_rows"):
            tw.log_data_stats(imgs, ["r", "g", "b"], channel_dim=1, max_rows=bad)
    with pytest.raises(TypeError, match="float16/bfloat16"):
        tw.log_data_stats(imgs.long(), ["r", "g", "b"], channel_dim=1)
    tw.close(timeout=0.5)
    assert DATA_MAX_ROWS == 1_000_000  # the documented default


def _data_frames(body: dict) -> list:
    chunk = wire.Tensor("chunk", "float32", (2, 3), bytes(24))
    return wire.encode(wire.Header(wire.KIND_DATA, "r", 0, 1, 1, 0, 0, 0, 1.0, 0, body),
                       [chunk])


@pytest.mark.parametrize("extra", [{"rows_total": 10, "rows_sent": 11},
                                   {"rows_total": 10}, {"rows_sent": 2},
                                   {"rows_total": 10, "rows_sent": 2.0},
                                   {"rows_total": -1, "rows_sent": -1}])
def test_the_wire_checks_the_row_counts(extra):
    body = {"index": 0, "count": 1, "channels": ["a", "b", "c"]}
    assert wire.decode(_data_frames({**body, "rows_total": 10, "rows_sent": 2})).body[
        "rows_sent"] == 2
    assert "rows_total" not in wire.decode(_data_frames(body)).body  # optional
    with pytest.raises(wire.DecodeError, match="rows_total/rows_sent"):
        wire.decode(_data_frames({**body, **extra}))
