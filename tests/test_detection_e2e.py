"""Detection on real training: the gait-diffusion model trained on CPU through a real
collector process, one run per case (``tests/workers/detection_runs.py``), then the
recording replayed with ``--findings`` as a user tuning a profile would.

- a healthy run of 24 epochs ends with nothing raised;
- a flat loss (lr 1e-8) is a stall by epoch 12, and stays one, and nothing else;
- a sampler returning copies of one realistic window is flagged at that validation;
- a single NaN step is a non-finite finding, not a learning-rate diagnosis;
- an explosion's remedy quotes the learning rate the optimizer really had;
- a model with other channels is judged by the generic profile, per channel.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT, CollectorProc, env, finish, replayed_jsonl

WORKER = ROOT / "tests" / "workers" / "detection_runs.py"
# two processes, one per core: about 25 s of training each
SPLIT = (["healthy", "renamed"], ["flat", "copies", "nan_step", "exploding"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detection")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "2").start()
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--endpoint", col.endpoint,
                               "--out", str(tmp / "sent"), *names], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for names in SPLIT]
    finish(procs, timeout=240)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    records: dict[str, list[dict]] = {}
    for rec in col.records():
        records.setdefault(rec["run"], []).append(rec)
    sent = {p.stem: json.loads(p.read_text()) for p in (tmp / "sent").glob("*.json")}
    assert all(s["stats"]["dropped"] == 0 for s in sent.values())
    return tmp, col, records, sent


def _epochs(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["type"] == "epoch"]


def _raises(recs: list[dict]) -> list[tuple[int, str]]:
    return [(r["epoch"], ev["rule"]) for r in recs for ev in r["events"]
            if ev["kind"] == "raised"]


def _flag(rule: str) -> str:
    return rule if rule.startswith("diagnosis/") else f"health/{rule}"


def test_a_replay_of_the_recording_equals_the_live_output(runs):
    tmp, col, _, _ = runs
    assert replayed_jsonl(col.record, tmp) == col.jsonl.read_bytes()


def test_a_healthy_run_raises_nothing(runs):
    recs = runs[2]["det-healthy"]
    epochs = _epochs(recs)
    assert len(epochs) == 24 and len(_raises(recs)) <= 2
    last = epochs[-1]
    assert last["raised"] == [] and epochs[-1]["metrics"]["train/total_loss"] < \
        0.25 * epochs[0]["metrics"]["train/total_loss"]
    improving = [e["metrics"]["train/is_improving"] for e in epochs[1:]]
    assert sum(improving) >= 20
    for e in epochs:
        m = e["metrics"]
        if e["epoch"] % 6 == 0:  # samples every 6 epochs: the figures and their thresholds
            assert m["validation/duplicate_frac"] < 0.05 and m["validation/sample_diversity"] > 0.5
            assert m["threshold/knee_r_std"] == 0.1 and m["threshold/duplicate_frac"] == 0.2
        else:
            assert not any(k.startswith(("validation/", "threshold/")) for k in m)


def test_a_flat_loss_is_a_stall_by_epoch_twelve_and_stays_one(runs):
    recs = runs[2]["det-flat"]
    epochs = _epochs(recs)
    stall = [r for r in ("stalled", "diagnosis/loss_not_falling")
             if any(e["metrics"].get(_flag(r)) == 1 for e in epochs if e["epoch"] <= 12)]
    assert stall, [(e["epoch"], e["raised"]) for e in epochs]
    for rule in stall:
        first = next(e["epoch"] for e in epochs if e["metrics"].get(_flag(rule)) == 1)
        assert all(e["metrics"][_flag(rule)] == 1 for e in epochs if e["epoch"] >= first)
        assert [ev for r in recs for ev in r["events"] if ev["rule"] == rule
                and ev["kind"] == "cleared"] == []
    assert sum(e["metrics"]["train/is_improving"] for e in epochs[1:]) <= 1
    # A model that does not move raises only "no progress" findings: its EMA, warming up
    # from the model's copy at ema_diff ~1e-9, is no surge.
    assert {rule for _, rule in _raises(recs)} <= {
        "stalled", "phase1_not_improving", "diagnosis/loss_not_falling"}, _raises(recs)


def test_copies_of_one_realistic_window_are_flagged_at_that_validation(runs):
    recs = runs[2]["det-copies"]
    by_epoch = {e["epoch"]: e for e in _epochs(recs)}
    good, copies = by_epoch[3]["metrics"], by_epoch[6]["metrics"]
    assert good["validation/duplicate_frac"] < 0.05 and good["health/samples_duplicated"] == 0
    assert copies["validation/duplicate_frac"] == 1.0
    assert copies["validation/sample_diversity"] == 0.0
    # the guide's own figures pass: one real window has a real knee and GRF spread
    assert copies["validation/knee_healthy"] == 1 and copies["validation/grf_healthy"] == 1
    assert (6, "samples_duplicated") in _raises(recs)
    assert not [r for e, r in _raises(recs) if e < 6]
    (ev,) = [ev for ev in by_epoch[6]["events"] if ev["rule"] == "samples_duplicated"]
    assert ev["severity"] == "critical" and "100% of sample pairs" in ev["message"]


def test_one_nan_step_is_a_non_finite_finding(runs):
    recs, sent = runs[2]["det-nan_step"], runs[3]["det-nan_step"]
    (bad,) = sent["nan_steps"]
    (step_rec,) = [r for r in recs if r["type"] == "event"]
    assert step_rec["step"] == bad and step_rec["rank"] == 0
    assert f"rank 0 step {bad}: non-finite loss" in step_rec["events"][0]["message"]
    assert "learning_rate" not in step_rec["events"][0]["remedy"]
    flags = {e["epoch"]: e["metrics"] for e in _epochs(recs)}
    assert flags[3]["health/nonfinite"] == 1 and flags[4]["health/nonfinite"] == 0
    assert all(m["diagnosis/gradient_explosion"] == 0 for m in flags.values())
    assert [r for _, r in _raises(recs)] == ["nonfinite"]


def test_the_explosion_remedy_quotes_the_actual_learning_rate(runs):
    recs, sent = runs[2]["det-exploding"], runs[3]["det-exploding"]
    lrs = {e["epoch"]: e["metrics"]["train/lr"] for e in _epochs(recs)}
    assert lrs == dict(enumerate(sent["lr"], start=1)) and lrs[3] == 2.0
    ev = next(ev for r in recs for ev in r["events"]
              if ev["rule"] == "diagnosis/gradient_explosion" and ev["kind"] == "raised")
    assert ("learning_rate is 2 at the last step (train/lr; the config says 1e-3); the guide "
            "suggests 1e-4") in ev["remedy"]


def test_a_model_with_other_channels_gets_the_generic_profile(runs):
    recs = runs[2]["det-renamed"]
    last = _epochs(recs)[-1]["metrics"]
    channels = [f"c{i}" for i in range(8)]
    assert {f"validation/{c}_{k}" for c in channels for k in ("std", "mean", "w1")} <= set(last)
    assert {f"threshold/{c}_w1" for c in channels} <= set(last)
    assert not any("knee" in k or "grf" in k for k in last)  # no gait columns, no gait rules
    assert "health/phase2_quality_not_reached" not in last
    assert _raises(recs) == []


def test_findings_say_when_each_rule_was_raised_and_cleared(runs):
    tmp, col, records, _ = runs
    tuned = tmp / "tuned.toml"
    tuned.write_text("[rules.stalled]\nraise_after = 6\n")
    outs = {}
    for name, extra in (("default", []), ("tuned", ["--rules", str(tuned)])):
        r = subprocess.run([sys.executable, "-m", "collector", "replay", str(col.record),
                            "--findings", *extra], env=env(), cwd=tmp, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        outs[name] = r.stdout
    out = outs["default"]
    assert "run det-healthy: 24 epochs, 0 raises\n  no rule raised" in out
    # every raise of the live output is in the findings, with its epoch
    for run, recs in records.items():
        block = out.split(f"run {run}:")[1].split("\nrun ")[0]
        for epoch, rule in _raises(recs):
            line = next(x for x in block.splitlines() if x.split()[:1] == [rule])
            assert f"raised at epoch {epoch}" in line
    assert "nonfinite  critical  raised at epoch 3 (step " in out and "cleared at epoch 4" in out
    flat = out.split("run det-flat:")[1].split("\nrun ")[0]
    assert "stalled" in flat and "still raised at the end" in flat
    tuned_flat = outs["tuned"].split("run det-flat:")[1].split("\nrun ")[0]
    assert "stalled" in tuned_flat
    epoch_of = {o: int(b.split("stalled")[1].split("raised at epoch ")[1].split(",")[0])
                for o, b in (("default", flat), ("tuned", tuned_flat))}
    assert epoch_of["tuned"] == epoch_of["default"] - 4  # 6 epochs in a row instead of 10


def test_a_packaged_profile_by_name_on_the_command_line(runs):
    tmp, col, _, _ = runs
    out = tmp / "generic.jsonl"
    r = subprocess.run([sys.executable, "-m", "collector", "replay", str(col.record),
                        "--rules", "generic", "--jsonl", str(out)], env=env(), cwd=tmp,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    healthy = [r for r in map(json.loads, out.read_text().splitlines())
               if r["run"] == "det-healthy" and r["type"] == "epoch"]
    last = healthy[-1]["metrics"]
    assert "validation/knee_angle_r_std" in last and "validation/knee_r_std" not in last
    assert "threshold/knee_r_std" not in last and "health/knee_collapsed" not in last
