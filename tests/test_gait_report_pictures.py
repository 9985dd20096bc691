"""A real gait-diffusion run through a real collector: its per-step curve and the pictures of
what it generated, in the JSONL, the offline wandb run, the report and a replay alike.

The example model trains in this process (the loop the README shows); every expected
figure is computed here with numpy from what the run itself produced (its step losses,
gradient norms, generated samples, training windows and constants), never read back from
the monitor. The report is rendered by headless Chromium and the screenshot saved as
``out/test-artifacts/report-gait-pictures.png`` (the per-step curve and the pictures) and
``report-gait-run.png`` (the whole page): generated knee and GRF curves over the gait
cycle beside the training data's, which a person judges at a glance.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CollectorProc, env, replayed_jsonl
from support.gait_cycles import cycles
from support.wandb_readback import find_offline_runs, read_offline_run
from test_report_browser import ARTIFACTS, FLAGS

from collector.analysis.pictures import BAND, MAX_CURVES, even_rows
from collector.report.steps import step_curve
from collector.sinks.wandb_views import STEP_AXIS
from examples.gait_diffusion import data as gd
from examples.gait_diffusion.train import TrainConfig, train

RUN = "gait-pictures"
CONFIG = dict(epochs=12, pseudo_dataset_len=512, validate_every=4, val_samples=32)
CHANNELS = ("knee_angle_r", "grf_vz_r")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gaitpics")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1",
                        "--wandb-mode", "offline", "--wandb-dir", str(tmp / "wandb")).start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: more threads only contend
    try:
        result = train(TrainConfig(endpoint=col.endpoint, run=RUN, **CONFIG))
    finally:
        torch.set_num_threads(threads)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    (run_dir,) = find_offline_runs(tmp / "wandb")
    return {"tmp": tmp, "col": col, "result": result, "recs": col.records(),
            "wandb": read_offline_run(run_dir), "run_dir": run_dir}


def _pictures(recs: list[dict]) -> dict[int, dict]:
    return {r["epoch"]: r for r in recs if r["type"] == "pictures"}


def _view(side: dict) -> dict:
    """What a side of a gait picture draws: its gait cycles when it has some."""
    return side["cycles"] if side["cycles"] and side["cycles"]["count"] else side


def _close(got: list, want: np.ndarray) -> None:
    """Lists of 6-digit floats against numpy, position by position (6 digits: 5e-6)."""
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=5.1e-6, atol=1e-12)


def test_pictures_at_each_validation_epoch_equal_numpy_on_the_samples(job):
    r, pics = job["result"], _pictures(job["recs"])
    assert sorted(pics) == sorted(r.validation) == [4, 8, 12]  # each validation, the last
    names = list(r.channel_names)
    windows = gd.make_dataset(gd.DataConfig(pseudo_dataset_len=CONFIG["pseudo_dataset_len"],
                                            window_len=64)).windows.numpy()
    cols = [names.index(ch) for ch in CHANNELS]
    physical = {"training": windows[..., cols] * r.std[cols] + r.mean[cols]}
    # contact: 20 % of the training force's 95th percentile
    threshold = 0.2 * np.quantile(physical["training"][..., 1], 0.95)
    real_cycles, _, real_lengths = cycles(physical["training"], 1, threshold, 6, 64)
    median = np.median(real_lengths)
    assert len(real_cycles) > 40 and 45 <= median <= 63  # strides of 0.95-1.25 s at 50 Hz
    for epoch, rec in pics.items():
        p = rec["picture"]
        assert rec["kind"] == "gait" and p["channels"] == list(CHANNELS)
        assert p["x"] == list(range(64)) and p["physical"] == [True, True]
        np.testing.assert_allclose(p["contact_threshold"], threshold, rtol=5.1e-6)
        physical["generated"] = r.validation[epoch][..., cols].astype(np.float64) * \
            r.std[cols] + r.mean[cols]
        for side, span in (("generated", (0.5 * median, 2.0 * median)), ("training", (6, 64))):
            got, x = p[side], physical[side]
            assert got["count"] == got["band_count"] == x.shape[0]
            shown = even_rows(x.shape[0], MAX_CURVES)
            assert got["rows"] == shown.tolist()
            cut, rows, _ = cycles(x, 1, threshold, *span)
            assert got["cycles"]["count"] == len(rows) and got["cycles"]["windows"] == len(x)
            for j, ch in enumerate(CHANNELS):
                _close(got["curves"][ch], x[shown][..., j])
                _close(got["mean"][ch], x[..., j].mean(axis=0))
                _close(got["low"][ch], np.quantile(x[..., j], BAND[0], axis=0))
                _close(got["high"][ch], np.quantile(x[..., j], BAND[1], axis=0))
                if rows:
                    c = cut[..., j]
                    _close(got["cycles"]["curves"][ch], c[even_rows(len(rows), MAX_CURVES)])
                    _close(got["cycles"]["mean"][ch], c.mean(axis=0))
                    _close(got["cycles"]["low"][ch], np.quantile(c, BAND[0], axis=0))
                    _close(got["cycles"]["high"][ch], np.quantile(c, BAND[1], axis=0))


def test_the_step_curve_equals_numpy_on_the_steps(job):
    r = job["result"]
    curve = step_curve([x for x in job["recs"] if x["type"] == "steps"])
    steps = np.arange(1, r.step_loss.size + 1)  # the client numbers steps from 1
    assert curve.width == 1 and len(curve) == steps.size  # a short run: every step
    c = curve.columns
    np.testing.assert_array_equal(c["step"], steps)
    np.testing.assert_allclose(c["loss"], r.step_loss, rtol=1e-6)  # float32 on the wire
    np.testing.assert_allclose(c["loss_max"], r.step_loss, rtol=1e-6)
    np.testing.assert_allclose(c["grad_norm"], r.grad_norm, rtol=1e-6)
    assert (c["n"] == 1).all() and c["nonfinite"].sum() == 0


def test_wandb_has_the_step_rows_and_a_figure_per_picture(job):
    w, recs = job["wandb"], job["recs"]
    points = [(p, i) for x in recs if x["type"] == "steps" for i, p in
              enumerate(x["points"]["step"])]
    rows = [row for row in w["history"] if STEP_AXIS in row]
    assert [row[STEP_AXIS] for row in rows] == [p for p, _ in points]
    loss = [v for x in recs if x["type"] == "steps" for v in x["points"]["loss"]]
    np.testing.assert_allclose([row["steps/loss"] for row in rows], loss)
    assert all("epoch" not in row for row in rows)  # the curve's axis is its own
    assert w["metrics"]["steps/loss"]["step_metric"] == STEP_AXIS
    assert w["metrics"]["steps/grad_norm_max"]["step_metric"] == STEP_AXIS
    figs = [row for row in w["history"] if "pictures/gait" in row]
    assert [row["epoch"] for row in figs] == [4, 8, 12]
    assert all("ranks/reporting" in row for row in figs)  # in the row of their epoch
    for row in figs:
        entry = row["pictures/gait"]
        assert entry["_type"] == "plotly-file"
        fig = json.loads((job["run_dir"] / "files" / entry["path"]).read_text())
        drawn = _view(_pictures(recs)[row["epoch"]]["picture"]["generated"])
        means = [t for t in fig["data"] if t.get("name", "").startswith("generated: mean")]
        assert means and means[0]["y"] == drawn["mean"][CHANNELS[0]]
    epochs = [row for row in w["history"] if "ranks/reporting" in row]
    assert [row["epoch"] for row in epochs] == list(range(1, CONFIG["epochs"] + 1))


def test_replay_equals_live_byte_for_byte(job, tmp_path):
    col = job["col"]
    replayed = replayed_jsonl(col.record, tmp_path)
    assert replayed == col.jsonl.read_bytes()
    kinds = [json.loads(line)["type"] for line in replayed.decode().splitlines()]
    assert kinds.count("pictures") == 3 and kinds.count("steps") >= CONFIG["epochs"]


def test_the_report_shows_generated_beside_real_gait_curves(job, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium on PATH")
    page = tmp_path / "report.html"
    subprocess.run([sys.executable, "-m", "collector", "report", str(job["col"].record),
                    "-o", str(page)], env=env(), check=True, capture_output=True, timeout=300)
    html = page.read_text()
    # the report's figure is the JSONL's picture: the last validation epoch shown
    last = _view(_pictures(job["recs"])[12]["picture"]["training"])
    assert json.dumps(last["mean"][CHANNELS[0]]).replace(" ", "") in html.replace(" ", "")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png, whole = ARTIFACTS / "report-gait-pictures.png", ARTIFACTS / "report-gait-run.png"
    for old in (png, whole):
        old.unlink(missing_ok=True)
    shutil.copy(page, ARTIFACTS / "report-gait-run.html")
    subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'chromium0'}",
                    "--window-size=1400,4800", f"--screenshot={whole}", page.as_uri()],
                   capture_output=True, timeout=180, check=True)  # the whole page
    # the run's section from its per-step curve down: the pictures are in view
    focused = tmp_path / "focused.html"
    focused.write_text(html.replace("<body>", "<body><style>.grid,header,.verdict,"
                                              "section>h2~p,details,table{display:none}"
                                              "</style>", 1))
    subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'chromium'}",
                    "--window-size=1400,1800", f"--screenshot={png}", focused.as_uri()],
                   capture_output=True, timeout=180, check=True)
    for shot in (png, whole):
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000
    dom = subprocess.run([browser, *FLAGS, f"--user-data-dir={tmp_path / 'chromium2'}",
                          "--window-size=1400,1200", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180, check=True).stdout
    figure = _drawn(dom, "run-1-pictures1")
    pic = _pictures(job["recs"])[12]["picture"]
    n_gen, n_real = (pic[side]["cycles"]["count"] for side in ("generated", "training"))
    assert n_real > 40  # real windows: many complete cycles
    gen = (f"knee_angle_r: generated, {n_gen} gait cycles in 32 samples" if n_gen else
           "knee_angle_r: generated (32 samples; no complete gait cycle)")
    assert gen in figure
    assert f"knee_angle_r: training, {n_real} gait cycles in 512 windows" in figure
    assert "% of gait cycle (heel strike to heel strike)" in figure
    assert "validation epoch 12" in figure  # the slider, at the last epoch
    assert "loss per step" in _drawn(dom, "run-1-steps")


def _drawn(dom: str, div_id: str) -> str:
    """A figure's part of the DOM after plotly.js ran; it must have drawn its SVG."""
    start = dom.index(f'<div id="{div_id}" class="plotly-graph-div')
    end = dom.find('class="plotly-graph-div', start + 40)
    part = dom[start:end if end > 0 else len(dom)]
    assert '<svg class="main-svg"' in part, f"{div_id}: plotly drew no SVG"
    return part

