"""Pictures of generated samples beside the training data: gait curves and cycles, image
grids, per-channel histograms; each equal to numpy on the raw samples, bounded for any batch,
the same in the records, the report and wandb.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from support.gait_cycles import cycles
from support.wire_runs import offline_wandb_run, records, run_messages, typed_records

from collector.analysis.health import RunHealth
from collector.analysis.inputs import DataConstants, ValidationInput
from collector.analysis.pictures import (
    BAND,
    HIST_BINS,
    MAX_CURVES,
    MAX_HIST_VALUES,
    MAX_IMAGES,
    even_rows,
    positions,
    sample_picture,
)
from collector.analysis.profile_load import load_profile
from collector.analysis.samples import TrainingSubsample
from collector.records import SamplesPictureRecord
from collector.report.html import render_report
from collector.sinks.jsonl import dumps
from examples.gait_diffusion import data as gd

PROFILE = load_profile(None)
GAIT = ("knee_angle_r", "grf_vz_r")


def _keep(rows: np.ndarray, dtype: str = "float32") -> TrainingSubsample:
    keep = TrainingSubsample(PROFILE.reference_block_rows, PROFILE.reference_max_values)
    flat = rows.reshape(-1, rows.shape[-1])
    for chunk in np.array_split(flat, 3):  # as log_data_stats ships it: in chunks
        keep.add(np.ascontiguousarray(chunk), dtype)
    return keep


def _close(got, want) -> None:
    """6-digit floats (None where not finite) against numpy."""
    got = np.array(got, dtype=np.float64)
    np.testing.assert_allclose(got, want, rtol=5.1e-6, atol=1e-12)


@pytest.fixture(scope="module")
def gait():
    """Real gait windows of 300 samples (decimated to 256 positions): training data, and
    'generated' windows from other subjects, normalised, with their constants."""
    train = gd.make_dataset(gd.DataConfig(pseudo_dataset_len=96, window_len=300, seed=1))
    gen = gd.make_dataset(gd.DataConfig(pseudo_dataset_len=40, window_len=300, seed=2))
    names = list(train.channel_names)
    consts = DataConstants(names, train.mean.double().numpy(), train.std.double().numpy())
    return {"train": train.windows.numpy(), "gen": gen.windows.numpy(), "names": names,
            "consts": consts}


def test_gait_curves_bands_and_cycles_equal_numpy(gait):
    names, consts = gait["names"], gait["consts"]
    gen = gait["gen"]
    v = ValidationInput(5, "float32", [gen[:25], gen[25:]], names)  # two ranks' samples
    kind, p = sample_picture(v, _keep(gait["train"]), consts, PROFILE)
    assert kind == "gait" and p["channels"] == list(GAIT) and p["physical"] == [True, True]
    at = np.unique(np.linspace(0, 299, 256).round().astype(int))
    assert p["x"] == at.tolist() == positions(300).tolist()
    cols = [names.index(c) for c in GAIT]

    def physical(x):
        return x[:, at][..., cols].astype(np.float64) * consts.std[cols] + consts.mean[cols]

    sides = {"training": physical(gait["train"]), "generated": physical(gen)}
    threshold = 0.2 * np.quantile(sides["training"][..., 1], 0.95)
    assert p["contact_threshold"] == pytest.approx(threshold, rel=5.1e-6)
    _, _, lengths = cycles(sides["training"], 1, threshold, 6, at.size)
    median = np.median(lengths)
    for side, span in (("training", (6, at.size)), ("generated", (0.5 * median, 2 * median))):
        got, x = p[side], sides[side]
        shown = even_rows(len(x), MAX_CURVES)
        assert got["count"] == len(x) and got["rows"] == shown.tolist()
        cut, rows, _ = cycles(x, 1, threshold, *span)
        assert got["cycles"]["count"] == len(rows) > 5  # long windows: most hold a cycle
        assert got["cycles"]["rows"] == [rows[i] for i in even_rows(len(rows), MAX_CURVES)]
        for j, ch in enumerate(GAIT):
            _close(got["curves"][ch], x[shown][..., j])
            _close(got["mean"][ch], x[..., j].mean(axis=0))
            _close(got["low"][ch], np.quantile(x[..., j], BAND[0], axis=0))
            _close(got["high"][ch], np.quantile(x[..., j], BAND[1], axis=0))
            c = cut[..., j]
            _close(got["cycles"]["curves"][ch], c[even_rows(len(rows), MAX_CURVES)])
            _close(got["cycles"]["mean"][ch], c.mean(axis=0))
            _close(got["cycles"]["high"][ch], np.quantile(c, BAND[1], axis=0))
    # the training cycles are walking: the knee bends most in swing, the foot is unloaded
    knee = np.array(p["training"]["cycles"]["mean"]["knee_angle_r"])
    grf = np.array(p["training"]["cycles"]["mean"]["grf_vz_r"])
    assert 0.55 <= np.argmax(knee) / (knee.size - 1) <= 0.85 and grf[30:45].max() < 50.0


def test_bfloat16_samples_are_widened_from_their_bit_patterns(gait):
    names = gait["names"]
    gen = np.ascontiguousarray(gait["gen"][:, :64])
    bits = (gen.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16, truncated
    widened = (bits.astype(np.uint32) << 16).view(np.float32)
    v = ValidationInput(1, "bfloat16", [bits], names)
    _, p = sample_picture(v, None, None, PROFILE)  # no constants: the values as sent
    knee = names.index("knee_angle_r")
    assert p["physical"] == [False, False] and p["training"] is None
    _close(p["generated"]["mean"]["knee_angle_r"], widened[..., knee].mean(axis=0))


def _blocks(x: np.ndarray, fh: int, fw: int) -> np.ndarray:
    n, h, w, c = x.shape
    return x[:, :h // fh * fh, :w // fw * fw].reshape(n, h // fh, fh, w // fw, fw, c) \
        .mean(axis=(2, 4))


def test_images_are_a_small_grid_of_block_means_on_one_scale():
    rng = np.random.default_rng(0)
    real = rng.uniform(-1, 1, (30, 64, 48, 3)).astype(np.float32)
    gen = (rng.normal(0, 2, (20, 64, 48, 3))).astype(np.float32)
    kind, p = sample_picture(ValidationInput(2, "float32", [gen], ["r", "g", "b"]),
                             _keep(real), None, PROFILE)
    assert kind == "images" and p["mode"] == "rgb" and p["size"] == [32, 24]
    want_real = _blocks(real[even_rows(30, MAX_IMAGES)], 2, 2)
    want_gen = _blocks(gen[even_rows(20, MAX_IMAGES)], 2, 2)
    lo, hi = want_real.min(), want_real.max()  # the training images' range
    assert p["range"] == pytest.approx([lo, hi])

    def pixels(x):
        return np.round(np.clip((x - lo) / (hi - lo), 0, 1) * 255)

    np.testing.assert_array_equal(np.array(p["training"]["images"]), pixels(want_real))
    np.testing.assert_array_equal(np.array(p["generated"]["images"]), pixels(want_gen))
    assert p["generated"]["count"] == 20 and p["training"]["count"] == 30


def test_one_channel_images_are_grey():
    rng = np.random.default_rng(1)
    gen = rng.random((10, 28, 28, 1)).astype(np.float32)
    _, p = sample_picture(ValidationInput(1, "float32", [gen], ["x"]), None, None, PROFILE)
    assert p["mode"] == "grey" and p["size"] == [28, 28] and p["training"] is None
    lo, hi = gen[even_rows(10, MAX_IMAGES)].min(), gen[even_rows(10, MAX_IMAGES)].max()
    want = np.round((gen[even_rows(10, MAX_IMAGES)] - lo) / (hi - lo) * 255)
    np.testing.assert_array_equal(np.array(p["generated"]["images"]), want)


@pytest.mark.parametrize("shape", [(500, 3), (40, 16, 3)])
def test_other_samples_get_histograms_of_both_sides(shape):
    rng = np.random.default_rng(2)
    gen = rng.normal(0.5, 1.0, shape).astype(np.float32)
    gen.reshape(-1)[7] = np.nan
    real = rng.normal(0.0, 1.0, (3000, 3)).astype(np.float32)
    kind, p = sample_picture(ValidationInput(3, "float32", [gen], ["a", "b", "c"]),
                             _keep(real), None, PROFILE)
    assert kind == "histograms" and p["count"] == shape[0] and len(p["channels"]) == 3
    flat = gen.reshape(-1, 3).astype(np.float64)
    for i, ch in enumerate(p["channels"]):
        g, r = flat[:, i][np.isfinite(flat[:, i])], real[:, i].astype(np.float64)
        lo, hi = min(g.min(), r.min()), max(g.max(), r.max())
        assert ch["name"] == "abc"[i]
        _close(ch["edges"], np.linspace(lo, hi, HIST_BINS + 1))
        assert ch["generated"] == np.histogram(g, HIST_BINS, (lo, hi))[0].tolist()
        assert ch["training"] == np.histogram(r, HIST_BINS, (lo, hi))[0].tolist()
        assert ch["generated_nonfinite"] == (i == 7 % 3)


def test_a_huge_batch_yields_a_bounded_picture(gait):
    names = gait["names"]
    rng = np.random.default_rng(3)
    big = {"gait": ((20_000, 64, 8), names), "images": ((300, 128, 128, 3), list("rgb")),
           "histograms": ((2_000, 600, 4), list("wxyz"))}
    limits = {"gait": 80_000, "images": 2 * MAX_IMAGES * 32 * 32 * 3 * 4 + 2_000,
              "histograms": 12_000}
    for kind, (shape, chans) in big.items():
        x = rng.normal(size=shape).astype(np.float32)
        got, p = sample_picture(ValidationInput(9, "float32", [x], chans), None, None,
                                PROFILE)
        size = len(dumps(SamplesPictureRecord("r", 9, got, p)))
        assert got == kind and size < limits[kind], (kind, size)
        if kind == "histograms":
            assert all(sum(c["generated"]) <= MAX_HIST_VALUES for c in p["channels"])


def test_samples_without_a_channel_axis_get_no_picture():
    health = RunHealth("r", PROFILE)
    flat = ValidationInput(1, "float32", [np.zeros(5, np.float32)], [])
    assert sample_picture(flat, None, None, PROFILE) is None and health._picture(1, flat) == ()
    empty = ValidationInput(1, "float32", [np.zeros((0, 8, 2), np.float32)], list(GAIT))
    assert health._picture(1, empty) == ()


# -- through the pipeline, the report and wandb -------------------------------------------------
def _pictures(recs: list[dict], run: str) -> dict[int, dict]:
    return {r["epoch"]: r for r in recs if r["type"] == "pictures" and r["run"] == run}


def test_each_validation_epoch_is_pictured_late_samples_at_their_own_epoch():
    recs = records([run_messages("first", 8, validate_every=2),
                    run_messages("late", 8, validate_every=2, late_validation=True)])
    first, late = _pictures(recs, "first"), _pictures(recs, "late")
    assert sorted(first) == sorted(late) == [2, 4, 6, 8]
    assert all(r.get("amends") for r in late.values())
    assert not any(r.get("amends") for r in first.values())
    for e in first:  # the same samples: the same picture, whichever order they came in
        assert first[e]["picture"] == late[e]["picture"]
    amended = [i for i, r in enumerate(recs) if r["type"] == "epoch" and r.get("amends")]
    for i in amended:  # right before the amending epoch record, at its epoch
        assert recs[i - 1]["type"] == "pictures" and recs[i - 1]["epoch"] == recs[i]["epoch"]


def _figure(page: str, div_id: str) -> dict:
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(div_id) + r'",\s*', page)
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(page, m.end())
    layout, _ = decoder.raw_decode(page[end:].lstrip().removeprefix(",").lstrip())
    return {"data": data, "layout": layout}


def test_the_report_draws_what_the_records_hold():
    recs = records([run_messages("hist", 6, channels=("a", "b", "c"), validate_every=3)])
    pics = _pictures(recs, "hist")
    page = render_report(recs, PROFILE)
    fig = _figure(page, "run-1-pictures1")
    shown = [t for t in fig["data"] if t.get("visible") is not False]
    last = pics[6]["picture"]["channels"][0]
    n, width = last["generated_n"], last["edges"][1] - last["edges"][0]
    bars = [t for t in shown if t["name"] == "generated"]
    assert bars[0]["y"] == pytest.approx([c / (n * width) for c in last["generated"]])
    steps = fig["layout"]["sliders"][0]["steps"]
    assert [s["label"] for s in steps] == ["3", "6"]  # each validation epoch, the last shown
    assert fig["layout"]["sliders"][0]["active"] == 1


def test_wandb_gets_a_plotly_figure_per_picture(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    imgs = rng.random((64, 8, 8, 3)).astype(np.float32)

    def images(epoch, r, channels=3):
        return r.random((12, 8, 8, 3)).astype(np.float32)

    recs = typed_records([run_messages("img", 4, channels=("r", "g", "b"), samples=images,
                                       data=imgs, validate_every=2)])
    run_dir, run = offline_wandb_run(recs, tmp_path, monkeypatch)
    rows = [row for row in run["history"] if "pictures/images" in row]
    assert [row["epoch"] for row in rows] == [2, 4]
    assert all("ranks/reporting" in row for row in rows)  # in the row of their epoch
    pics = [r for r in recs if isinstance(r, SamplesPictureRecord)]
    for row, rec in zip(rows, pics, strict=True):
        assert row["pictures/images"]["_type"] == "plotly-file"
        fig = json.loads((run_dir / "files" / row["pictures/images"]["path"]).read_text())
        grids = [t for t in fig["data"] if t["type"] == "image"]
        assert len(grids) == 2  # generated and training
        first = rec.picture["generated"]["images"][0]
        assert grids[0]["z"][0][:8] == [px[:3] for px in first[0]]  # the first image's row
