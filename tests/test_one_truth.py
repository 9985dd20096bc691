"""One truth in every output: a real 2-rank job whose gradients explode twice, through a
real collector with wandb offline. For every epoch, every metric and flag of the JSONL
equals the wandb history read back from the run's files and the HTML report's data."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
from conftest import CollectorProc, by_epoch, env, finish, start_trainer
from support.wandb_readback import find_offline_runs, read_offline_run

EPOCHS = 12
RULE = "health/exploding_gradients"


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("truth")
    wandb_dir = tmp / "wandb"
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1",
                        "--wandb-mode", "offline", "--wandb-dir", str(wandb_dir)).start()
    procs = [start_trainer(col.endpoint, "truth", r, 2, tmp / f"rank{r}.json", epochs=EPOCHS,
                           steps=10, validate=True, explode="3-6,9-10") for r in range(2)]
    finish(procs)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    recs = col.records()
    report = tmp / "report.html"
    subprocess.run([sys.executable, "-m", "collector", "report", str(col.record), "-o",
                    str(report)], env=env(), cwd=tmp, check=True, capture_output=True,
                   timeout=180)
    (run_dir,) = find_offline_runs(wandb_dir)
    return {"recs": recs, "wandb": read_offline_run(run_dir), "report": report.read_text()}


def _same(a, b) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    return a == b


def test_the_rule_stays_raised_clears_and_raises_again(job):
    flags = [m.get(RULE) for _, m in sorted(by_epoch(job["recs"]).items())]
    assert all(f in (0, 1) for f in flags), flags  # a flag every epoch, not only at changes
    episodes = re.findall(r"1+", "".join(map(str, flags)))
    assert len(episodes) >= 2 and max(map(len, episodes)) >= 3, flags
    events = [(r["epoch"], e["kind"]) for r in job["recs"] for e in r["events"]
              if e["rule"] == RULE.split("/", 1)[1]]
    assert [k for _, k in events][:3] == ["raised", "cleared", "raised"]


def test_wandb_history_equals_the_jsonl_for_every_epoch(job):
    ours = by_epoch(job["recs"])
    rows: dict[int, dict] = {}
    for row in job["wandb"]["history"]:
        if "epoch" in row:
            rows.setdefault(row["epoch"], {}).update(row)
    assert sorted(rows) == sorted(ours) == list(range(1, EPOCHS + 1))
    for epoch, metrics in ours.items():
        for key, value in metrics.items():
            assert _same(value, rows[epoch].get(key)), (epoch, key, value, rows[epoch].get(key))
        wandb_flags = {k for k in rows[epoch] if k.startswith(("health/", "diagnosis/"))}
        assert wandb_flags - {"health/n_raised", "health/events"} <= set(metrics), epoch


def _report_traces(page: str) -> dict[str, dict[int, float]]:
    """Every plotted series of the report: name -> {epoch: value}."""
    out: dict[str, dict[int, float]] = {}
    for call in re.finditer(r'Plotly\.newPlot\(\s*"[^"]+",\s*(\[.*?\]),\s*\{', page, re.S):
        for trace in json.loads(call.group(1)):
            if isinstance(trace.get("x"), list) and isinstance(trace.get("y"), list):
                ys = trace.get("customdata") if trace.get("type") == "bar" else trace["y"]
                out[trace["name"]] = dict(zip(trace["x"], ys, strict=True))
    return out


def test_the_report_plots_what_the_jsonl_says(job):
    ours = by_epoch(job["recs"])
    traces = _report_traces(job["report"])
    checked = 0
    for name, points in traces.items():
        if name not in next(iter(ours.values())):
            continue  # a threshold line or a legend-only trace
        for epoch, y in points.items():
            assert float(f"{ours[epoch][name]:.6g}") == y, (name, epoch)
            checked += 1
    assert checked >= 4 * EPOCHS, sorted(traces)
    last = next(r for r in reversed(job["recs"]) if r["type"] == "epoch")
    header = job["report"][job["report"].index("<header"):job["report"].index("</header>")]
    for rule in last["raised"]:
        assert rule.split("/")[-1] in header
