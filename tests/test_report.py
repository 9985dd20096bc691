"""The HTML health report: what it says must be what the records say.

Most runs here are fed as wire messages through the collector's real ``Pipeline``
(tests/support/wire_runs.py), so the report reads the records the collector really emits;
``make_run`` builds a long sweep's records in the same shape for the sweep-level checks.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
from support.wire_runs import collapsed, records, rising, run_messages

from collector.analysis.profile_load import load_profile
from collector.report.collapse import collapse_keys
from collector.report.html import LEVEL_TEXT, render_report, write_report
from collector.report.model import epoch_spans, group_runs, loss_trend, summary_row, verdict

PROFILE = load_profile(None)

COLLAPSE_REMEDY = "learning rate 1e-4; batch size 64; train longer (1000 epochs)"
CV_REMEDY = "Possible mode collapse: compare validation/gen_std and the knee/GRF checks."


def _event(rule: str, kind: str, severity: str, message: str, remedy: str = "") -> dict:
    return {"rule": rule, "kind": kind, "severity": severity, "message": message,
            "remedy": remedy}


def make_run(run: str, epochs: int, collapse_at: int | None = None, world_size: int = 2,
             seed: int = 0, summary: bool = True) -> list[dict]:
    """A long run's records in the pipeline's shape, following the seed's phase pattern.

    Every judged rule has a flag every epoch and each epoch lists what is raised at its end;
    events are the changes. From ``collapse_at`` on the run mode-collapses: batch losses stop
    varying, generations go flat, validation fails, ``batch_loss_cv_low`` and the
    mode-collapse diagnosis stay raised; ``mode_collapse_confirmed`` is raised at epochs 100
    and 125 and clears the epoch after. With two ranks, rank 1 misses epoch 7 and a
    non-finite step raises ``nonfinite`` between epochs 7 and 8 (cleared at 8).
    """
    rng = np.random.default_rng(seed)
    records: list[dict] = [
        {"type": "run", "run": run, "epoch": None, "metrics": {"world_size": world_size},
         "events": [], "env": {"host": "node-01", "collector": "0.1.0"}},
        {"type": "config", "run": run, "epoch": None, "events": [],
         "metrics": {"learning_rate": 4e-4, "batch_size": 32, "epochs": epochs,
                     "pseudo_dataset_len": 10000, "window_len": 128}},
        {"type": "data_stats", "run": run, "epoch": None, "events": [],
         "metrics": {"data_stats/normalized_mean": 0.01, "data_stats/normalized_std": 0.98}},
    ]
    raised: set[str] = set()
    loss_prev = None
    losses = []
    for epoch in range(epochs):
        collapsed_now = collapse_at is not None and epoch >= collapse_at
        loss = 0.12 + 0.9 * math.exp(-epoch / 30) + rng.normal(0, 0.004)
        if collapsed_now:
            loss = losses[-1] * (1 + rng.normal(0, 1e-4))
        losses.append(loss)
        improving = int(loss_prev is None or loss < loss_prev)
        ratios = rng.dirichlet([8, 3, 2, 1, 1])
        m = {
            "train/total_loss": loss, "train/grad_norm_mean": 3.0 * math.exp(-epoch / 80) + 0.8,
            "train/grad_norm_std": 0.3, "train/grad_norm_max": 6.0,
            "train/batch_loss_cv": 0.002 if collapsed_now else 0.12 + rng.normal(0, 0.01),
            "train/is_improving": improving, "model/ema_diff": 0.02 * math.exp(-epoch / 100),
            "model/weight_mean": 0.05, "health/phase": 1 if epoch < 50 else 2,
            "health/mode_collapse_score": 4 if collapsed_now else 0,
            **{f"loss_ratio/{n}": float(r)
               for n, r in zip(("simple", "vel", "fk", "drift", "slide"), ratios, strict=True)},
        }
        if epoch == 0 and collapse_at is not None:
            m["train/total_loss"] = None  # a NaN loss, as the JSON form writes it
        if epoch % 25 == 0 and epoch:  # validation epochs
            good = not collapsed_now and epoch >= 50
            m.update({"validation/gen_std": 0.05 if collapsed_now else min(0.8, 0.3 + epoch / 100),
                      "validation/knee_r_std": 0.02 if collapsed_now else 0.05 + epoch / 400,
                      "validation/grf_vz_r_std": 0.5 if collapsed_now else 4 + epoch / 4,
                      "validation/knee_healthy": int(good), "validation/grf_healthy": int(good)})
        now = set()
        if collapsed_now:
            now |= {"batch_loss_cv_low", "diagnosis/mode_collapse"}
            if epoch in (100, 125):
                now.add("diagnosis/mode_collapse_confirmed")
        if world_size > 1 and epoch == 7:
            now.add("nonfinite")  # raised by the step event before this epoch closed
        events = []
        for key in sorted(now - raised):
            if key == "nonfinite":
                continue  # its raise event came between epochs
            sev = "warning" if key == "batch_loss_cv_low" else "critical"
            remedy = CV_REMEDY if key == "batch_loss_cv_low" else COLLAPSE_REMEDY
            events.append(_event(key, "raised", sev, f"{key}: batch_loss_cv "
                                 f"{m['train/batch_loss_cv']:.3g} < 0.01", remedy))
        events += [_event(key, "cleared", "info", f"{key} cleared") for key in
                   sorted(raised - now)]
        raised = now
        m.update({"health/batch_loss_cv_low": int("batch_loss_cv_low" in now),
                  "health/mode_collapse": int("diagnosis/mode_collapse" in now),
                  "diagnosis/mode_collapse": int("diagnosis/mode_collapse" in now),
                  "diagnosis/mode_collapse_confirmed":
                      int("diagnosis/mode_collapse_confirmed" in now)})
        if world_size > 1:
            m["health/nonfinite"] = int("nonfinite" in now)
        if world_size > 1 and epoch == 7:
            records.append({"type": "event", "run": run, "epoch": 7, "step": 700, "rank": 1,
                            "metrics": {}, "events": [_event(
                                "nonfinite", "raised", "critical",
                                "rank 1 step 700: non-finite loss nan",
                                "Lower the learning rate (4e-4 -> 1e-4).")]})
        records.append({"type": "epoch", "run": run, "epoch": epoch, "metrics": m,
                        "events": events, "raised": sorted(now),
                        "ranks": {"count": world_size, "ranges": [[0, world_size - 1]]},
                        "missing": {"count": 1, "ranges": [[1, 1]]} if epoch == 7 and world_size > 1
                        else {"count": 0, "ranges": []}})
        loss_prev = loss
    if summary:
        finite = [x for x in losses if math.isfinite(x)]
        records.append({"type": "summary", "run": run, "epoch": epochs - 1, "events": [],
                        "ended": "finished",
                        "metrics": {"summary/final_knee_healthy": 0 if collapse_at else 1,
                                    "summary/final_grf_healthy": 0 if collapse_at else 1,
                                    "summary/min_total_loss": min(finite),
                                    "summary/first_knee_healthy_epoch": 50,
                                    "summary/total_loss_slope": -0.002,
                                    "summary/dropped": 3 if collapse_at else 0,
                                    "summary/rejected": 0}})
    return records


def healthy_records(epochs: int = 120) -> list[dict]:
    return make_run("lr1e-4", epochs, world_size=1, seed=1)


def _body(page: str) -> str:
    """The page after plotly.js: what the report itself wrote."""
    return page[page.index("</head>"):]


def _plotted(page: str) -> str:
    """The body with plotly's JSON escapes undone, to find what the plots show."""
    body = _body(page)
    for escaped, char in (("\\u003c", "<"), ("\\u003e", ">"), ("\\u002f", "/")):
        body = body.replace(escaped, char)
    return body


def _header(page: str) -> str:
    return page[page.index("<header"):page.index("</header>")]


def _section(page: str, run: str) -> str:
    start = page.index(f"<h2>Run {run}</h2>")
    end = page.find("<section", start)
    return page[start:end if end > 0 else len(page)]


def _figures(page: str, epoch_axes: bool = False) -> list[dict]:
    """Every plot's figure (data and layout) as plotly was given it; with ``epoch_axes``
    only those over the epochs (not the per-step curve, not the sample pictures)."""
    decoder = json.JSONDecoder()
    out = []
    for m in re.finditer(r"Plotly\.newPlot\(\s*\"([^\"]+)\",\s*", page):
        if epoch_axes and re.search(r"-(steps|pictures\d+)$", m.group(1)):
            continue
        data, end = decoder.raw_decode(page, m.end())
        rest = page[end:].lstrip().removeprefix(",").lstrip()
        layout, _ = decoder.raw_decode(rest)
        out.append({"data": data, "layout": layout})
    return out


def _cells(table: str) -> list[list[str]]:
    """A table's body rows as lists of cell texts (tags removed)."""
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)]


def _trace(page: str, name: str) -> dict:
    return next(t for f in _figures(page) for t in f["data"] if t.get("name") == name)


RANKS = {"lr4e-4": {0: {"messages": 900, "seq_gaps": 0, "reported_drops": 0},
                    1: {"messages": 880, "seq_gaps": 2, "reported_drops": 3}}}


def _script_sources(page: str) -> list[str]:
    return re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?([^\"'\s>]+)",
                      page, flags=re.I)


FALSE_TEXT = ("no validation", "not reported", "Healthy, with warnings")


# -- what a real pipeline emits --------------------------------------------------------------
@pytest.fixture(scope="module")
def validated() -> list[dict]:
    """Three runs that validate every epoch: gait (samples before and after ``log_epoch``,
    the second written as amendments) and a model with its own channels."""
    return records([run_messages("gait", 8), run_messages("gait-late", 8, late_validation=True,
                                                          seed=3),
                    run_messages("images", 8, channels=("r", "g", "b"), seed=1)])


def test_a_run_validated_every_epoch_reads_true(validated) -> None:
    assert any(r.get("amends") for r in validated)  # the late order really amended
    page = render_report(validated, PROFILE)
    assert LEVEL_TEXT["healthy"] in _header(page)
    assert "All 3 run(s) healthy: no health rule was raised." in _header(page)
    for text in FALSE_TEXT:
        assert text not in _body(page), text
    for run in ("gait", "gait-late", "images"):
        part = _section(page, run)
        assert "2. Validation quality" in part and "No health rule or diagnosis" in part
        # every panel drawn, the per-step curve, the pictures; no findings timeline
        assert part.count("Plotly.newPlot") == 6
    # The validation figures cover every epoch, in both orders of sending.
    epochs = list(range(1, 9))
    knee = [t for f in _figures(page) for t in f["data"]
            if t.get("name") == "validation/knee_r_std"]
    assert [t["x"] for t in knee] == [epochs, epochs]
    assert knee[0]["y"] == pytest.approx(knee[1]["y"], rel=0.5)  # both are real spreads
    # A model with no gait channels gets its own figures, not "no validation".
    images = _section(_plotted(page), "images")
    assert "validation/knee_r_std" not in images
    assert '"text":"validation/gen_std"' in images  # the panel's own subplot title
    runs = {r.run: r for r in group_runs(validated)}
    assert all(verdict(r, PROFILE).level == "healthy" for r in runs.values())
    assert summary_row(runs["gait-late"])["first_knee_healthy_epoch"] == 1


def test_collapsed_samples_and_a_rising_loss_are_never_healthy() -> None:
    # generated samples with std 2e-4 and a loss that rose 58 %: the run the report misread
    recs = records([run_messages("bad", 8, loss=rising, samples=collapsed)])
    run = group_runs(recs)[0]
    v = verdict(run, PROFILE)
    assert v.level == "unhealthy"
    assert {"gen_std_low", "knee_collapsed", "diagnosis/mode_collapse"} <= set(v.collapse)
    trend = loss_trend(run)
    assert trend is not None and trend.rose and trend.change > 0.3
    page = render_report(recs, PROFILE)
    header = _header(page)
    assert "Unhealthy" in header and "Healthy" not in header.replace("Unhealthy", "")
    said = re.search(r"the generated samples collapsed: ([^—<]*)", header)
    assert said and "gen_std_low" in said.group(1) and "knee_collapsed" in said.group(1)
    assert "train/total_loss ended above where it started" in header


def test_a_warning_level_collapse_alone_is_unhealthy() -> None:
    # Three channels of the model's own (no gait figures, so no critical knee/GRF rule) and
    # no training data to hold the samples against (so no critical duplicate finding): the
    # only findings are the warning-level gen_std_low / gen_range_low.
    def narrow(epoch: int, rng: np.random.Generator, channels: int) -> np.ndarray:
        return (0.05 * rng.standard_normal((16, 32, channels))).astype(np.float32)

    recs = records([run_messages("narrow", 8, samples=narrow, channels=("a", "b", "c"),
                                 data_stats=False)])
    run = group_runs(recs)[0]
    findings = {f.key: f for f in run.findings()}
    assert set(findings) <= {"gen_std_low", "gen_range_low"} and "gen_std_low" in findings
    assert all(f.severity == "warning" for f in findings.values())
    v = verdict(run, PROFILE)
    assert v.level == "unhealthy" and v.collapse  # not "warnings": the samples collapsed


def test_a_rising_loss_alone_is_unhealthy() -> None:
    recs = records([run_messages("up", 8, loss=rising)])
    run = group_runs(recs)[0]
    v = verdict(run, PROFILE)
    assert v.level == "unhealthy" and not v.collapse
    assert v.reasons[-1].startswith("train/total_loss ended above where it started")


def test_loss_trend_compares_the_first_and_last_epochs() -> None:
    def run_of(losses: list[float | None]) -> object:
        return group_runs([{"type": "epoch", "run": "r", "epoch": i, "raised": [],
                            "metrics": {"train/total_loss": x}, "events": []}
                           for i, x in enumerate(losses)])[0]

    assert loss_trend(run_of([1.0])) is None
    assert loss_trend(run_of([1.0, None])) is None  # NaN (None in JSON) is no figure
    up = loss_trend(run_of([1.0, 1.2]))
    assert up.n == 1 and up.rose and up.change == pytest.approx(0.2)
    # one noisy last epoch does not turn a falling run into a rising one
    noisy = loss_trend(run_of([1.0, 0.9, 0.8, 0.6, 0.5, 0.4, 0.4, 0.95]))
    assert noisy.n == 2 and not noisy.rose
    assert loss_trend(run_of([float(x) for x in range(40, 0, -1)])).n == 5


def test_collapse_findings_are_read_from_the_rules_metrics(tmp_path: Path) -> None:
    toml = tmp_path / "mine.toml"
    toml.write_text("""
[rules.low_diversity]
kind = "threshold"
metric = "validation/sample_diversity"
op = "<"
threshold = 0.5
severity = "warning"
message = "diversity {value:.3g}"
remedy = ""

[rules.channel_flat]
kind = "threshold"
metric = "validation/r_std"
op = "<"
threshold = 0.01
severity = "warning"
message = "flat"
remedy = ""

[rules.lr_high]
kind = "threshold"
metric = "train/lr"
op = ">"
threshold = 1.0
severity = "warning"
message = "lr"
remedy = ""
""")
    keys = collapse_keys(load_profile(toml))
    assert {"low_diversity", "channel_flat", "gen_std_low", "gen_range_low", "knee_collapsed",
            "grf_collapsed", "diagnosis/mode_collapse"} <= keys
    assert not keys & {"lr_high", "exploding_gradients", "phase2_quality_not_reached",
                       "diagnosis/validation_bad_while_loss_falls", "loss_increasing"}


def test_diversity_and_per_channel_figures_render_from_the_records(tmp_path: Path) -> None:
    """The sample-diversity metrics the detection stage writes, as amendments of the epochs
    (the record shape a late validation takes), with a profile rule on one of them."""
    recs = records([run_messages("images", 6, channels=("r", "g"), seed=2)])
    for e in range(1, 7):
        recs.append({"type": "epoch", "run": "images", "epoch": e, "amends": True,
                     "raised": [], "ranks": {"count": 0, "ranges": []},
                     "missing": {"count": 0, "ranges": []}, "events": [],
                     "metrics": {"validation/r_std": 1.0, "validation/g_std": 0.9,
                                 "validation/r_mean": 0.1, "validation/g_mean": -0.1,
                                 "validation/r_w1": 0.3 / e, "validation/g_w1": 0.2 / e,
                                 "validation/sample_diversity": 0.9,
                                 "validation/duplicate_frac": 0.0}})
    toml = tmp_path / "div.toml"
    toml.write_text('[rules.low_diversity]\nkind = "threshold"\n'
                    'metric = "validation/sample_diversity"\nop = "<"\nthreshold = 0.5\n'
                    'severity = "warning"\nmessage = "m"\nremedy = ""\n')
    page = render_report(recs, load_profile(toml))
    plotted = _plotted(page)
    panel = next(f for f in _figures(page) if any(
        t.get("name") == "validation/sample_diversity" for t in f["data"]))
    names = [t["name"] for t in panel["data"]]
    assert names.count("r") == 3 and names.count("g") == 3  # std, mean, W1 rows
    assert sum(t.get("showlegend", True) for t in panel["data"] if t["name"] == "r") == 1
    assert {t["line"]["color"] for t in panel["data"] if t["name"] == "r"} == \
        {next(t["line"]["color"] for t in panel["data"] if t["name"] == "r")}
    assert "validation/duplicate_frac" in names
    assert "low_diversity: &lt; 0.5" in names  # the rule's threshold, as plotly reads text
    assert "&lt;channel&gt;_w1: distance to the training data" in plotted
    assert _trace(page, "validation/sample_diversity")["x"] == [1, 2, 3, 4, 5, 6]


def test_epoch_axes_tick_whole_epochs_and_legends_sit_below_the_axes() -> None:
    recs = records([run_messages("bad", 8, loss=rising, samples=collapsed)])
    page = render_report(recs + make_run("long", 130, collapse_at=90), PROFILE, ranks=RANKS)
    figures = _figures(page, epoch_axes=True)
    assert len(figures) == 10  # 2 runs x (4 panels + the findings timeline)
    for fig in figures:
        layout = fig["layout"]
        axes = [v for k, v in layout.items() if re.fullmatch(r"xaxis\d*", k)]
        assert axes
        for axis in axes:
            assert axis["tickformat"] == "d" and axis["tickmode"] == "linear"
            assert float(axis["dtick"]).is_integer() and axis["dtick"] >= 1
        assert any(a.get("title", {}).get("text") == "epoch" for a in axes)
        legend = layout["legend"]
        assert legend["yref"] == "container" and legend["y"] == 0
        assert legend["yanchor"] == "bottom" and legend["orientation"] == "h"
        assert layout["margin"]["b"] >= 58 + 21  # the axis, then at least one legend row


def test_tables_align_numbers_and_their_headers_right() -> None:
    page = render_report(healthy_records() + make_run("lr4e-4", 150, collapse_at=90, seed=2),
                         PROFILE, ranks=RANKS)
    number = re.compile(r"-?\d[\d.]*(e[-+]?\d+)?|—")
    tables = re.findall(r"<table>.*?</table>", _body(page), flags=re.S)
    assert len(tables) >= 8
    for table in tables:
        heads = re.findall(r"<th( class=\"n\")?>", table)
        rows = [re.findall(r"<td( class=\"n\")?>(.*?)</td>", row)
                for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table)[1:]]
        for j, head in enumerate(heads):
            column = [row[j] for row in rows]
            if j == 0:
                continue  # the row's label: a run, a rule, a rank id
            # a header aligns with its column's cells
            assert {cls for cls, _ in column} <= {head}
            texts = [re.sub(r"<[^>]+>", "", text) for _, text in column]
            if all(number.fullmatch(t) for t in texts) and any(t != "—" for t in texts):
                assert head, (heads, texts)  # a column of numbers is right-aligned
    sweep = page[page.index("Sweep summary"):page.index("<section")]
    assert '<th class="n">last epoch</th>' in sweep and '<th class="n">min total loss</th>' in sweep


# -- a long sweep: ranking, timelines, remedies ----------------------------------------------
def test_healthy_report_has_the_four_panels_and_a_healthy_verdict() -> None:
    page = render_report(healthy_records(), PROFILE, title="gait sweep")
    header = _header(page)
    assert "Healthy" in header and "no health rule was raised" in header
    for title in ("1. Training health", "2. Validation quality", "3. Mode-collapse detection",
                  "4. Loss components"):
        assert title in page
    plotted = _plotted(page)
    for key in ("train/total_loss", "train/grad_norm_mean", "train/is_improving",
                "validation/knee_r_std", "validation/grf_vz_r_std", "train/batch_loss_cv",
                "validation/gen_std", "model/ema_diff", "loss_ratio/drift"):
        assert key in plotted
    assert '"stackgroup":"ratios"' in plotted  # loss components as a stacked area
    # The threshold lines, drawn as dashed series at the seed's values.
    knee = _trace(page, "threshold/knee_r_std = 0.1 rad")
    assert knee["y"] == [0.1, 0.1] and knee["line"]["dash"] == "dash"
    assert _trace(page, "threshold/grf_vz_r_std = 10 N")["y"] == [10, 10]
    assert _body(page).count("Plotly.newPlot") == 4  # nothing raised: no timeline
    assert "No health rule or diagnosis was raised" in page
    assert "No diagnosis" in page


def test_raised_rules_give_a_verdict_a_timeline_and_remedies() -> None:
    records_ = healthy_records() + make_run("lr4e-4", 150, collapse_at=90, seed=2)
    page = render_report(records_, PROFILE, ranks=RANKS)
    header = _header(page)
    assert "Unhealthy" in header and "lr4e-4" in header
    assert "the generated samples collapsed: diagnosis/mode_collapse" in header
    assert "also raised at the last epoch: batch_loss_cv_low" in header
    assert "raised earlier, cleared by the last epoch: nonfinite, " \
           "diagnosis/mode_collapse_confirmed" in header
    assert page.count("<section") == 2  # one section per run
    unhealthy = _section(page, "lr4e-4")
    assert "Health findings" in unhealthy and 'id="run-2-events"' in unhealthy
    table = unhealthy[unhealthy.index("<th>rule</th><th>severity</th>"):]
    rows = {r[0]: r[1:] for r in _cells(table[:table.index("</table>")])}
    # raised at every epoch from 90 on, though its raise event came once
    assert rows["batch_loss_cv_low"][:5] == ["warning", "90–149", "1", "—", "yes"]
    assert rows["diagnosis/mode_collapse_confirmed"][1:5] == ["100, 125", "2", "101, 126", "no"]
    assert rows["nonfinite"][1:5] == ["7", "1", "8", "no"]
    timeline = _trace(page, "raised (warning)")
    assert [x for x in timeline["x"] if x is not None] == [89.6, 149.4]
    cleared = _trace(page, "cleared")
    assert sorted(cleared["x"]) == [8, 101, 126]
    assert html.escape(COLLAPSE_REMEDY) in unhealthy and html.escape(CV_REMEDY) in unhealthy
    assert "(epochs 100, 125)" in unhealthy
    # The per-rank table flags rank 1's gaps, drops and the epoch it missed.
    ranks = unhealthy[unhealthy.index("<h3>Ranks</h3>"):]
    assert ranks.count('<span class="bad">') == 3
    assert "Data incomplete: 3 message(s)" in header
    # The sweep table ranks the healthy run first.
    sweep = page[page.index("Sweep summary"):page.index("<section")]
    assert sweep.index("lr1e-4") < sweep.index("lr4e-4")
    assert '<tr class="best">' in sweep


def test_report_opens_offline() -> None:
    page = render_report(healthy_records() + make_run("b", 60, collapse_at=30), PROFILE,
                         ranks=RANKS)
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<script") == page.count("</script>")
    sources = _script_sources(page)
    assert not [s for s in sources if s.lower().startswith(("http:", "https:", "//"))], sources
    assert page.count("* plotly.js v") == 1  # embedded once, in the head
    assert page.index("* plotly.js v") < page.index("</head>")
    assert 1_000_000 < len(page.encode()) < 8_000_000  # plotly.js inline, once


def test_hostile_text_is_escaped() -> None:
    evil = '<script>alert("run")</script>'
    records_ = make_run(evil, 30, collapse_at=10, world_size=1)
    for r in records_:
        for e in r.get("events") or []:
            e["message"] = "<img src=x onerror=alert(1)>"
            e["rule"] = "<b>rule</b>"
        if r.get("raised"):
            r["raised"] = ["<b>rule</b>"]
    page = render_report(records_, PROFILE, ranks={evil: {0: {"messages": 1}}},
                         title="<b>t</b>")
    assert evil not in page and "<img src=x" not in page and "<b>t</b>" not in page
    assert "<b>rule</b>" not in _plotted(page)
    assert html.escape(evil) in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_missing_metrics_give_empty_states_not_a_crash() -> None:
    early = [r for r in make_run("early", 10, summary=False) if r["type"] != "event"]
    for r in early:  # no loss components reported
        r["metrics"] = {k: v for k, v in r["metrics"].items() if not k.startswith("loss_ratio/")}
    only_hello = [{"type": "run", "run": "late", "epoch": None,
                   "metrics": {"world_size": 8}, "events": [], "env": {}}]
    ended_early = [{"type": "run", "run": "gone", "epoch": None, "metrics": {"world_size": 1},
                    "events": [], "env": {}},
                   {"type": "summary", "run": "gone", "epoch": None, "metrics": {},
                    "events": [], "ended": "went quiet"}]
    page = render_report(early + only_hello + ended_early, PROFILE)
    early_part = _section(page, "early")
    assert "no validation samples were logged yet" in early_part
    assert "no loss components reported" in early_part
    assert early_part.count("Plotly.newPlot") == 3  # training, mode collapse, findings
    late_part = _section(page, "late")
    assert "no epoch has closed yet" in late_part and "Plotly.newPlot" not in late_part
    assert "No data yet" in late_part
    gone = _section(page, "gone")
    assert "ended: went quiet, before any epoch closed" in gone
    assert "no epoch has closed<" in gone  # not "yet": it ended
    assert "gone</a>: No data yet — ended: went quiet, before any epoch closed" in _header(page)
    assert "(live)" in page  # no summary record yet: figures from the epochs
    empty = render_report([], PROFILE)  # nothing at all still renders a page
    assert "No run has reported yet" in empty and empty.endswith("</html>\n")


def test_write_report_is_atomic_and_readable(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.html"
    write_report(healthy_records(40), path, PROFILE)
    first = path.read_text(encoding="utf-8")
    assert first.endswith("</html>\n")
    write_report(healthy_records(60), path, PROFILE, ranks=None)
    assert path.read_text(encoding="utf-8") != first
    assert sorted(os.listdir(path.parent)) == ["report.html"]  # no temp file left behind
    assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044
    with pytest.raises(OSError):  # the target is a directory: the rename fails
        write_report(healthy_records(10), tmp_path / "out", PROFILE)
    assert sorted(os.listdir(path.parent)) == ["report.html"]  # the temp file is removed
    assert path.read_text(encoding="utf-8").endswith("</html>\n")


def test_verdicts_and_live_summary() -> None:
    records_ = healthy_records() + make_run("c", 120, collapse_at=60)
    runs = {r.run: r for r in group_runs(records_)}
    assert verdict(runs["lr1e-4"]).level == "healthy"
    v = verdict(runs["c"])
    assert v.level == "unhealthy"
    assert v.fired[:2] == ["nonfinite", "batch_loss_cv_low"]
    assert "batch_loss_cv_low" in v.active and "mode_collapse" in v.active
    assert v.diagnoses == ["mode_collapse", "mode_collapse_confirmed"]
    assert "nonfinite" not in v.active  # cleared at epoch 8

    def one_rule(severity: str, clear_at: int | None) -> list[dict]:
        out = []
        for e in range(1, 11):
            raised = ["stalled"] if e >= 4 and (clear_at is None or e < clear_at) else []
            events = []
            if e == 4:
                events.append(_event("stalled", "raised", severity, "no improvement"))
            if e == clear_at:
                events.append(_event("stalled", "cleared", "info", "stalled cleared"))
            out.append({"type": "epoch", "run": "d", "epoch": e, "events": events,
                        "raised": raised, "metrics": {"train/total_loss": 1.0 - 0.05 * e,
                                                      "health/stalled": int(bool(raised))}})
        return out

    # A warning raised at the last epoch: warnings raised; cleared before it: warnings
    # earlier; the same rule at critical severity: unhealthy, even once cleared.
    assert verdict(group_runs(one_rule("warning", None))[0]).level == "warnings"
    assert verdict(group_runs(one_rule("warning", 8))[0]).level == "recovered"
    assert verdict(group_runs(one_rule("critical", 8))[0]).level == "unhealthy"
    assert verdict(group_runs(one_rule("info", None))[0]).level == "healthy"
    assert "healthy: only info-level findings were raised" in _header(
        render_report(one_rule("info", None), PROFILE))
    row = summary_row(group_runs(make_run("e", 80, collapse_at=40, world_size=1,
                                          summary=False))[0])
    assert row["_live"] and row["final_knee_healthy"] == 0
    assert row["first_knee_healthy_epoch"] is None  # collapsed before reaching health
    assert math.isfinite(row["min_total_loss"])
    assert epoch_spans([5, 1, 2, 3, 7, None]) == "1–3, 5, 7" and epoch_spans([None]) == "run-level"


def test_a_record_written_twice_counts_once_and_amendments_win() -> None:
    recs = records([run_messages("twice", 4)])
    epoch3 = next(r for r in recs if r["type"] == "epoch" and r["epoch"] == 3)
    again = [*recs, json.loads(json.dumps(epoch3)),
             {**json.loads(json.dumps(epoch3)), "amends": True, "raised": ["gen_std_low"],
              "ranks": {"count": 0, "ranges": []},
                     "missing": {"count": 0, "ranges": []},
              "metrics": {"validation/gen_std": 0.01, "health/gen_std_low": 1},
              "events": [_event("gen_std_low", "raised", "warning", "std 0.01")]}]
    run = group_runs(again)[0]
    assert run.epochs[3]["validation/gen_std"] == 0.01  # the amendment won
    assert run.epochs[3]["train/total_loss"] == epoch3["metrics"]["train/total_loss"]
    assert run.never_reported() == [] and run.raised_at(3) == {"gen_std_low"}
    assert [f.key for f in run.findings()] == ["gen_std_low"]
    assert run.findings()[0].epochs == [3] and not run.findings()[0].active


def test_records_survive_a_json_round_trip() -> None:
    # Replayed from JSONL: rank keys become strings, NaN stays NaN.
    records_ = json.loads(json.dumps(make_run("j", 40, collapse_at=20)))
    ranks = json.loads(json.dumps(RANKS))
    ranks["j"] = ranks.pop("lr4e-4")
    page = render_report(records_, PROFILE, ranks=ranks)
    part = page[page.index("<h3>Ranks</h3>"):]
    assert part.count("<tr>") == 3  # header, rank 0, rank 1: not duplicated by key type
