"""The HTML health report, rendered from record sequences shaped like a real sweep's."""

from __future__ import annotations

import copy
import html
import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest

from collector.analysis.profile import load_profile
from collector.report.html import render_report, write_report
from collector.report.model import epoch_spans, group_runs, summary_row, verdict

PROFILE = load_profile(None)

COLLAPSE_REMEDY = "learning rate 1e-4; batch size 64; train longer (1000 epochs)"
STALL_REMEDY = "raise the learning rate (1e-4 -> 4e-4)"


def _event(rule: str, severity: str, message: str, remedy: str = "") -> dict:
    return {"rule": rule, "severity": severity, "message": message, "remedy": remedy}


def make_run(run: str, epochs: int, collapse_at: int | None = None, world_size: int = 2,
             seed: int = 0, summary: bool = True) -> list[dict]:
    """A run's records as the pipeline emits them, following the seed's phase pattern.

    From ``collapse_at`` on, the run mode-collapses: batch losses stop varying, generations
    go flat, validation fails, the health flags and the diagnosis are raised with events.
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
    loss_prev = None
    losses = []
    for epoch in range(epochs):
        collapsed = collapse_at is not None and epoch >= collapse_at
        loss = 0.12 + 0.9 * math.exp(-epoch / 30) + rng.normal(0, 0.004)
        if collapsed:
            loss = losses[-1] * (1 + rng.normal(0, 1e-4))
        losses.append(loss)
        improving = int(loss_prev is None or loss < loss_prev)
        ratios = rng.dirichlet([8, 3, 2, 1, 1])
        m = {
            "train/total_loss": loss, "train/grad_norm_mean": 3.0 * math.exp(-epoch / 80) + 0.8,
            "train/grad_norm_std": 0.3, "train/grad_norm_max": 6.0,
            "train/batch_loss_cv": 0.002 if collapsed else 0.12 + rng.normal(0, 0.01),
            "train/is_improving": improving, "model/ema_diff": 0.02 * math.exp(-epoch / 100),
            "model/weight_mean": 0.05, "health/phase": 1 if epoch < 50 else 2,
            "health/mode_collapse_score": 4 if collapsed else 0,
            **{f"loss_ratio/{n}": float(r)
               for n, r in zip(("simple", "vel", "fk", "drift", "slide"), ratios, strict=True)},
        }
        if epoch == 0:
            m["train/total_loss"] = float("nan") if collapse_at is not None else loss
        events = []
        m["health/mode_collapse"] = int(collapsed)
        m["diagnosis/mode_collapse_confirmed"] = int(collapsed and epoch % 25 == 0)
        if collapsed:
            events.append(_event("mode_collapse", "critical",
                                 f"batch_loss_cv {m['train/batch_loss_cv']:.3g} < 0.01",
                                 COLLAPSE_REMEDY))
            if m["diagnosis/mode_collapse_confirmed"]:
                events.append(_event("mode_collapse_confirmed", "critical",
                                     "4 of 6 checklist items", COLLAPSE_REMEDY))
        if epoch % 25 == 0 and epoch:  # validation epochs
            good = not collapsed and epoch >= 50
            m.update({"validation/gen_std": 0.05 if collapsed else min(0.8, 0.3 + epoch / 100),
                      "validation/knee_r_std": 0.02 if collapsed else 0.05 + epoch / 400,
                      "validation/grf_vz_r_std": 0.5 if collapsed else 4 + epoch / 4,
                      "validation/knee_healthy": int(good), "validation/grf_healthy": int(good)})
        if not improving and epoch > 5:
            events.append(_event("loss_stalled", "info", "is_improving = 0", STALL_REMEDY))
        records.append({"type": "epoch", "run": run, "epoch": epoch, "metrics": m,
                        "events": events, "ranks": list(range(world_size)),
                        "missing_ranks": [1] if epoch == 7 and world_size > 1 else []})
        loss_prev = loss
    if world_size > 1:
        records.append({"type": "event", "run": run, "epoch": None, "metrics": {},
                        "events": [_event("rank_desync", "warning",
                                          "rank 1 grad_norm differs from rank 0", "")]})
    if summary:
        finite = [x for x in losses if math.isfinite(x)]
        records.append({"type": "summary", "run": run, "epoch": None, "events": [],
                        "metrics": {"summary/final_knee_healthy": 0 if collapse_at else 1,
                                    "summary/final_grf_healthy": 0 if collapse_at else 1,
                                    "summary/min_total_loss": min(finite),
                                    "summary/first_knee_healthy_epoch": 50,
                                    "summary/total_loss_slope": -0.002,
                                    "summary/dropped": 3 if collapse_at else 0,
                                    "summary/rejected": 0}})
    return records


def healthy_records(epochs: int = 120, info_events: bool = False) -> list[dict]:
    records = make_run("lr1e-4", epochs, world_size=1, seed=1)
    if not info_events:
        for r in records:
            r["events"] = []
    return records


def _body(page: str) -> str:
    """The page after plotly.js: what the report itself wrote."""
    return page[page.index("</head>"):]


def _plotted(page: str) -> str:
    """The body with plotly's JSON escapes undone, to find what the plots show."""
    body = _body(page)
    for escaped, char in (("\\u003c", "<"), ("\\u003e", ">"), ("\\u002f", "/")):
        body = body.replace(escaped, char)
    return body


RANKS = {"lr4e-4": {0: {"messages": 900, "seq_gaps": 0, "reported_drops": 0},
                    1: {"messages": 880, "seq_gaps": 2, "reported_drops": 3}}}


def _script_sources(page: str) -> list[str]:
    return re.findall(r"<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)\s*=\s*[\"']?([^\"'\s>]+)",
                      page, flags=re.I)


def test_healthy_report_has_the_four_panels_and_a_healthy_verdict() -> None:
    page = render_report(healthy_records(), PROFILE, title="gait sweep")
    verdict_header = page[page.index("<header"):page.index("</header>")]
    assert "Healthy" in verdict_header and "no health rule fired" in verdict_header
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
    assert "threshold/knee_r_std = 0.1 rad" in plotted
    assert "threshold/grf_vz_r_std = 10 N" in plotted
    assert re.search(r'"y":\[0\.1,0\.1\][^}]*"dash":"dash"', plotted) or \
        re.search(r'"dash":"dash"[^}]*\},"mode":"lines","name":"threshold/knee', plotted)
    assert _body(page).count("Plotly.newPlot") == 4  # no events: no timeline
    assert "every rule stayed quiet" in page
    assert "No diagnosis" in page


def test_fired_rules_give_a_verdict_a_timeline_and_remedies() -> None:
    records = healthy_records() + make_run("lr4e-4", 150, collapse_at=90, seed=2)
    page = render_report(records, PROFILE, ranks=RANKS)
    header = page[page.index("<header"):page.index("</header>")]
    assert "Unhealthy" in header and "mode_collapse" in header and "lr4e-4" in header
    assert "active now" in header and "rank_desync" in header
    assert page.count("<section") == 2  # one section per run
    unhealthy = page[page.index("Run lr4e-4"):]
    assert "Health events" in unhealthy and "Plotly.newPlot" in unhealthy
    assert 'id="run-2-events"' in unhealthy  # the timeline plot
    assert "90–149" in unhealthy  # mode_collapse fired on every epoch from 90
    assert html.escape(COLLAPSE_REMEDY) in unhealthy
    assert "mode_collapse_confirmed" in unhealthy and "(epochs 100, 125)" in unhealthy
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
    records = make_run(evil, 30, collapse_at=10, world_size=1)
    for r in records:
        for e in r.get("events") or []:
            e["message"] = "<img src=x onerror=alert(1)>"
    page = render_report(records, PROFILE, ranks={evil: {0: {"messages": 1}}}, title="<b>t</b>")
    assert evil not in page and "<img src=x" not in page and "<b>t</b>" not in page
    assert html.escape(evil) in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page


def test_missing_metrics_give_empty_states_not_a_crash() -> None:
    early = [r for r in make_run("early", 10, summary=False) if r["type"] != "event"]
    for r in early:  # no loss components reported
        r["metrics"] = {k: v for k, v in r["metrics"].items() if not k.startswith("loss_ratio/")}
    only_hello = [{"type": "run", "run": "late", "epoch": None,
                   "metrics": {"world_size": 8}, "events": [], "env": {}}]
    page = render_report(early + only_hello, PROFILE)
    early_part = page[page.index("Run early"):page.index("Run late")]
    assert "no validation samples logged yet" in early_part
    assert "no loss components reported" in early_part
    assert early_part.count("Plotly.newPlot") == 2  # training health, mode collapse
    late_part = page[page.index("Run late"):]
    assert "no epoch has closed yet" in late_part and "Plotly.newPlot" not in late_part
    assert "No data yet" in late_part
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
    records = healthy_records(info_events=True) + make_run("c", 120, collapse_at=60)
    runs = {r.run: r for r in group_runs(records)}
    assert any(runs["lr1e-4"].events)  # info-level stalls only
    assert verdict(runs["lr1e-4"]).level == "healthy"
    v = verdict(runs["c"])
    assert v.level == "unhealthy"
    assert v.fired[0] == "mode_collapse" and "rank_desync" in v.fired
    assert "mode_collapse" in v.active and v.diagnoses == ["mode_collapse_confirmed"]
    recovered = [r for r in make_run("d", 80, collapse_at=40, world_size=1) if r["type"] == "epoch"]
    recovered[-1]["metrics"].update({"health/mode_collapse": 0})
    recovered[-1]["events"] = []
    for r in recovered:
        for e in r["events"]:
            e["severity"] = "warning"
    assert verdict(group_runs(recovered)[0]).level == "recovered"
    # A warning-level rule still raised at the last epoch: healthy, with warnings; the
    # same rule at critical severity: unhealthy.
    warned = copy.deepcopy(recovered)
    warned[-1]["metrics"]["health/mode_collapse"] = 1
    assert verdict(group_runs(warned)[0]).level == "warnings"
    for r in warned:
        for e in r["events"]:
            e["severity"] = "critical"
    assert verdict(group_runs(warned)[0]).level == "unhealthy"
    row = summary_row(group_runs(recovered)[0])
    assert row["_live"] and row["final_knee_healthy"] == 0
    assert row["first_knee_healthy_epoch"] is None  # collapsed before reaching health
    assert math.isfinite(row["min_total_loss"])
    assert epoch_spans([5, 1, 2, 3, 7, None]) == "1–3, 5, 7" and epoch_spans([None]) == "run-level"


def test_records_survive_a_json_round_trip() -> None:
    # Replayed from JSONL: rank keys become strings, NaN stays NaN.
    records = json.loads(json.dumps(make_run("j", 40, collapse_at=20)))
    ranks = json.loads(json.dumps(RANKS))
    ranks["j"] = ranks.pop("lr4e-4")
    page = render_report(records, PROFILE, ranks=ranks)
    part = page[page.index("<h3>Ranks</h3>"):]
    assert part.count("<tr>") == 3  # header, rank 0, rank 1: not duplicated by key type
