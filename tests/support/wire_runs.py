"""Runs as the client puts them on the wire, fed through the collector's real pipeline.

The messages are the wire format's own (``trainer_client.wire``), in the client's order
(hello, config, data statistics, then per epoch its steps, validation samples and
``log_epoch``, a goodbye); ``records`` returns what ``Pipeline`` emits for them, the
records' JSON form every view reads::

    recs = records([run_messages("r1", 8, validation=gait_samples)])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from collector.analysis.profile import Profile
from collector.analysis.profile_load import load_profile
from collector.ingest.pipeline import Pipeline
from collector.records import Record
from collector.sinks.jsonl import MemorySink
from trainer_client import wire

GAIT = ("knee_angle_r", "grf_vz_r")
GAIT_MEAN, GAIT_STD = (0.6, 700.0), (0.5, 250.0)  # rad, N: physical = normalised*std+mean
STEPS = 16
Samples = Callable[[int, np.random.Generator], np.ndarray]  # (epoch, rng) -> (n, t, c)


def falling(epoch: int) -> float:
    return 0.1 + 0.9 * 0.8 ** epoch


def rising(epoch: int) -> float:
    """Rises 58% from the first epoch to the eighth, like the run the report misread."""
    return 0.5 * (1 + 0.58 * (epoch - 1) / 7)


def varied(epoch: int, rng: np.random.Generator, channels: int = 2) -> np.ndarray:
    """Samples as diverse as the normalised training data."""
    return rng.standard_normal((16, 32, channels)).astype(np.float32)


def collapsed(epoch: int, rng: np.random.Generator, channels: int = 2) -> np.ndarray:
    """One constant signal with std 2e-4: a mode collapse."""
    return (0.3 + 2e-4 * rng.standard_normal((16, 32, channels))).astype(np.float32)


def run_messages(run: str, epochs: int, *, loss: Callable[[int], float] = falling,
                 samples: Samples | None = varied, channels: tuple[str, ...] = GAIT,
                 validate_every: int = 1, late_validation: bool = False,
                 data_stats: bool = True, seed: int = 0, env: dict | None = None,
                 explode: Iterable[int] = (), bye: bool = True,
                 data: np.ndarray | None = None) -> list[list[bytes]]:
    """One rank's messages for ``epochs`` epochs (numbered from 1, as the examples do).

    Each epoch's steps alternate ``loss(e) * (1 ± 0.1)`` (the epoch's mean is exactly
    ``loss(e)``; batch losses vary, as real ones do), gradient norms 0.8-1.2 (x150 in the
    ``explode`` epochs). With ``late_validation`` the samples of epoch E follow
    ``log_epoch(E)``. ``env``: the launcher's WANDB_* variables the hello forwards.
    ``data``: the training set ``log_data_stats`` ships (float32, channels last; default
    4096 rows of standard normal values).
    """
    explode = set(explode)
    rng = np.random.default_rng(seed)
    out: list[list[bytes]] = []
    seq = 0
    step = 0
    current = 0  # the epoch that steps belong to: the last logged + 1, as the client says

    def send(kind: int, body, epoch: int, tensors: Iterable[wire.Tensor] = ()) -> None:
        nonlocal seq
        h = wire.Header(kind, run, 0, 1, 4242 + seed, seq, step, epoch, 1.7e9 + seq, 0, body)
        out.append([bytes(f) for f in wire.encode(h, list(tensors))])
        seq += 1

    def f64(name: str, values: Iterable[float]) -> wire.Tensor:
        arr = np.asarray(list(values), np.float64)
        return wire.Tensor(name, "float64", arr.shape, arr.tobytes())

    send(wire.KIND_HELLO, {"host": "node-1", "pid": 1, "env": dict(env or {})}, 0)
    send(wire.KIND_CONFIG, {"config": {"learning_rate": 1e-4, "batch_size": 32,
                                       "epochs": epochs}, "num_params": 1000}, 0)
    if data_stats:
        chunk = rng.standard_normal((4096, len(channels))).astype(np.float32) if data is None \
            else np.ascontiguousarray(data, np.float32).reshape(-1, len(channels))
        mean = GAIT_MEAN if channels == GAIT else [0.0] * len(channels)
        std = GAIT_STD if channels == GAIT else [1.0] * len(channels)
        send(wire.KIND_DATA, {"index": 0, "count": 1, "channels": list(channels)}, 0,
             [wire.Tensor("chunk", "float32", chunk.shape, chunk.tobytes()),
              f64("mean", mean), f64("std", std)])

    def validate(epoch: int) -> None:
        arr = np.ascontiguousarray(samples(epoch, rng, len(channels)))
        send(wire.KIND_VALIDATION, {"channels": list(channels), "epoch": epoch}, epoch,
             [wire.Tensor("samples", "float32", arr.shape, arr.tobytes())])

    for epoch in range(1, epochs + 1):
        mean_loss = loss(epoch)
        for s in range(STEPS):
            step += 1
            value = mean_loss * (1.1 if s % 2 else 0.9)
            gn = (1.0 + 0.2 * math.sin(s)) * (150.0 if epoch in explode else 1.0)
            send(wire.KIND_STEP, [value, gn, ["simple", "vel"],
                                  [0.6 * value, 0.4 * value], 1e-4], current)
        due = samples is not None and epoch % validate_every == 0
        if due and not late_validation:
            validate(epoch)
        n = 1000.0
        weights = [n, 0.05 * n, 0.001 * n, 0.004 * n, 0.5]  # count, sum|w|, sum, sum w², max|w|
        ema = [n, 0.02 * n * math.exp(-epoch / 10)]
        send(wire.KIND_EPOCH, {"weights": weights, "ema": ema, "param_names": None}, epoch)
        current = epoch + 1
        if due and late_validation:
            validate(epoch)
    if bye:
        send(wire.KIND_BYE, {}, current)
    return out


def typed_records(runs: Iterable[list[list[bytes]]], profile: Profile | None = None,
                  finish: bool = True) -> list[Record]:
    """The typed records ``Pipeline`` emits for these runs' messages, in its order (what a
    sink is given); ``finish``: and those of finishing what is open."""
    sink = MemorySink()
    pipe = Pipeline(profile or load_profile(None), sink)
    for messages in runs:
        for frames in messages:
            pipe.feed(frames)
    if finish:
        pipe.finish()
    return list(sink.records)


def records(runs: Iterable[list[list[bytes]]], profile: Profile | None = None) -> list[dict]:
    """The records ``Pipeline`` emits for these runs' messages, in their JSON form."""
    sink = MemorySink()
    sink.records = typed_records(runs, profile)
    return sink.json()


def offline_wandb_run(records: Iterable[Record], tmp: Path, monkeypatch: Any
                      ) -> tuple[Path, dict[str, Any]]:
    """``records`` through a real offline ``WandbSink`` into ``tmp`` (no inherited wandb
    settings), and that one run read back from its files: (its directory, its contents)."""
    from collector.sinks.wandb_sink import WandbSink
    from support.wandb_readback import find_offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    sink = WandbSink(dir=tmp, mode="offline")
    for r in records:
        sink.write(r)
    sink.close(timeout_s=60.0)
    assert sink.stats["failed"] == 0, sink.stats
    (run_dir,) = find_offline_runs(tmp)
    return run_dir, read_offline_run(run_dir)
