"""Detection that holds on noise: hysteresis, noise-aware improvement, non-finite steps as a
finding, the learning rate the run really had, sample diversity against the training data,
a profile for any model and the thresholds in the records.

Hand-built epochs drive a real ``RunHealth``; the samples and the training data are real
gait windows from the example's generator (``examples/gait_diffusion/data.py``).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from test_rules import CONSTS, epoch, events_of, health, judge, samples

from collector.analysis.diversity import DataReference
from collector.analysis.health import RunHealth
from collector.analysis.inputs import DataConstants, EpochInput, StepSeries, ValidationInput
from collector.analysis.profile_load import PACKAGED, load_profile
from collector.analysis.rules import RuleEngine
from collector.analysis.samples import TrainingSubsample, diversity_config
from examples.gait_diffusion import data as gd

GAIT = load_profile(None)
GENERIC = load_profile("generic")


def noisy(e: int, level: float, sd: float, rng: np.random.Generator, n: int = 16,
          lr: float | None = None) -> EpochInput:
    """An epoch whose per-step losses scatter around ``level`` (what a flat loss looks like)."""
    losses = level + sd * rng.standard_normal(n)
    s = StepSeries(np.arange(n, dtype=np.int64) + 100 * e, losses,
                   1.0 + 0.2 * rng.standard_normal(n),
                   lr=None if lr is None else np.full(n, lr))
    return EpochInput("run", e, 1, {0: s}, {0: np.array((1000.0, 50.0, 1.0, 5.0, 0.4))},
                      {0: np.array((1000.0, 1.0))}, [], [])


def _profile(tmp_path, text: str):
    p = tmp_path / "p.toml"
    p.write_text(text)
    return load_profile(str(p))


# -- hysteresis ---------------------------------------------------------------------------
def test_raise_after_and_clear_after_count_judged_epochs_in_a_row(tmp_path):
    p = _profile(tmp_path, "[rules.exploding_gradients]\nraise_after = 2\nclear_after = 3\n")
    h = RunHealth("run", p)
    plan = [150, 1, 150, 150, 1, 150, 1, 1, 1, 150]
    got = [judge(h, epoch(e, grad=float(g))) for e, g in enumerate(plan, start=1)]
    flags = [m["health/exploding_gradients"] for m, _ in got]
    # one spike is not enough; two in a row raise it; one quiet epoch between spikes does
    # not clear it; three quiet in a row do
    assert flags == [0, 0, 0, 1, 1, 1, 1, 1, 0, 0]
    kinds = [(e, ev["kind"]) for e, (_, evs) in enumerate(got, start=1)
             for ev in events_of(evs, "exploding_gradients")]
    assert kinds == [(4, "raised"), (9, "cleared")]
    assert "(2 epochs in a row)" in events_of(got[3][1], "exploding_gradients")[0]["message"]
    assert "(3 epochs in a row)" in events_of(got[8][1], "exploding_gradients")[0]["message"]


def test_epochs_that_cannot_judge_a_rule_leave_its_count_alone(tmp_path):
    p = _profile(tmp_path, "[rules.gen_std_low]\nraise_after = 2\n")
    h = RunHealth("run", p)
    low = samples(0, knee=0.05, grf=0.05, other=0.05)
    flags = [judge(h, epoch(e, validation=low if e in (2, 5) else None))[0].get(
        "health/gen_std_low") for e in range(1, 7)]
    assert flags == [None, 0, 0, 0, 1, 1]  # the two validations 3 epochs apart are in a row


def test_a_snapshot_holds_the_counts():
    engine = RuleEngine(GAIT)
    values = {"train/is_improving": 0, "train/total_loss": 1.0}
    for _ in range(9):
        engine.evaluate(values, 2, {}, {})
    twin = engine.snapshot()
    assert twin.streaks == engine.streaks and twin.streaks is not engine.streaks
    _, ev = twin.evaluate(values, 2, {}, {})
    assert [e.rule for e in ev if e.kind == "raised"] == ["stalled"]  # the 10th in a row
    assert "stalled" not in engine.active  # the original did not move


def test_a_late_validation_is_judged_with_the_counts_of_its_time():
    late, in_time = health(), health()
    copies = _copies(0)
    for h in (late, in_time):
        h.on_data_constants(CONSTS_GAIT)
        _feed_data(h)
    for e in range(1, 5):
        judge(late, epoch(e))
        judge(in_time, epoch(e, validation=copies if e == 2 else None))
    redo = late.on_late_validation(2, copies)
    assert redo[0].epoch == 2 and redo[0].metrics == in_time._epochs[2]
    assert late.engine.streaks == in_time.engine.streaks
    assert late.engine.active == in_time.engine.active


# -- improvement judged against the noise -------------------------------------------------
def test_a_flat_noisy_loss_stalls_within_twelve_epochs_and_stays_stalled():
    rng = np.random.default_rng(7)
    h = RunHealth("flat", GAIT)
    got = [judge(h, noisy(e, 1.0, 0.3, rng))[0] for e in range(1, 31)]
    stalled = [m["health/stalled"] for m in got[1:]]
    assert stalled.index(1) + 2 <= 12 and all(stalled[stalled.index(1):])
    assert sum(m["train/is_improving"] for m in got[1:]) <= 2
    # the guide's loss_decrease > 0 flips on the same losses: it says "improving" about half
    # the time, so its 10 epochs in a row never happen
    guide = sum(m["train/loss_decrease"] > 0 for m in got[1:])
    assert 8 <= guide <= 21


def test_the_guide_method_is_a_profile_choice(tmp_path):
    p = _profile(tmp_path, '[improvement]\nmethod = "guide"\n')
    h = RunHealth("run", p)
    got = [judge(h, epoch(e, loss=1.0 + 0.01 * (-1) ** e))[0] for e in range(1, 6)]
    assert [m["train/is_improving"] for m in got[1:]] == [0, 1, 0, 1]  # 0.99, 1.01, 0.99, ...


def test_a_loss_that_keeps_falling_slowly_keeps_improving(tmp_path):
    """Fast at first, then 3 % an epoch under noise of about one standard error an epoch (as
    a converging real run): the trend over 8 epochs sees it; comparing each epoch with the
    last improvement ("best") misses it in about half the epochs."""
    best = _profile(tmp_path, '[improvement]\nmethod = "best"\n')
    for seed in range(3):
        seen = {}
        for p in (GAIT, best):
            rng = np.random.default_rng(seed)
            h = RunHealth("run", p)
            got = []
            for e in range(1, 31):
                level = 0.8 ** min(e, 8) * 0.97 ** max(0, e - 8)
                got.append(judge(h, noisy(e, level, 0.12 * level, rng)))
            seen[p.improvement_method] = [m["train/is_improving"] for m, _ in got[1:]]
            if p is GAIT:
                assert not any(ev for _, ev in got), seed  # not one event in 30 epochs
        assert seen["trend"] == [1] * 29
        assert seen["best"][:7] == [1] * 7 and seen["best"][7:].count(0) >= 11


def test_the_sem_is_the_standard_error_of_the_epoch_mean():
    h = health()
    inp = epoch(1, n=8, loss=0.5, jitter=0.1)
    m, _ = judge(h, inp)
    losses = inp.steps[0].loss
    assert m["train/batch_loss_sem"] == pytest.approx(losses.std(ddof=1) / math.sqrt(8))


# -- non-finite steps: a finding; the explosion diagnosis needs its symptoms -----------------
def test_one_nan_step_is_a_finding_not_a_learning_rate_diagnosis():
    h = health()
    judge(h, epoch(1))
    inp = epoch(2, ranks=2)
    inp.steps[1].loss[5] = math.nan
    m, ev = judge(h, inp)
    assert m["health/nonfinite"] == 1 and m["diagnosis/gradient_explosion"] == 0
    msg = events_of(ev, "nonfinite")[0]["message"]
    assert msg.startswith("1 non-finite values (NaN/Inf) this epoch; 1 non-finite step "
                          "(step 205); 1 loss (rank 1)"), msg
    assert events_of(ev, "diagnosis/gradient_explosion") == []
    m3, _ = judge(h, epoch(3, ranks=2))
    assert m3["health/nonfinite"] == 0 and m3["diagnosis/gradient_explosion"] == 0


def test_repeated_nan_steps_and_sustained_norms_are_the_explosion_diagnosis():
    h = health()
    for e in (1, 2, 3):
        inp = epoch(e)
        if e in (1, 3):
            inp.steps[0].loss[2] = math.nan  # one NaN step in two of the last five epochs
        m, ev = judge(h, inp)
    assert m["diagnosis/gradient_explosion"] == 1
    assert "nonfinite_steps_repeated" in events_of(ev, "diagnosis/gradient_explosion")[0][
        "message"]
    h = health()
    flags = [judge(h, epoch(e, grad=60.0 if e in (2, 3) else 1.0,
                            grad_jitter=50.0 if e in (2, 3) else 0.1))[0] for e in (1, 2, 3)]
    # norms up to 110 (mean 60) in one epoch are a spike; two epochs in a row are sustained
    assert [m["health/exploding_gradients"] for m in flags] == [0, 1, 1]
    assert [m["diagnosis/gradient_explosion"] for m in flags] == [0, 0, 1]


# -- the learning rate the run had ----------------------------------------------------------
def test_remedies_quote_the_actual_learning_rate_beside_the_config():
    rng = np.random.default_rng(0)
    h = health({"learning_rate": 2e-3})
    inp = noisy(1, 1.0, 0.1, rng, lr=20.0)
    inp.steps[0].grad_norm[3] = 500.0
    m, ev = judge(h, inp)
    assert (m["train/lr"], m["train/lr_min"], m["train/lr_max"]) == (20.0, 20.0, 20.0)
    remedy = events_of(ev, "exploding_gradients")[0]["remedy"]
    assert ("learning_rate is 20 at the last step (train/lr; the config says 2e-3); the "
            "guide suggests 1e-4") in remedy
    # between epochs (a non-finite step) the latest epoch's rate is quoted
    step = h.engine.rule_event("exploding_gradients", "x", h.config)
    assert "learning_rate is 20 at the last step" in step.remedy
    # the same rate as the config's: said once; no config: the step's alone
    same = health({"learning_rate": 20.0})
    _, ev = judge(same, inp)
    assert "learning_rate is 20; the guide" in events_of(ev, "exploding_gradients")[0]["remedy"]
    bare = RunHealth("run", GAIT)
    _, ev = judge(bare, inp)
    assert "learning_rate is 20 at the last step (train/lr); the guide suggests 1e-4" in \
        events_of(ev, "exploding_gradients")[0]["remedy"]


# -- samples against the training data --------------------------------------------------------
CONSTS_GAIT = DataConstants(list(gd.CHANNELS), None, None)


@pytest.fixture(scope="module")
def gait() -> gd.GaitDataset:
    return gd.make_dataset(gd.DataConfig(pseudo_dataset_len=512, window_len=64, seed=0))


def _feed_data(h: RunHealth, data: gd.GaitDataset | None = None, rows: int = 8192) -> None:
    data = data or gd.make_dataset(gd.DataConfig(pseudo_dataset_len=512, window_len=64))
    flat = data.windows.numpy().reshape(-1, len(gd.CHANNELS))
    for a in range(0, flat.shape[0], rows):  # log_data_stats' chunks: rows of channels
        h.on_data(flat[a:a + rows], "float32")


def _copies(e: int, data: gd.GaitDataset | None = None) -> ValidationInput:
    data = data or gd.make_dataset(gd.DataConfig(pseudo_dataset_len=512, window_len=64))
    one = data.windows.numpy()[100:101]
    return ValidationInput(e, "float32", [np.repeat(one, 64, axis=0)], list(gd.CHANNELS))


def test_copies_of_one_realistic_window_are_flagged_at_the_first_validation(gait):
    h = RunHealth("copies", GAIT)
    h.on_data_constants(DataConstants(list(gd.CHANNELS), gait.mean.double().numpy(),
                                      gait.std.double().numpy()))
    _feed_data(h, gait)
    m, ev = judge(h, epoch(1, validation=_copies(1, gait)))
    assert m["validation/duplicate_frac"] == 1.0 and m["validation/sample_diversity"] == 0.0
    assert m["validation/knee_healthy"] == 1 and m["validation/grf_healthy"] == 1  # guide: fine
    assert m["health/samples_duplicated"] == 1 and m["health/sample_diversity_low"] == 1
    (raised,) = events_of(ev, "samples_duplicated")
    assert raised["severity"] == "critical" and "100% of sample pairs" in raised["message"]
    # physical units for every channel: the knee figure equals the guide's knee_r_std
    assert m["validation/knee_angle_r_std"] == pytest.approx(m["validation/knee_r_std"])
    assert m["validation/hip_angle_r_mean"] == pytest.approx(
        float(gait.denormalize(gait.windows[100])[:, 0].mean()), rel=1e-5)


def test_independent_realistic_windows_are_not_flagged(gait):
    h = RunHealth("healthy", GAIT)
    h.on_data_constants(CONSTS_GAIT)
    _feed_data(h, gait)
    others = gd.make_dataset(gd.DataConfig(pseudo_dataset_len=64, window_len=64, seed=5))
    v = ValidationInput(1, "float32", [others.windows.numpy()], list(gd.CHANNELS))
    m, ev = judge(h, epoch(1, validation=v))
    assert m["validation/duplicate_frac"] < 0.02 and 0.7 < m["validation/sample_diversity"] < 1.3
    assert max(m[f"validation/{c}_w1"] for c in gd.CHANNELS) < 0.5
    assert not [e for e in ev if e["kind"] == "raised"]


def test_threshold_lines_are_in_the_records_at_validation_epochs(gait):
    h = RunHealth("lines", GAIT)
    h.on_data_constants(CONSTS_GAIT)
    _feed_data(h, gait)
    m1, _ = judge(h, epoch(1))
    m2, _ = judge(h, epoch(2, validation=_copies(2, gait)))
    assert not any(k.startswith("threshold/") for k in m1)
    lines = {k: v for k, v in m2.items() if k.startswith("threshold/")}
    assert lines == {"threshold/knee_r_std": 0.1, "threshold/grf_vz_r_std": 10.0,
                     "threshold/duplicate_frac": 0.2, "threshold/sample_diversity": 0.3,
                     **{f"threshold/{c}_w1": 1.0 for c in gd.CHANNELS}}


# -- any model: the generic profile -----------------------------------------------------------
def test_generic_is_a_packaged_profile_without_gait_wording():
    assert set(PACKAGED) >= {"gait_diffusion", "generic"}
    assert GENERIC.name == "generic" and not GENERIC.knee_channel and not GENERIC.grf_channel
    assert GENERIC.thresholds == {} and GENERIC.loss_terms == ()
    words = re.compile(r"knee|grf|GRF|gait|pseudo|\brad\b|\bN\b|1e-4|4e-4")
    for item in (*GENERIC.rules, *GENERIC.diagnoses):
        text = " ".join(str(getattr(item, f, "")) for f in ("message", "remedy", "cause"))
        text += " ".join(f"{k} {v}" for k, v in item.suggest)
        assert not words.search(text), (item.id, text)
        for name, c in getattr(item, "conditions", (("", getattr(item, "condition", None)),)):
            assert not any("knee" in x or "grf" in x for x in c.metrics), (item.id, name)


def test_a_run_with_other_channels_gets_the_generic_profile():
    h = RunHealth("dcgan", GAIT)
    h.on_config({"learning_rate": 4e-4})
    h.on_data_constants(DataConstants(["r", "g", "b"], None, None))
    assert h.profile.name == "generic"
    v = ValidationInput(1, "float32", [np.random.default_rng(0).standard_normal(
        (16, 32, 3)).astype(np.float32)], ["r", "g", "b"])
    m, ev = judge(h, epoch(1, validation=v, grad=150.0))
    assert {f"validation/{c}_{k}" for c in "rgb" for k in ("std", "mean")} <= set(m)
    assert not any("knee" in k or "grf" in k for k in m)
    remedy = events_of(ev, "exploding_gradients")[0]["remedy"]
    assert remedy == ("Lower the learning rate (e.g. 4x); add gradient clipping. "
                      "learning_rate is 4e-4; the guide suggests a lower value.")


def test_gait_channels_a_users_rules_or_late_channels_keep_the_profile(tmp_path):
    gait = RunHealth("gait", GAIT)
    gait.on_data_constants(CONSTS)  # knee_angle_r and grf_vz_r among them
    assert gait.profile is GAIT
    own = RunHealth("own", _profile(tmp_path, "[rules.stalled]\nraise_after = 12\n"))
    own.on_data_constants(DataConstants(["r", "g", "b"], None, None))
    assert own.profile.name == "gait_diffusion"
    late = RunHealth("late", GAIT)
    judge(late, epoch(1))
    late.on_data_constants(DataConstants(["r", "g", "b"], None, None))
    assert late.profile is GAIT  # chosen when the first epoch closed: never mixed
    first = RunHealth("first", GAIT)  # channels first seen in the first epoch's samples
    v = ValidationInput(1, "float32", [np.ones((4, 8, 2), np.float32)], ["x", "y"])
    judge(first, epoch(1, validation=v))
    assert first.profile.name == "generic"


def test_a_file_can_build_on_the_generic_profile(tmp_path):
    p = _profile(tmp_path, 'base = "generic"\n[rules.samples_duplicated]\nthreshold = 0.5\n')
    assert p.base == "generic" and not p.switchable
    assert next(r for r in p.rules if r.id == "samples_duplicated").condition.threshold == 0.5
    assert "knee_collapsed" not in {r.id for r in p.rules}


# -- the training data the collector keeps ------------------------------------------------------
def test_the_subsample_is_bounded_spread_evenly_and_deterministic():
    rng = np.random.default_rng(1)
    data = rng.standard_normal((100_000, 4)).astype(np.float32)
    keep = TrainingSubsample(block_rows=1000, max_values=40_000)  # 10 blocks of 1000 x 4
    for a in range(0, data.shape[0], 7_777):  # chunks that cut across blocks
        keep.add(data[a:a + 7_777], "float32")
        assert keep.held_values <= 40_000 + 1000 * 4
    assert keep.stride == 16 and sorted(keep.blocks) == list(range(0, 100, 16))
    for b, rows in keep.blocks.items():
        assert np.array_equal(rows, data[b * 1000:(b + 1) * 1000])
    again = TrainingSubsample(block_rows=1000, max_values=40_000)
    for a in range(0, data.shape[0], 30_000):
        again.add(data[a:a + 30_000], "float32")
    assert sorted(again.blocks) == sorted(keep.blocks)
    ref, ref2 = (k.reference(50, 4, diversity_config(GAIT)) for k in (keep, again))
    assert np.array_equal(ref.windows, ref2.windows)


def test_the_reference_holds_whole_training_windows(gait):
    windows = gait.windows.numpy()  # (512, 64, 8): the data log_data_stats flattens
    keep = TrainingSubsample(block_rows=4096, max_values=2 ** 21)
    flat = windows.reshape(-1, 8)
    for a in range(0, flat.shape[0], 5000):
        keep.add(flat[a:a + 5000], "float32")
    assert keep.held_values == flat.size  # the whole set fits the default bound
    ref = keep.reference(64, 8, diversity_config(GAIT))
    whole = DataReference.build([flat], "float32", 64, diversity_config(GAIT))
    assert np.array_equal(ref.windows, whole.windows)
    assert keep.reference(64, 3, diversity_config(GAIT)) is None  # other channels
    assert keep.reference(10 ** 6, 8, diversity_config(GAIT)) is None  # longer than the data


# -- the backtest's reading of the records ------------------------------------------------------
def test_findings_pair_each_raise_with_its_clear():
    from collector.analysis.findings import findings, format_findings
    from collector.records import CLEARED, RAISED, EpochRecord, Event, EventRecord, RunRecord

    def ev(rule: str, kind: str) -> Event:
        return Event(rule, kind, "warning" if kind == RAISED else "info", f"{rule} {kind}")

    records = [
        RunRecord("a", 1), RunRecord("b", 1),
        EpochRecord("a", 1, {}, (ev("stalled", RAISED),)),
        EventRecord("a", 1, 17, 2, (ev("nonfinite", RAISED),)),
        EpochRecord("a", 2, {}, (ev("nonfinite", CLEARED),)),
        EpochRecord("a", 2, {}, (ev("stalled", RAISED),), amends=True),  # said again
        EpochRecord("a", 3, {}, (ev("stalled", CLEARED), ev("nonfinite", RAISED))),
        EpochRecord("b", 1, {}),
    ]
    found = findings(records)
    a = [(e.rule, e.raised, e.step, e.rank, e.cleared) for e in found["a"]]
    assert a == [("stalled", 1, None, None, 3), ("nonfinite", 1, 17, 2, 2),
                 ("nonfinite", 3, None, None, None)]
    assert found["b"] == []
    text = format_findings(records)
    assert "run a: 3 epochs, 3 raises" in text and "run b: 1 epochs, 0 raises" in text
    assert ("nonfinite  warning   raised at epoch 1 (step 17, rank 2), cleared at epoch 2; "
            "raised at epoch 3, still raised at the end") in text
    assert "stalled    warning   raised at epoch 1, cleared at epoch 3" in text
