"""The health rules end to end: real training runs trip each rule, a real collector judges them,
and a replay of its recording gives every verdict back, byte for byte.

One ``trainwatch collect`` process serves every run. Three processes of
``tests/workers/scenarios.py`` are the three ranks of two jobs whose gradients are
all-reduced over gloo (``ddp``, ``rank_desync``); two of them then run the single-rank
scenarios, one per rule and per diagnosis of the default profile, plus one healthy run.
Phases are shortened (``--rules``: phase 1 ends at epoch 3, phase 2 at epoch 6) so the
phase expectations are reached in a few epochs, and so are what the phase rules wait for
(2 epochs in a row without improvement in phase 1; the phase-3 loss trend over 2 epochs).
Every figure the collector wrote is recomputed with numpy from what the workers sent.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
from conftest import ROOT, CollectorProc, env, finish, rank_list
from test_diversity import ref_across_std, ref_distances, ref_w1

from collector.analysis.profile import Profile
from collector.analysis.profile_load import load_profile

SCENARIOS = ROOT / "tests" / "workers" / "scenarios.py"
PHASES = """[phases]
ends = [3, 6]
[rules.phase1_not_improving]
raise_after = 2
[rules.phase3_loss_drop_large]
window = 2
min_count = 2
"""
MULTI = ["ddp", "rank_desync"]
# Single-rank scenarios, split between the rank-0 and rank-1 processes (two cores).
SINGLE = {
    0: ["healthy", "exploding_gradients", "vanishing_gradients", "grad_norm_unstable",
        "batch_loss_flat", "batch_loss_cv_low", "exploding_weights", "dead_neurons",
        "weights_jump", "ema_diff_high", "ema_diff_surge", "stalled"],
    1: ["loss_increasing", "loss_term_dominant", "gen_std_low", "gen_range_low",
        "knee_collapsed", "grf_collapsed", "samples_unlike_data", "nonfinite",
        "phase3_expectations",
        "gradient_explosion", "mode_collapse", "loss_not_falling",
        "validation_bad_while_loss_falls"],
}
# scenario -> what must fire in it: (rule id or "diagnosis/<id>", the epoch it starts firing,
# the epoch it clears or None). The epochs follow from how each scenario is engineered.
EXPECT: dict[str, list[tuple[str, int, int | None]]] = {
    "exploding_gradients": [("exploding_gradients", 2, 3)],
    "vanishing_gradients": [("vanishing_gradients", 2, 3)],
    "grad_norm_unstable": [("grad_norm_unstable", 4, 5)],  # a surge needs 3 epochs before
    "batch_loss_flat": [("batch_loss_flat", 1, None)],
    "batch_loss_cv_low": [("batch_loss_cv_low", 1, None)],
    "exploding_weights": [("exploding_weights", 2, 3)],
    "dead_neurons": [("dead_neurons", 2, None)],
    "weights_jump": [("weights_jump", 2, 3)],
    "ema_diff_high": [("ema_diff_high", 2, 3)],
    "ema_diff_surge": [("ema_diff_surge", 4, 5)],
    "stalled": [("stalled", 11, None)],  # is_improving exists from epoch 2: 10 in a row
    # two rises of over 3 standard errors in a row; cleared after two epochs that fall
    "loss_increasing": [("loss_increasing", 3, 5), ("phase1_not_improving", 3, 4)],
    "loss_term_dominant": [("loss_term_dominant", 1, 3)],  # clear_after 2
    # nearly constant samples are near-duplicates too; one damped channel lowers diversity
    "gen_std_low": [("gen_std_low", 1, 2), ("samples_duplicated", 1, 2)],
    "gen_range_low": [("gen_range_low", 1, 2)],
    "knee_collapsed": [("knee_collapsed", 1, 2), ("sample_diversity_low", 1, 2)],
    "grf_collapsed": [("grf_collapsed", 1, 2)],
    "samples_unlike_data": [("samples_unlike_data", 4, 5)],  # phase 2 starts at epoch 4
    "nonfinite": [("nonfinite", 2, 3)],
    "phase3_expectations": [("phase2_quality_not_reached", 7, None),
                            ("phase3_loss_drop_large", 7, None)],
    "rank_desync": [("rank_desync", 2, 3)],
    "gradient_explosion": [("diagnosis/gradient_explosion", 1, None)],
    "mode_collapse": [("diagnosis/mode_collapse", 1, None)],
    # 5 of the last 10 epochs without improvement, and the trend flat: from epoch 6
    "loss_not_falling": [("diagnosis/loss_not_falling", 6, None)],
    "validation_bad_while_loss_falls": [("diagnosis/validation_bad_while_loss_falls", 4,
                                         None)],  # phase 2 starts at epoch 4
}
ALL = MULTI + SINGLE[0] + SINGLE[1]
RTOL = 1e-6
# Weight sums are float32 per parameter (on the device), then float64 across parameters.
RTOL_WEIGHTS = 1e-5


@dataclass
class Replayed:
    records: dict[str, list[dict]]  # run -> its records, in order
    sent: dict[str, dict[int, dict]]  # run -> rank -> what that rank sent
    profile: Profile


@pytest.fixture(scope="module")
def replayed(tmp_path_factory) -> Replayed:
    tmp = tmp_path_factory.mktemp("rules")
    rules = tmp / "phases.toml"
    rules.write_text(PHASES)
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "2",
                        "--rules", str(rules)).start()
    sent_dir = tmp / "sent"
    procs = [subprocess.Popen(
        [sys.executable, str(SCENARIOS), "--endpoint", col.endpoint, "--out", str(sent_dir),
         "--rank", str(rank), "--world", "3", "--init", f"file://{tmp}/rendezvous",
         *MULTI, *SINGLE.get(rank, [])],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for rank in range(3)]
    finish(procs, timeout=240)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    outs = [tmp / "replay_a.jsonl", tmp / "replay_b.jsonl"]
    replays = [subprocess.Popen([sys.executable, "-m", "collector", "replay", str(col.record),
                                 "--jsonl", str(out), "--rules", str(rules)],
                                env=env(), cwd=tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for out in outs]
    for p in replays:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    a, b = (out.read_bytes() for out in outs)
    assert a == b, "two replays of one recording differ"
    assert a == col.jsonl.read_bytes(), "the replay differs from the live collector's output"
    records: dict[str, list[dict]] = {}
    for line in a.decode().splitlines():
        rec = json.loads(line)
        records.setdefault(rec["run"], []).append(rec)
    sent: dict[str, dict[int, dict]] = {}
    for path in sent_dir.glob("*.json"):
        s = json.loads(path.read_text())
        assert s["stats"]["dropped"] == 0, f"{path.name}: the client dropped messages"
        sent.setdefault(s["run"], {})[s["rank"]] = s
    return Replayed(records, sent, load_profile(rules))


# -- helpers ----------------------------------------------------------------------------------
def _epochs(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["type"] == "epoch"]


def _events(recs: list[dict]) -> list[tuple[int | None, dict]]:
    """(epoch, event) in order, the immediate step events included."""
    return [(r.get("epoch"), ev) for r in recs for ev in r.get("events", [])]


def _one(recs: list[dict], kind: str) -> dict:
    found = [r for r in recs if r["type"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} records"
    return found[0]


def _flag(target: str) -> str:
    return target if target.startswith("diagnosis/") else f"health/{target}"


def _finite(values) -> np.ndarray:
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    return a[np.isfinite(a)]


def _close(actual: float, expected: float, rtol: float = RTOL) -> bool:
    return math.isclose(actual, expected, rel_tol=rtol, abs_tol=1e-12)


def _sent_epoch(sent: dict[int, dict], epoch: int) -> dict[int, dict]:
    return {r: next(e for e in s["epochs"] if e["epoch"] == epoch) for r, s in sent.items()}


def _improving(points: list[tuple[float, float]], margin: float, window: int) -> int:
    """The profile's "trend" test: the least-squares slope of the last ``window`` epoch
    losses below -margin standard errors (from each epoch's sem)."""
    pts = points[-window:]
    if len(pts) < 2:
        return 0
    x = np.arange(len(pts)) - (len(pts) - 1) / 2
    y, s = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
    slope = np.polyfit(x, y, 1)[0]
    return int(slope < -margin * math.sqrt(np.sum(x ** 2 * s ** 2)) / np.sum(x ** 2))


def _samples_reference(meta: dict, x: np.ndarray) -> dict[str, float]:
    """The diversity figures with numpy: the reference windows are the training rows cut
    into windows of the samples' length (the collector keeps all of so small a set)."""
    data = np.asarray(meta["data"], dtype=np.float32).astype(np.float64)
    steps = x.shape[1]
    windows = data[: data.shape[0] // steps * steps].reshape(-1, steps, data.shape[1])
    std = windows.reshape(-1, data.shape[1]).std(axis=0)
    pair = np.median(ref_distances(windows, 1 / std, 4096))
    dist = ref_distances(x, 1 / std, 4096)
    out = {"validation/sample_diversity": float(np.mean(ref_across_std(x) /
                                                        ref_across_std(windows))),
           "validation/duplicate_frac": float(np.mean(dist < 0.1 * pair))}
    for c, name in enumerate(meta["channels"]):
        phys = x[:, :, c] * meta["data_std"][c] + meta["data_mean"][c]
        out[f"validation/{name}_w1"] = ref_w1(x[:, :, c].ravel(), windows[:, :, c].ravel()) \
            / std[c]
        out[f"validation/{name}_std"] = phys.std()
        out[f"validation/{name}_mean"] = phys.mean()
    return out


def _reference(sent: dict[int, dict], epoch: int, prev_loss: float | None,
               points: list[tuple[float, float]], profile: Profile) -> dict[str, float]:
    """The epoch's metrics recomputed with numpy from what every rank sent; ``points`` are
    the earlier epochs' (loss, sem), this one's appended here."""
    eps = _sent_epoch(sent, epoch)
    first = eps[min(eps)]  # all-reduced values: the lowest rank's
    meta = sent[min(sent)]
    out: dict[str, float] = {}
    loss = _finite(np.concatenate([e["loss"] for e in eps.values()]))
    if loss.size:
        mean, std = loss.mean(), loss.std()
        out.update({"train/batch_loss_mean": mean, "train/batch_loss_std": std,
                    "train/batch_loss_max": loss.max(), "train/batch_loss_min": loss.min(),
                    "train/total_loss": mean})
        if mean != 0:
            out["train/batch_loss_cv"] = std / abs(mean)
        sem = loss.std(ddof=1) / math.sqrt(loss.size)
        out["train/batch_loss_sem"] = sem
        points.append((mean, sem))
        if prev_loss is not None:
            out["train/loss_decrease"] = prev_loss - mean
            out["train/loss_decrease_pct"] = 100.0 * (prev_loss - mean) / prev_loss
            out["train/is_improving"] = _improving(points, profile.improvement_margin,
                                                   profile.improvement_window)
    gn = _finite(first["grad_norm"])
    if gn.size:
        out.update({"train/grad_norm_mean": gn.mean(), "train/grad_norm_std": gn.std(),
                    "train/grad_norm_max": gn.max(), "train/grad_norm_min": gn.min()})
    means = {name: _finite(np.concatenate([e["components"][name] for e in eps.values()])).mean()
             for name in first["components"]}
    total = sum(means.values())
    out.update({f"loss_ratio/{name}": m / total for name, m in means.items()})
    w = first["weights"]
    if all(math.isfinite(v) for v in w.values()):
        out.update({"model/weight_mean": w["mean_abs"], "model/weight_std": w["std"],
                    "model/weight_max": w["max_abs"]})
    if math.isfinite(first["ema_diff"]):
        out["model/ema_diff"] = first["ema_diff"]
    samples = [np.asarray(e["samples"]) for _, e in sorted(eps.items()) if e["samples"]]
    if samples:
        out.update(_samples_reference(meta, np.concatenate(samples).astype(np.float64)
                                      .reshape(-1, 8, 2)))  # 32 windows of 8 per rank
        x = np.concatenate(samples).astype(np.float64)
        fin = _finite(x)
        out.update({"validation/gen_std": fin.std(), "validation/gen_mean": fin.mean(),
                    "validation/gen_range": fin.max() - fin.min()})
        for key, flag, c, healthy in (("knee_r", "knee", 0, 0.1), ("grf_vz_r", "grf", 1, 10.0)):
            phys = x[:, c] * meta["data_std"][c] + meta["data_mean"][c]
            out[f"validation/{key}_std"] = phys.std()
            out[f"validation/{key}_mean"] = phys.mean()
            out[f"validation/{flag}_healthy"] = int(phys.std() > healthy)
    return out


def _references(sent: dict[int, dict], profile: Profile) -> dict[int, dict[str, float]]:
    prev, out, points = None, {}, []
    for e in (ep["epoch"] for ep in sent[min(sent)]["epochs"]):
        out[e] = _reference(sent, e, prev, points, profile)
        prev = out[e].get("train/total_loss", prev)
    return out


FAMILIES = ("train/", "loss_ratio/", "model/", "validation/")


# -- the recording ------------------------------------------------------------------------------
def test_every_run_reached_the_collector_and_finished(replayed):
    assert sorted(replayed.records) == sorted(f"rule-{n}" for n in ALL)
    for name in ALL:
        recs = replayed.records[f"rule-{name}"]
        assert recs[0]["type"] == "run" and recs[-1]["type"] == "summary"
        sent = replayed.sent[f"rule-{name}"]
        assert sorted(sent) == ([0, 1, 2] if name in MULTI else [0])
        assert [r["epoch"] for r in _epochs(recs)] == [e["epoch"] for e in sent[0]["epochs"]]
        assert all(rank_list(r["missing"]) == [] and rank_list(r["ranks"]) == sorted(sent)
                   for r in _epochs(recs))


def test_every_rule_and_diagnosis_has_a_scenario(replayed):
    targets = {case[0] for cases in EXPECT.values() for case in cases}
    profile = replayed.profile
    assert {r.id for r in profile.rules} | {f"diagnosis/{d.id}" for d in profile.diagnoses} \
        <= targets


# -- each rule fires, once, and clears once --------------------------------------------------------
CASES = [(s, *case) for s, cases in EXPECT.items() for case in cases]


@pytest.mark.parametrize(("scenario", "target", "start", "clear"), CASES,
                         ids=[f"{s}:{t}" for s, t, *_ in CASES])
def test_rule_fires_in_its_scenario(replayed, scenario, target, start, clear):
    recs = replayed.records[f"rule-{scenario}"]
    flag = _flag(target)
    flags = {r["epoch"]: r["metrics"].get(flag) for r in _epochs(recs)}
    assert min(e for e, v in flags.items() if v == 1) == start, flags
    if target.startswith("diagnosis/"):
        severity = next(d.severity for d in replayed.profile.diagnoses
                        if f"diagnosis/{d.id}" == target)
    else:
        severity = next(r.severity for r in replayed.profile.rules if r.id == target)
    mine = [(i, e, ev) for i, (e, ev) in enumerate(_events(recs)) if ev["rule"] == target]
    starts = [m for m in mine if m[2]["severity"] != "info"]
    clears = [m for m in mine if m[2]["severity"] == "info"]
    assert [e for _, e, _ in starts] == [start], [ev for *_, ev in mine]
    ev = starts[0][2]
    assert ev["severity"] == severity and ev["message"] and ev["remedy"]
    if clear is None:
        assert clears == []
        return
    assert [e for _, e, _ in clears] == [clear], [ev for *_, ev in mine]
    assert clears[0][0] > starts[0][0] and clears[0][2]["message"].startswith(f"{target} cleared")
    assert all(v != 1 for e, v in flags.items() if e >= clear), flags


def test_the_healthy_run_fires_nothing(replayed):
    recs = replayed.records["rule-healthy"]
    epochs = _epochs(recs)
    assert len(epochs) == 8 and {r["metrics"]["health/phase"] for r in epochs} == {1, 2, 3}
    judged: set[str] = set()
    for r in epochs:
        flags = {k: v for k, v in r["metrics"].items()
                 if k.startswith(("health/", "diagnosis/")) and k != "health/phase"}
        assert all(v == 0 for v in flags.values()), (r["epoch"], flags)
        judged |= set(flags)
    # Every rule and diagnosis was judged at some epoch (rank_desync needs several ranks).
    profile = replayed.profile
    assert judged >= {f"health/{r.id}" for r in profile.rules if r.id != "rank_desync"} \
        | {f"diagnosis/{d.id}" for d in profile.diagnoses} | {"health/mode_collapse_score"}
    assert _events(recs) == []
    assert all(r["type"] != "event" for r in recs)


# -- exact figures ----------------------------------------------------------------------------
@pytest.mark.parametrize("scenario", ALL)
def test_epoch_figures_equal_numpy_on_what_was_sent(replayed, scenario):
    run = f"rule-{scenario}"
    refs = _references(replayed.sent[run], replayed.profile)
    for rec in _epochs(replayed.records[run]):
        got, want = rec["metrics"], refs[rec["epoch"]]
        where = f"{run} epoch {rec['epoch']}"
        assert {k for k in got if k.startswith(FAMILIES)} == set(want), where
        for key, value in want.items():
            rtol = RTOL_WEIGHTS if key.startswith("model/weight_") else RTOL
            assert _close(got[key], value, rtol), f"{where} {key}: {got[key]} != {value}"


@pytest.mark.parametrize("scenario", ALL)
def test_data_stats_equal_numpy(replayed, scenario):
    run = f"rule-{scenario}"
    sent = replayed.sent[run][0]
    got = _one(replayed.records[run], "data_stats")["metrics"]
    data = np.asarray(sent["data"], dtype=np.float32).astype(np.float64)
    want = {"data_stats/normalized_mean": data.mean(), "data_stats/normalized_std": data.std(),
            "data_stats/normalized_min": data.min(), "data_stats/normalized_max": data.max()}
    for c, name in enumerate(sent["channels"]):
        want[f"data_stats/{name}_mean"] = data[:, c].mean()
        want[f"data_stats/{name}_std"] = data[:, c].std()
    rows = data.shape[0]  # all rows fit the client's budget here: nothing sampled away
    want.update({"data_stats/rows_sent": rows, "data_stats/rows_total": rows,
                 "data_stats/sampled_fraction": 1.0})
    assert set(got) == set(want)
    for key, value in want.items():
        assert _close(got[key], value), f"{key}: {got[key]} != {value}"


@pytest.mark.parametrize("scenario", ALL)
def test_run_summary_figures(replayed, scenario):
    run = f"rule-{scenario}"
    refs = _references(replayed.sent[run], replayed.profile)
    got = _one(replayed.records[run], "summary")["metrics"]
    epochs = sorted(refs)
    losses = [(e, refs[e]["train/total_loss"]) for e in epochs if "train/total_loss" in refs[e]]
    assert _close(got["summary/min_total_loss"], min(v for _, v in losses))
    slope = np.polyfit([e for e, _ in losses], [v for _, v in losses], 1)[0]
    assert _close(got["summary/total_loss_slope"], slope, 1e-6)
    g = np.array([refs[e]["train/grad_norm_mean"] for e in epochs])
    assert _close(got["summary/grad_norm_mean_cv"], g.std() / g.mean())
    ema = [refs[e]["model/ema_diff"] for e in epochs if "model/ema_diff" in refs[e]]
    assert _close(got["summary/ema_diff_mean"], float(np.mean(ema)))
    for name in ("knee", "grf"):
        seen = [(e, refs[e][f"validation/{name}_healthy"]) for e in epochs
                if f"validation/{name}_healthy" in refs[e]]
        assert got.get(f"summary/final_{name}_healthy") == (seen[-1][1] if seen else None)
        first = next((e for e, v in seen if v == 1), None)
        assert got.get(f"summary/first_{name}_healthy_epoch") == first
    for count in ("dropped", "seq_gaps", "rejected", "late_epochs", "missing_ranks"):
        assert got[f"summary/{count}"] == 0, count


def test_summary_names_when_quality_was_first_reached(replayed):
    healthy = _one(replayed.records["rule-healthy"], "summary")["metrics"]
    assert healthy["summary/first_knee_healthy_epoch"] == 2  # its first validation
    assert healthy["summary/final_knee_healthy"] == healthy["summary/final_grf_healthy"] == 1
    knee = _one(replayed.records["rule-knee_collapsed"], "summary")["metrics"]
    assert knee["summary/first_knee_healthy_epoch"] == 2 and knee["summary/final_knee_healthy"] == 1
    bad = _one(replayed.records["rule-validation_bad_while_loss_falls"], "summary")["metrics"]
    assert bad["summary/final_knee_healthy"] == 0
    assert "summary/first_knee_healthy_epoch" not in bad


# -- what the events say -----------------------------------------------------------------------
def _param_ranking(sent: dict, epoch: int) -> list[str]:
    """Parameter names by their mean gradient norm over the epoch's steps, largest first."""
    ep = _sent_epoch({0: sent}, epoch)[0]
    norms = np.asarray(ep["param_norms"], dtype=np.float64)
    with np.errstate(invalid="ignore"):
        mean = np.array([_finite(norms[:, i]).mean() for i in range(norms.shape[1])])
    return [sent["param_names"][i] for i in np.argsort(-mean, kind="stable")]


def test_gradient_events_name_the_parameters(replayed):
    checked = 0
    for name in SINGLE[0] + SINGLE[1]:
        run = f"rule-{name}"
        for epoch, ev in _events(replayed.records[run]):
            if ev["severity"] == "info" or ev["rule"] not in ("exploding_gradients",
                                                              "vanishing_gradients"):
                continue
            order = _param_ranking(replayed.sent[run][0], epoch)
            if ev["rule"] == "exploding_gradients":
                assert f"largest gradient norms: {order[0]} " in ev["message"], ev["message"]
            else:
                assert f"smallest gradient norms: {order[-1]} " in ev["message"], ev["message"]
            checked += 1
    assert checked >= 3
    # The engineered one: only inp.bias's gradient was scaled up.
    ev = next(ev for _, ev in _events(replayed.records["rule-exploding_gradients"])
              if ev["rule"] == "exploding_gradients")
    assert "largest gradient norms: inp.bias " in ev["message"]


def _start_event(replayed: Replayed, scenario: str, rule: str) -> dict:
    return next(ev for _, ev in _events(replayed.records[f"rule-{scenario}"])
                if ev["rule"] == rule and ev["severity"] != "info")


def test_remedies_quote_the_run_config(replayed):
    ev = _start_event(replayed, "exploding_gradients", "exploding_gradients")
    assert ev["remedy"].endswith("learning_rate is 0.05; the guide suggests 1e-4.")
    ev = _start_event(replayed, "gradient_explosion", "diagnosis/gradient_explosion")
    assert "learning_rate is 3; the guide suggests 1e-4" in ev["remedy"]
    ev = _start_event(replayed, "loss_not_falling", "diagnosis/loss_not_falling")
    assert "learning_rate is 1e-5; the guide suggests 4e-4" in ev["remedy"]
    ev = _start_event(replayed, "mode_collapse", "diagnosis/mode_collapse")
    assert "learning_rate is 0; the guide suggests 1e-4" in ev["remedy"]
    assert "batch_size is 16; the guide suggests 64" in ev["remedy"]
    ev = _start_event(replayed, "validation_bad_while_loss_falls",
                      "diagnosis/validation_bad_while_loss_falls")
    assert "pseudo_dataset_len is 64; the guide suggests 20000" in ev["remedy"]
    assert "learning_rate is 0.05; the guide suggests a lower value" in ev["remedy"]


def test_mode_collapse_checklist_score(replayed):
    first = _epochs(replayed.records["rule-mode_collapse"])[0]["metrics"]
    # cv 0, knee and GRF unhealthy, gen_std low, no gradient diversity (the same batch
    # every step), samples duplicated, no diversity; the 20-epoch streak cannot be judged yet.
    assert first["health/mode_collapse_score"] == 7 and first["health/mode_collapse"] == 1


def test_a_single_nan_step_is_not_a_learning_rate_diagnosis(replayed):
    recs = replayed.records["rule-nonfinite"]
    assert all(r["metrics"]["diagnosis/gradient_explosion"] == 0 for r in _epochs(recs))
    (step,) = [r for r in recs if r["type"] == "event"]
    assert step["epoch"] == 2 and "non-finite loss" in step["events"][0]["message"]
    # raised at the step, not again at the epoch; no diagnosis anywhere
    assert not [ev for r in _epochs(recs) for ev in r["events"] if ev["kind"] == "raised"]


# -- several ranks ------------------------------------------------------------------------------
def test_three_ranks_pool_their_batch_losses(replayed):
    run = "rule-ddp"
    sent = replayed.sent[run]
    for rec in _epochs(replayed.records[run]):
        eps = _sent_epoch(sent, rec["epoch"])
        losses = np.concatenate([eps[r]["loss"] for r in range(3)])
        assert losses.size == 12 and len({tuple(eps[r]["loss"]) for r in range(3)}) == 3
        m = rec["metrics"]
        assert _close(m["train/batch_loss_mean"], losses.mean())
        assert _close(m["train/batch_loss_std"], losses.std())
        assert _close(m["train/batch_loss_max"], losses.max())
        assert _close(m["train/batch_loss_min"], losses.min())
        assert _close(m["train/batch_loss_cv"], losses.std() / losses.mean())
        # All-reduced gradients: every rank measured the same norms; they count once.
        assert eps[0]["grad_norm"] == eps[1]["grad_norm"] == eps[2]["grad_norm"]
        assert _close(m["train/grad_norm_mean"], np.mean(eps[0]["grad_norm"]))
        assert m["health/rank_desync"] == 0
    assert not [ev for _, ev in _events(replayed.records[run]) if ev["rule"] == "rank_desync"]


def test_a_desynchronised_rank_is_named(replayed):
    run = "rule-rank_desync"
    sent = replayed.sent[run]
    w = {r: _sent_epoch(sent, 2)[r]["weights"]["mean_abs"] for r in range(3)}
    assert abs(w[2] - w[0]) / w[0] > 1e-3 and w[1] == w[0]
    flags = {r["epoch"]: r["metrics"]["health/rank_desync"] for r in _epochs(replayed.records[run])}
    assert flags == {1: 0, 2: 1, 3: 0}
    start = _start_event(replayed, "rank_desync", "rank_desync")
    assert "rank 2 differs in weight summary" in start["message"]
    assert "rank 0" not in start["message"] and "rank 1" not in start["message"]


def test_bfloat16_samples_are_judged_on_their_float32_values(replayed):
    run = "rule-ddp"
    sent = replayed.sent[run]
    for rec in _epochs(replayed.records[run]):
        eps = _sent_epoch(sent, rec["epoch"])
        assert [eps[r]["samples_dtype"] for r in range(3)] == ["bfloat16", "bfloat16", None]
        x = np.concatenate([np.asarray(eps[r]["samples"], dtype=np.float32) for r in (0, 1)])
        assert not (x.view(np.uint32) & 0xFFFF).any()  # bfloat16 values, widened exactly
        x64 = x.astype(np.float64)
        m = rec["metrics"]
        assert _close(m["validation/gen_std"], x64.std(), 1e-9)
        assert _close(m["validation/gen_mean"], x64.mean(), 1e-9)
        assert _close(m["validation/gen_range"], x64.max() - x64.min(), 1e-9)
        knee = x64[:, 0] * sent[0]["data_std"][0] + sent[0]["data_mean"][0]
        grf = x64[:, 1] * sent[0]["data_std"][1] + sent[0]["data_mean"][1]
        # Physical units go through the run's normalisation constants: RTOL.
        assert _close(m["validation/knee_r_std"], knee.std())
        assert _close(m["validation/knee_r_mean"], knee.mean())
        assert _close(m["validation/grf_vz_r_std"], grf.std())
        assert _close(m["validation/grf_vz_r_mean"], grf.mean())

