"""The per-step curve: what every step sent, bucketed with its min and max, bounded for any
run length, the same in the records, the report and wandb.

Expected figures are numpy over the raw steps the test made; the collector's side is read
back from the records' JSON form (``collector.report.steps.step_curve``), so what is
checked is what every view reads.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from support.wire_runs import STEPS, offline_wandb_run, records, run_messages, typed_records

from collector.analysis.inputs import EpochInput, StepSeries
from collector.analysis.stepcurve import MAX_BUCKETS, StepCurve
from collector.records import StepCurveRecord
from collector.report.steps import step_curve
from collector.sinks.jsonl import dumps
from collector.sinks.wandb_views import STEP_AXIS, STEP_METRICS


def _epoch(epoch: int, ranks: dict[int, tuple]) -> EpochInput:
    steps = {r: StepSeries(np.asarray(s, np.int64), np.asarray(loss, np.float64),
                           np.asarray(gn, np.float64)) for r, (s, loss, gn) in ranks.items()}
    return EpochInput("r", epoch, len(ranks), steps, {}, {}, [])


def _json(curve: StepCurve, inputs: list[EpochInput]) -> list[dict]:
    """Every epoch through the curve, then its end: the records' JSON form."""
    out = []
    for inp in inputs:
        points = curve.add_epoch(inp)
        out.append(StepCurveRecord("r", inp.epoch, curve.width, tuple(points)))
    out.append(StepCurveRecord("r", inputs[-1].epoch, curve.width, tuple(curve.finish())))
    return [json.loads(dumps(r)) for r in out]


def _two_ranks(epochs: int, per_epoch: int, seed: int = 0) -> tuple[list[EpochInput], dict]:
    """Rank 0 sends norms on even steps only (NaN: none sent), rank 1 on every step; a NaN
    and an Inf loss, an Inf norm. Returns the inputs and the raw values by step."""
    rng = np.random.default_rng(seed)
    inputs, raw = [], {"steps": [], "loss": [], "grad": {}}
    for e in range(epochs):
        s = np.arange(1 + e * per_epoch, 1 + (e + 1) * per_epoch)
        l0, l1 = rng.lognormal(0, 0.5, s.size), rng.lognormal(0, 0.5, s.size)
        g0 = np.where(s % 2 == 0, rng.uniform(0.5, 2, s.size), np.nan)
        g1 = rng.uniform(0.5, 2, s.size)
        if e == 3:
            l0[5], l1[7], g1[9] = np.nan, np.inf, np.inf
        inputs.append(_epoch(e + 1, {0: (s, l0, g0), 1: (s, l1, g1)}))
        raw["steps"] += [s, s]
        raw["loss"] += [l0, l1]
        for step, a, b in zip(s, g0, g1, strict=True):
            raw["grad"][int(step)] = a if not math.isnan(a) else b  # the lowest rank's
    return inputs, raw


def _expected(raw: dict, width: int) -> dict[int, dict]:
    steps, loss = np.concatenate(raw["steps"]), np.concatenate(raw["loss"])
    g_steps = np.array(sorted(raw["grad"]))
    g_vals = np.array([raw["grad"][s] for s in g_steps])
    out = {}
    for b in np.unique(steps // width):
        lv, gv = loss[steps // width == b], g_vals[g_steps // width == b]
        lf, gf = lv[np.isfinite(lv)], gv[np.isfinite(gv)]
        out[int(b)] = {"step": int(steps[steps // width == b].min()), "n": lf.size,
                       "loss": lf.mean(), "loss_min": lf.min(), "loss_max": lf.max(),
                       "grad_n": gf.size, "grad_norm": gf.mean(), "grad_norm_min": gf.min(),
                       "grad_norm_max": gf.max(),
                       "nonfinite": int((~np.isfinite(lv)).sum() + (~np.isfinite(gv)).sum())}
    return out


def test_the_curve_from_the_records_equals_numpy_on_every_step():
    inputs, raw = _two_ranks(epochs=40, per_epoch=37)
    curve = StepCurve(max_buckets=16)  # small: many doublings, the open bucket held
    recs = _json(curve, inputs)
    got = step_curve(recs)
    assert got.width == curve.width >= 64 and len(got) <= 16
    want = _expected(raw, got.width)
    assert [int(s) // got.width for s in got.columns["step"]] == sorted(want)
    for i, b in enumerate(sorted(want)):
        for key, value in want[b].items():
            assert got.columns[key][i] == pytest.approx(value, rel=1e-12), (b, key)
    # the records' points, re-bucketed, are exactly the curve the collector holds
    kept = curve.points()
    np.testing.assert_array_equal(got.columns["step"], [p.step for p in kept])
    np.testing.assert_allclose(got.columns["loss_max"], [p.loss_max for p in kept])
    assert sum(len(r["points"]["step"]) for r in recs) == curve.emitted


def test_every_step_counts_once_whatever_the_cap():
    inputs, raw = _two_ranks(epochs=12, per_epoch=50, seed=3)
    loss_ok = np.isfinite(np.concatenate(raw["loss"]))
    grad_ok = np.isfinite(list(raw["grad"].values()))
    assert (~loss_ok).sum() == 2
    for cap in (2, 3, 7, 64, 4096):
        got = step_curve(_json(StepCurve(cap), inputs))
        assert got.columns["n"].sum() == loss_ok.sum()
        assert got.columns["grad_n"].sum() == grad_ok.sum()  # once a step, the lowest rank's
        assert got.columns["nonfinite"].sum() == (~loss_ok).sum() + (~grad_ok).sum()
        assert len(got) <= cap


def test_a_long_run_stays_under_the_cap():
    rng = np.random.default_rng(1)
    curve, total, biggest, size = StepCurve(), 0, 0, 0
    for e in range(500):  # 10^6 steps, 2000 an epoch
        s = np.arange(1 + e * 2000, 1 + (e + 1) * 2000)
        points = curve.add_epoch(_epoch(e + 1, {0: (s, rng.random(s.size), rng.random(s.size))}))
        total, biggest = total + len(points), max(biggest, len(points))
        size += len(dumps(StepCurveRecord("r", e + 1, curve.width, tuple(points))))
    total += len(curve.finish())
    doublings = int(math.log2(curve.width))
    assert curve.idx.size <= MAX_BUCKETS and biggest <= MAX_BUCKETS + 1
    assert total <= MAX_BUCKETS * (1 + doublings / 2) + doublings  # the docstring's bound
    assert total < 8000 and size < 2_500_000  # a few thousand points, a couple of MB
    assert curve.emitted == total


def test_one_huge_epoch_gives_one_bounded_record():
    s = np.arange(1, 300_001)
    points = StepCurve().add_epoch(_epoch(1, {0: (s, np.ones(s.size), np.ones(s.size))}))
    assert len(points) <= MAX_BUCKETS


def test_a_one_step_spike_shows_as_its_buckets_maximum():
    s = np.arange(1, 100_001)
    loss = np.full(s.size, 0.5)
    loss[61_234] = 1e6
    got = step_curve(_json(StepCurve(), [_epoch(1, {0: (s, loss, np.ones(s.size))})]))
    top = int(np.argmax(got.columns["loss_max"]))
    assert got.columns["loss_max"][top] == 1e6
    assert got.columns["loss_max"][np.arange(len(got)) != top].max() == 0.5
    assert got.columns["loss"][top] < 1e6 / 10  # the mean alone would hide it


def test_a_counter_that_restarts_each_epoch_is_placed_after_the_curve():
    curve = StepCurve()
    inputs = [_epoch(e, {0: (np.arange(10), np.full(10, float(e)), np.ones(10))})
              for e in range(1, 4)]
    got = step_curve(_json(curve, inputs))
    np.testing.assert_array_equal(got.columns["step"], np.arange(30))
    np.testing.assert_array_equal(got.columns["loss"], np.repeat([1.0, 2.0, 3.0], 10))


def test_step_numbers_at_the_ends_of_int64_neither_fail_nor_wrap():
    curve = StepCurve()
    big = np.array([2**63 - 3, 2**63 - 2], np.int64)
    for epoch, s in enumerate((big, np.array([-2**63, -2**63 + 1], np.int64), big), start=1):
        curve.add_epoch(_epoch(epoch, {0: (s, np.ones(2), np.ones(2))}))
    points = curve.points() + curve.finish()
    assert sum(p.n for p in curve.points()) == 6 and all(p.width >= 1 for p in points)


def test_the_pipeline_emits_the_steps_every_epoch_before_the_summary():
    recs = records([run_messages("job", 6, explode=(4,))])
    kinds = [r["type"] for r in recs]
    assert kinds.index("summary") > max(i for i, k in enumerate(kinds) if k == "steps")
    got = step_curve(r for r in recs if r["type"] == "steps")
    # what run_messages sent: loss(e) * (0.9, 1.1, ...), norms (1 + 0.2 sin s) * 150 in 4
    epoch = np.repeat(np.arange(1, 7), STEPS)
    s = np.tile(np.arange(STEPS), 6)
    loss = (0.1 + 0.9 * 0.8 ** epoch) * np.where(s % 2, 1.1, 0.9)
    grad = (1 + 0.2 * np.sin(s)) * np.where(epoch == 4, 150.0, 1.0)
    np.testing.assert_array_equal(got.columns["step"], np.arange(1, 6 * STEPS + 1))
    np.testing.assert_allclose(got.columns["loss"], loss, rtol=1e-12)
    np.testing.assert_allclose(got.columns["grad_norm_max"], grad, rtol=1e-12)
    assert [r["epoch"] for r in recs if r["type"] == "steps"] == list(range(1, 7))


def test_wandb_logs_each_point_against_the_trainer_step(tmp_path, monkeypatch):
    recs = typed_records([run_messages("curves", 5, samples=None, explode=(3,))])
    _, run = offline_wandb_run(recs, tmp_path, monkeypatch)
    rows = [row for row in run["history"] if STEP_AXIS in row]
    points = [p for r in recs if isinstance(r, StepCurveRecord) for p in r.points]
    assert [row[STEP_AXIS] for row in rows] == [p.step for p in points]
    assert [row["steps/grad_norm_max"] for row in rows] == [p.grad_norm_max for p in points]
    assert [row["steps/loss"] for row in rows] == [p.loss for p in points]
    for name in STEP_METRICS:
        assert run["metrics"][name]["step_metric"] == STEP_AXIS
    assert all("epoch" not in row for row in rows)  # never on the epoch axis
    epochs = [row for row in run["history"] if "ranks/reporting" in row]
    assert [row["epoch"] for row in epochs] == [1, 2, 3, 4, 5]
    assert run["metrics"]["*"]["step_metric"] == "epoch"
