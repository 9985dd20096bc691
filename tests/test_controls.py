"""Crafted CONTROL records with valid checksums: every command skips and counts them, and
what it makes of the rest of the file is what it makes of the file without them."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import hostile
import msgpack
import pytest
from conftest import CollectorProc, env, finish, start_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.wandb_readback import find_offline_runs, read_offline_run

from collector.analysis.profile_load import load_profile
from collector.ingest.pipeline import Pipeline
from collector.recording import controls
from collector.recording.format import pack_record
from collector.recording.inspect import inspect_recording
from collector.recording.reader import ReadStats
from collector.sinks.jsonl import MemorySink

RUN = "crafted"
CRAFTED = hostile.crafted_control_bodies(RUN)
ALL = hostile.crafted_controls(RUN)
RAW = ALL[len(CRAFTED):]  # frames that are no control at all


def _write(path: Path, crafted: list[list[bytes]], every: int = 1) -> Path:
    return hostile.write_recording(path, RUN, crafted, every)


def _all_crafted() -> list[list[bytes]]:
    return ALL


def _replay(path: Path) -> tuple[list[dict], ReadStats]:
    sink = MemorySink()
    pipe = Pipeline(load_profile(None), sink)
    st = pipe.feed_recording(path)
    pipe.finish()
    return sink.json(), st


# -- the schema ------------------------------------------------------------------------
def test_what_the_live_collector_writes_is_valid_and_round_trips():
    for ctl in ({"op": "rejects", "counts": {"": {"bad_msgpack": 2}, RUN: {"bad_kind": 1}}},
                {"op": "close_epoch", "run": RUN, "epoch": 4, "missing": [2, 5]},
                {"op": "close_epoch", "run": RUN, "epoch": 4, "missing": [[0, 99], 120]},
                {"op": "finish_run", "run": RUN},
                {"op": "stop_run", "run": RUN, "rule": "diagnosis/gradient_explosion",
                 "step": 140, "seen": 120, "rate": 21.5}):
        typed = controls.parse([msgpack.packb(ctl)])
        assert typed is not None and typed.as_dict() == ctl
        assert controls.check(typed.as_dict()) == typed


def test_every_crafted_control_is_refused():
    for c in CRAFTED:
        assert controls.check(c) is None, c
    for frames in RAW:
        assert controls.parse(frames) is None, frames


_leaf = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) \
    | st.floats(allow_nan=True) | st.text(max_size=8) | st.binary(max_size=8) \
    | st.sampled_from(["op", "rejects", "close_epoch", "finish_run", "run", "epoch",
                       "missing", "counts", RUN])
_tree = st.recursive(_leaf, lambda kids: st.lists(kids, max_size=4)
                     | st.dictionaries(st.text(max_size=8) | st.sampled_from(
                         ["op", "run", "epoch", "missing", "counts"]), kids, max_size=4),
                     max_leaves=20)
_near = st.builds(lambda op, k, v, base: {**base, "op": op, k: v},
                  st.sampled_from(["rejects", "close_epoch", "finish_run"]),
                  st.sampled_from(["run", "epoch", "missing", "counts"]), _tree,
                  st.sampled_from([{"run": RUN, "epoch": 1, "missing": []},
                                   {"counts": {RUN: {"bad_kind": 1}}}, {"run": RUN}]))


def _valid(typed: controls.Control) -> bool:
    if isinstance(typed, controls.Rejects):
        return all(type(n) is int and n >= 0 for c in typed.counts.values()
                   for n in c.values())
    if isinstance(typed, controls.CloseEpoch):
        return type(typed.epoch) is int and typed.epoch >= 0 and bool(typed.run)
    return type(typed.run) is str and bool(typed.run)


@settings(max_examples=400, deadline=None)
@given(_tree | _near)
def test_the_check_never_raises_and_passes_only_well_typed_controls(ctl):
    typed = controls.check(ctl)
    if typed is not None:
        assert _valid(typed) and controls.check(typed.as_dict()) == typed
    packed = msgpack.packb(ctl)
    assert controls.parse([packed]) == typed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_parse_never_raises_on_bytes(raw):
    typed = controls.parse([raw])
    assert typed is None or _valid(typed)


# -- the readers, in process -----------------------------------------------------------
def test_inspect_and_replay_skip_count_and_reach_what_the_clean_file_gives(tmp_path):
    clean = _write(tmp_path / "clean.twrec", [])
    crafted = _write(tmp_path / "crafted.twrec", _all_crafted())
    want, st0 = _replay(clean)
    got, st = _replay(crafted)
    assert st.bad_controls == len(CRAFTED) + len(RAW) and st0.bad_controls == 0
    assert st.corrupted == 0 and got == want
    info, info0 = inspect_recording(crafted), inspect_recording(clean)
    assert info["bad_controls"] == len(CRAFTED) + len(RAW)
    assert info["runs"] == info0["runs"] and info["rejected_live"] == {}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(_tree | _near, min_size=1, max_size=6), st.integers(1, 8))
def test_replay_and_inspect_survive_any_control(tmp_path, ctls, every):
    path = _write(tmp_path / "fuzz.twrec", [[msgpack.packb(c)] for c in ctls], every)
    bad = sum(controls.check(c) is None for c in ctls)
    _, st = _replay(path)
    assert st.bad_controls == bad
    assert inspect_recording(path)["bad_controls"] == bad


def test_a_record_of_unknown_type_is_skipped_and_counted(tmp_path):
    path = _write(tmp_path / "u.twrec", [])
    with open(path, "ab") as fh:
        fh.write(pack_record(9, [b"from a later version, or from anyone"]))
    _, st = _replay(path)
    assert st.unknown_types == 1 and inspect_recording(path)["unknown_types"] == 1


# -- every command, as a process -------------------------------------------------------
def _tw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", *args], env=env(),
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("crafted")
    return _write(d / "clean.twrec", []), _write(d / "crafted.twrec", _all_crafted())


BAD = len(CRAFTED) + len(RAW)


def test_inspect_command(files):
    clean, crafted = files
    r = _tw("inspect", str(crafted), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["bad_controls"] == BAD
    assert info["runs"] == json.loads(_tw("inspect", str(clean), "--json").stdout)["runs"]
    table = _tw("inspect", str(crafted))
    assert table.returncode == 0 and f"bad controls {BAD}" in table.stdout


def test_replay_command(files, tmp_path):
    clean, crafted = files
    for name, path in (("clean", clean), ("crafted", crafted)):
        r = _tw("replay", str(path), "--jsonl", str(tmp_path / f"{name}.jsonl"))
        assert r.returncode == 0, r.stderr
    assert f"{BAD} bad controls" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "crafted.jsonl").read_text() == (tmp_path / "clean.jsonl").read_text()


def test_report_command(files, tmp_path):
    r = _tw("report", str(files[1]), "-o", str(tmp_path / "r.html"))
    assert r.returncode == 0, r.stderr
    assert f"{BAD} bad controls" in r.stderr and RUN in (tmp_path / "r.html").read_text()


@pytest.mark.parametrize("mode", ["disabled", "offline"])
def test_upload_command(files, tmp_path, mode):
    r = _tw("upload", str(files[1]), "--wandb-mode", mode, "--wandb-dir", str(tmp_path),
            "--jsonl", str(tmp_path / "up.jsonl"))
    assert r.returncode == 0, r.stderr
    assert f"{BAD} bad controls" in r.stderr
    runs = find_offline_runs(tmp_path)
    if mode == "disabled":
        assert runs == []
        return
    assert len(runs) == 1
    run = read_offline_run(runs[0])
    assert run["name"] == RUN and len(run["history"]) >= 3, run["history"]


def test_a_collector_restarted_on_a_crafted_recording(files, tmp_path, ipc):
    rec = tmp_path / "c.twrec"
    rec.write_bytes(files[1].read_bytes())
    col = CollectorProc(tmp_path, ipc).start()  # (--once: the rebuilt run is finished)
    finish([start_trainer(ipc, "after", 0, 1, tmp_path / "t.json", epochs=2, steps=5)])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            r["type"] == "summary" and r["run"] == "after" for r in col.records()):
        time.sleep(0.1)
    assert col.stop() == 0, col.log.read_text()[-3000:]
    log = col.log.read_text()
    assert f"{BAD} bad controls" in log and "Traceback" not in log
    assert [r["epoch"] for r in col.records() if r["type"] == "epoch"
            and r["run"] == "after"] == [1, 2]
    info = json.loads(_tw("inspect", str(rec), "--json").stdout)
    assert info["bad_controls"] == BAD  # the old part is read as before, the new appended
    assert info["runs"]["after"]["ranks"]["0"]["messages"] == json.loads(
        (tmp_path / "t.json").read_text())["stats"]["sent"]
