"""The rules profile: the seed default, user overrides, errors that name the file and key."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_rules import judge

from collector.analysis.health import RunHealth
from collector.analysis.inputs import EpochInput, StepSeries
from collector.analysis.profile import ProfileError
from collector.analysis.profile_load import DEFAULT_PATH, load_profile


def _write(tmp_path, text: str) -> str:
    p = tmp_path / "user.toml"
    p.write_text(text)
    return str(p)


def _rule(profile, rid):
    return next(r for r in profile.rules if r.id == rid)


def _epoch(e: int, grad: float) -> EpochInput:
    s = StepSeries(np.arange(4, dtype=np.int64) + 10 * e, np.array([1.0, 1.1, 0.9, 1.0]) / e,
                   np.full(4, grad))
    return EpochInput("run", e, 1, {0: s}, {}, {}, [])


def test_default_profile_is_the_seed_guide():
    p = load_profile(None)
    assert p.name == "gait_diffusion" and p.source == str(DEFAULT_PATH)
    assert (p.knee_channel, p.grf_channel) == ("knee_angle_r", "grf_vz_r")
    assert (p.knee_healthy_std, p.grf_healthy_std) == (0.1, 10.0)
    assert [p.phase(e) for e in (1, 50, 51, 200, 201)] == [1, 1, 2, 2, 3]
    seed = {"exploding_gradients": 100.0, "vanishing_gradients": 0.001,
            "batch_loss_cv_low": 0.01, "exploding_weights": 10.0, "dead_neurons": 0.001,
            "weights_jump": 0.5, "ema_diff_high": 1.0, "loss_term_dominant": 0.9,
            "gen_std_low": 0.1, "gen_range_low": 0.5, "knee_collapsed": 0.05,
            "grf_collapsed": 1.0}
    for rid, threshold in seed.items():
        assert _rule(p, rid).condition.threshold == threshold, rid
    # Departures calibrated on healthy real runs (the TOML says why, beside each key).
    assert _rule(p, "batch_loss_flat").condition.threshold == 0.001  # guide: 0.01
    stalled = _rule(p, "stalled")  # the guide's 10 consecutive epochs, as hysteresis
    assert (stalled.condition.kind, stalled.raise_after, stalled.clear_after) == \
        ("threshold", 10, 3)
    assert (p.improvement_method, p.improvement_margin, p.improvement_window) == \
        ("trend", 2.0, 8)
    surge = _rule(p, "grad_norm_unstable").condition
    assert (surge.factor, surge.window, surge.min_count) == (3.0, 10, 3)
    mc = next(d for d in p.diagnoses if d.id == "mode_collapse")
    conds = dict(mc.conditions)
    assert mc.require == 3 and len(conds) == 8 and mc.score
    assert conds["no_gradient_diversity"].threshold == 0.02  # guide: 0.1
    assert {"samples_duplicated", "diversity_low"} <= set(conds)  # beyond the guide
    assert {d.id for d in p.diagnoses} == {"validation_bad_while_loss_falls", "loss_not_falling",
                                           "gradient_explosion", "mode_collapse"}
    assert all(d.cause and d.remedy for d in p.diagnoses)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.knee_channel = "x"  # type: ignore[misc]


def test_user_file_overrides_single_keys_and_keeps_the_rest(tmp_path):
    p = load_profile(_write(tmp_path, """
[rules.exploding_gradients]
threshold = 50.0
[phases]
ends = [10, 20]
[diagnoses.mode_collapse]
require = 2
[diagnoses.mode_collapse.conditions.gen_std_low]
threshold = 0.2
"""))
    rule = _rule(p, "exploding_gradients")
    default = _rule(load_profile(None), "exploding_gradients")
    assert rule.condition.threshold == 50.0
    assert (rule.message, rule.severity, rule.remedy) == (default.message, default.severity,
                                                          default.remedy)
    assert p.phase(15) == 2 and p.phase(21) == 3
    mc = next(d for d in p.diagnoses if d.id == "mode_collapse")
    conds = dict(mc.conditions)
    assert mc.require == 2 and conds["gen_std_low"].threshold == 0.2
    assert conds["gen_std_low"].latest and len(conds) == 8
    h = RunHealth("run", p)
    judge(h, _epoch(1, 1.0))
    m, ev = judge(h, _epoch(2, 60.0))
    assert m["health/exploding_gradients"] == 1 and ev[0]["rule"] == "exploding_gradients"


def test_rules_can_be_switched_off_and_added(tmp_path):
    p = load_profile(_write(tmp_path, """
[rules.loss_increasing]
enabled = false
[rules.grad_norm_high]
kind = "threshold"
metric = "train/grad_norm_mean"
op = ">"
threshold = 5.0
severity = "warning"
message = "grad_norm_mean {value:g} above {threshold:g}"
remedy = "Clip."
"""))
    assert "loss_increasing" not in {r.id for r in p.rules}
    h = RunHealth("run", p)
    judge(h, _epoch(1, 1.0))
    m, ev = judge(h, _epoch(2, 8.0))
    assert "health/loss_increasing" not in m and m["health/grad_norm_high"] == 1
    assert {"rule": "grad_norm_high", "kind": "raised", "severity": "warning",
            "message": "grad_norm_mean 8 above 5", "remedy": "Clip."} in ev


BAD = [
    ("[rules.stalled]\nop = \"=>\"\n", "rules.stalled.op", "expected one of"),
    ("[rules.stalled]\nlenght = 3\n", "rules.stalled.lenght", "unknown key"),
    ("[rules.stalled]\nraise_after = 0\n", "rules.stalled.raise_after", "positive integer"),
    ("[hysteresis]\nclear_after = -1\n", "hysteresis.clear_after", "positive integer"),
    ("[hysteresis]\nhold = 2\n", "hysteresis.hold", "unknown key"),
    ("[improvement]\nmethod = \"median\"\n", "improvement.method", "expected one of"),
    ("[improvement]\nmargin = -1\n", "improvement.margin", "a number >= 0"),
    ("[diversity]\nduplicate_rms = 0\n", "diversity.duplicate_rms", "a number > 0"),
    ("[rules.loss_increasing]\nline = true\n", "rules.loss_increasing.line", "threshold rule"),
    ("[rules.ema_diff_surge]\nline = true\n", "rules.ema_diff_surge.line", "threshold rule"),
    ("[rules.phase3_loss_drop_large]\nrelative = 1\n", "rules.phase3_loss_drop_large.relative",
     "true or false"),
    ("[rules.ema_diff_surge]\nrelative = true\n", "rules.ema_diff_surge.relative",
     "unknown key"),
    ("[rules.ema_diff_surge]\nfloor = -1\n", "rules.ema_diff_surge.floor", "a number >= 0"),
    ("[rules.exploding_gradients]\nfloor = 1\n", "rules.exploding_gradients.floor",
     "unknown key"),
    ("[remedies.actual]\nlearning_rate = 3\n", "remedies.actual.learning_rate", "a string"),
    ("base = \"gait\"\n", "base", "expected one of"),
    ("[rules.stalled]\nkind = \"wobble\"\n", "rules.stalled.kind", "unknown kind"),
    ("[rules.stalled]\nseverity = \"loud\"\n", "rules.stalled.severity", "expected one of"),
    ("[rules.stalled]\nmessage = \"{nope}\"\n", "rules.stalled.message", "bad message template"),
    ("[rules.ema_diff_surge]\nmetric = [\"a\", \"b\"]\n", "rules.ema_diff_surge.metric",
     "takes one metric"),
    ("[rules.ema_diff_surge]\nmin_count = 20\n", "rules.ema_diff_surge.min_count",
     "larger than window"),
    ("[rules.new_rule]\nkind = \"threshold\"\nmetric = \"x\"\nop = \">\"\nthreshold = 1\n",
     "rules.new_rule.severity", "missing"),
    ("[diagnoses.mode_collapse]\nrequire = 9\n", "diagnoses.mode_collapse.require", "exceeds"),
    ("[validation]\nknee_healthy_std = \"big\"\n", "validation.knee_healthy_std",
     "expected a number"),
    ("[phases]\nends = [200, 50]\n", "phases.ends", "increasing"),
    ("[rules.exploding_gradients.suggest]\nlearning_rate = true\n",
     "rules.exploding_gradients.suggest.learning_rate", "expected a number"),
    ("colour = 3\n", "colour", "unknown key"),
]


@pytest.mark.parametrize(("text", "key", "problem"), BAD)
def test_errors_name_the_file_and_the_key(tmp_path, text, key, problem):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert problem in msg
    assert isinstance(info.value, ValueError)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ProfileError, match="missing.toml: cannot read"):
        load_profile(str(tmp_path / "missing.toml"))
    with pytest.raises(ProfileError, match="user.toml: not valid TOML"):
        load_profile(_write(tmp_path, "[rules\n"))


def test_actions_stop_nothing_by_default_and_name_findings(tmp_path):
    from collector.analysis.profile_load import with_stop_on

    for name in (None, "generic"):
        p = load_profile(name)
        assert p.stop_on == () and (p.stop_margin_s, p.stop_min_steps) == (10.0, 10)
        assert "diagnosis/mode_collapse" in p.finding_ids and "nonfinite" in p.finding_ids
    p = load_profile(_write(tmp_path, '[actions]\nstop_on = ["diagnosis/gradient_explosion",'
                                      ' "nonfinite"]\nstop_margin_s = 2.5\n'))
    assert p.stop_on == ("diagnosis/gradient_explosion", "nonfinite") and p.stop_margin_s == 2.5
    assert with_stop_on(p, ["diagnosis/mode_collapse"]).stop_on == ("diagnosis/mode_collapse",)
    with pytest.raises(ProfileError, match="--stop-on: no finding 'gradient_explosion'"):
        with_stop_on(p, ["gradient_explosion"])  # a diagnosis is named diagnosis/<id>


@pytest.mark.parametrize(("text", "key", "problem"), [
    ('[actions]\nstop_on = ["diagnosis/nope"]', "actions.stop_on", "no finding"),
    ("[actions]\nstop_on = \"nonfinite\"", "actions.stop_on", "a list of names"),
    ("[actions]\nstop_margin_s = 0", "actions.stop_margin_s", "a number > 0"),
    ("[actions]\nstop_min_steps = 1.5", "actions.stop_min_steps", "a positive integer"),
    ("[actions]\nstop_after = 3", "actions.stop_after", "unknown key"),
])
def test_bad_actions_name_the_file_and_the_key(tmp_path, text, key, problem):
    path = _write(tmp_path, text)
    with pytest.raises(ProfileError) as err:
        load_profile(path)
    assert f"{path}: {key}:" in str(err.value) and problem in str(err.value)
