"""The report as a person sees it: rendered by headless Chromium, after plotly.js ran.

Each report is screenshotted into ``out/test-artifacts/`` (look at them) and its DOM is
dumped once the scripts ran, to check what the page shows: every plot drawn (plotly added
its SVG), epoch ticks that are whole numbers, legends under the axis titles and inside the
figure, and no false sentence. One report comes from a real training process that
validates every epoch, through a real collector and ``trainwatch report``; one from a
sweep fed through the real pipeline (healthy, other channels, collapsed with a rising loss).

Skipped only when Chromium is missing and ``TRAINWATCH_REQUIRE_BROWSER`` is unset
(``make test`` installs Chromium and sets it).
"""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, CollectorProc, env, finish, start_trainer
from support.wire_runs import collapsed, records, rising, run_messages

from collector.analysis.profile_load import load_profile
from collector.report.html import LEVEL_TEXT, write_report
from collector.report.model import group_runs, verdict

ARTIFACTS = ROOT / "out" / "test-artifacts"
FALSE_TEXT = ("no validation", "not reported", "Healthy, with warnings", "yet")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=15000")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("TRAINWATCH_REQUIRE_BROWSER"):
            pytest.fail("TRAINWATCH_REQUIRE_BROWSER is set but no chromium is on PATH "
                        "(make test installs it: apt-get install -y chromium)")
        pytest.skip("no chromium on PATH")
    return path


def _chromium(browser: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180, check=True)


def _look(browser: str, page: Path, name: str, tmp: Path, height: int,
          width: int = 1400) -> str:
    """Screenshot ``page`` into the artefacts; return its DOM after the scripts ran."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / f"{name}.png"
    png.unlink(missing_ok=True)
    shutil.copy(page, ARTIFACTS / f"{name}.html")
    _chromium(browser, tmp, f"--window-size={width},{height}", f"--screenshot={png}",
              page.as_uri())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000
    return _dom(browser, page, tmp, width)


def _dom(browser: str, page: Path, tmp: Path, width: int) -> str:
    return _chromium(browser, tmp, f"--window-size={width},1200", "--dump-dom",
                     page.as_uri()).stdout


def _shown_text(dom: str) -> str:
    """The words the page shows: no scripts, no styles, no tags, entities undone."""
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    text = re.sub(r"<[^>]+>", " ", text)
    return re.sub(r"\s+", " ", html.unescape(text))


def _check_figures(dom: str, expected: int, beside: int = 0) -> None:
    """``expected`` figures over the epochs, checked for whole-epoch ticks and legends, and
    ``beside`` others (per-step curves, sample pictures), each drawn."""
    figures = re.split(r'(?=<div id="[^"]+" class="plotly-graph-div)', dom)[1:]
    other = [f for f in figures if re.match(r'<div id="[^"]+-(steps|pictures\d+)"', f)]
    figures = [f for f in figures if f not in other]
    assert len(figures) == expected and len(other) == beside
    for fig in other:
        assert '<svg class="main-svg"' in fig, fig[:80]
    for fig in figures:
        name = re.match(r'<div id="([^"]+)"', fig).group(1)
        svg = re.search(r'<svg class="main-svg"[^>]*\bheight="([\d.]+)"', fig)
        assert svg, f"{name}: plotly drew no SVG"
        ticks = re.findall(r'<g class="x\d*tick"><text[^>]*>([^<]*)</text>', fig)
        assert ticks and all(re.fullmatch(r"\d+", t) for t in ticks), (name, ticks)
        titles = [float(y) for y in
                  re.findall(r'<text class="x\d*title"[^>]*?\by="([\d.]+)"', fig)]
        assert titles, f"{name}: no epoch axis title"
        legend = re.search(r'<g class="legend"[^>]*translate\(([\d.]+),([\d.]+)\)"><rect '
                           r'class="bg"[^>]*\bheight="([\d.]+)"', fig)
        assert legend, f"{name}: no legend"
        top, height = float(legend.group(2)), float(legend.group(3))
        assert top > max(titles) + 2, f"{name}: the legend covers the axis title"
        assert top + height <= float(svg.group(1)) + 1, f"{name}: the legend is cut off"


def test_a_real_run_validated_every_epoch_as_chromium_shows_it(chromium, tmp_path) -> None:
    col = CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet", "2").start()
    ranks = [start_trainer(col.endpoint, "validated-every-epoch", r, 2, tmp_path / f"t{r}.json",
                           validate=True, epochs=6, steps=12) for r in range(2)]
    finish(ranks)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    page = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "collector", "report", str(col.record), "-o",
                    str(page)], env=env(), check=True, capture_output=True, timeout=300)
    recs = col.records()
    assert sum(r["type"] == "epoch" and "validation/gen_std" in r["metrics"]
               for r in recs) == 6  # validated every epoch
    expected = verdict(group_runs(recs)[0], load_profile(None))
    dom = _look(chromium, page, "report-real-trainer", tmp_path, 3400)
    shown = _shown_text(dom)
    for text in FALSE_TEXT:
        assert text not in shown, text
    header = shown[:shown.index("Sweep summary")]
    assert f"trainwatch health report: {LEVEL_TEXT[expected.level]}" in header
    for key in expected.collapse:  # a collapse the rules found is said in the verdict
        assert key in header
    assert "2. Validation quality" in shown and "validation/knee_r_std (rad)" in shown
    _check_figures(dom, 4 + bool(expected.findings), beside=2)  # the steps, the pictures


def test_a_sweep_as_chromium_shows_it(chromium, tmp_path) -> None:
    recs = records([run_messages("healthy", 10), run_messages("own-channels", 10,
                                                              channels=("r", "g", "b"), seed=1),
                    run_messages("collapsed", 10, loss=rising, samples=collapsed, seed=2)])
    for e in range(1, 11):  # the sample-diversity figures the detection stage writes
        recs.append({"type": "epoch", "run": "own-channels", "epoch": e, "amends": True,
                     "raised": [], "ranks": {"count": 0, "ranges": []},
                     "missing": {"count": 0, "ranges": []}, "events": [],
                     "metrics": {**{f"validation/{c}_{s}": v for i, c in enumerate("rgb")
                                    for s, v in (("std", 0.9 + 0.01 * e + 0.05 * i),
                                                 ("mean", 0.01 * e - 0.03 * i),
                                                 ("w1", (0.5 + 0.2 * i) / e))},
                                 "validation/sample_diversity": 0.8 + 0.01 * e,
                                 "validation/duplicate_frac": 0.0}})
    page = tmp_path / "sweep.html"
    write_report(recs, page, load_profile(None), title="sweep")
    dom = _look(chromium, page, "report-sweep", tmp_path, 7600)
    shown = _shown_text(dom)
    for text in FALSE_TEXT:
        assert text not in shown, text
    header = shown[:shown.index("Sweep summary")]
    assert "sweep: Unhealthy" in header
    said = re.search(r"collapsed : Unhealthy — the generated samples collapsed: ([^—]*)", header)
    assert said and "gen_std_low" in said.group(1), header
    assert "train/total_loss ended above where it started" in header
    assert "healthy :" not in header and "own-channels :" not in header  # nothing to say
    badges = re.findall(r'<span class="badge lvl-(\w[\w-]*)">', dom)
    assert badges.count("healthy") == 4 and badges.count("unhealthy") == 2  # sweep + facts
    assert "validation/<channel>_std: per-channel std of the samples" in shown
    assert "validation/sample_diversity" in shown
    _check_figures(dom, 3 * 4 + 1, 3 * 2)  # four panels each, one findings timeline;
    # each run's per-step curve and pictures of its samples beside them. The narrowest
    # window that still shows two panels side by side: legends wrap the most
    _check_figures(_dom(chromium, page, tmp_path, 1180), 3 * 4 + 1, 3 * 2)


def test_the_artefacts_are_written_where_ci_collects_them() -> None:
    # The folder is git-ignored (/out/): artefacts never dirty a checkout.
    ignored = subprocess.run(["git", "check-ignore", "-q", str(ARTIFACTS / "x.png")],
                             cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0
