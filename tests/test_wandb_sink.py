"""The wandb sink against real offline wandb runs, read back from their ``.wandb`` files.

Two interleaved training runs go through one sink, two more (CLI flags, a sweep job) through
a second; the runs are started once per module because each offline run costs wandb-core.
"""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.wandb_readback import find_offline_runs, iter_records, read_offline_run
from support.wire_runs import run_messages, typed_records

from collector.records import (
    CLEARED,
    RAISED,
    ConfigRecord,
    DataStatsRecord,
    EpochRecord,
    Event,
    EventRecord,
    Record,
    RunRecord,
    SummaryRecord,
)
from collector.sinks.wandb_sink import (
    EVENT_COLUMNS,
    AlertGate,
    WandbSink,
    resolve_mode,
    wandb_run_id,
)

RUN_A, RUN_B = "gait/job-17:lr=1e-4", "job-18"
EPOCHS_A, EPOCHS_B = 12, 3
EXPLODE_A = (3, 4, 5, 6, 9, 10)  # exploding_gradients raised, cleared, raised again
_WANDB_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_PROJECT",
              "WANDB_ENTITY", "WANDB_RUN_GROUP", "WANDB_RUN_ID", "WANDB_SWEEP_ID",
              "WANDB_BASE_URL", "WANDB_DIR", "WANDB_TAGS", "WANDB_NOTES", "WANDB_JOB_TYPE")


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """No credentials, no collector-level WANDB_* settings, wandb's own dirs in tmp."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for name in _WANDB_ENV:
            mp.delenv(name, raising=False)
        for name in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
                     "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(home / name.lower()))
        mp.setenv("NETRC", str(home / "no-netrc"))
        mp.setenv("WANDB_ERROR_REPORTING", "false")
        yield home


def _run(name: str, epochs: int, **kw: Any) -> list[Record]:
    """What the pipeline emits for one run's wire messages (the only shape sinks get)."""
    return typed_records([run_messages(name, epochs, **kw)])


def _records_ab() -> list[Record]:
    """Two runs interleaved; a's record after b's summary, then one of b's after it."""
    env_a = {"WANDB_PROJECT": "gait", "WANDB_ENTITY": "team-x", "WANDB_RUN_GROUP": "ddp"}
    a = _run(RUN_A, EPOCHS_A, validate_every=2, explode=EXPLODE_A, env=env_a)
    b = _run(RUN_B, EPOCHS_B, samples=None, seed=1)
    late_b = EpochRecord(RUN_B, EPOCHS_B + 1, {"train/total_loss": 1.0})  # after b's summary
    return [*a[:4], *b, *a[4:], late_b]


def _epochs(recs: list[Record], run: str) -> dict[int, dict]:
    """Each epoch's metrics as the records say them (an amendment's over the original)."""
    out: dict[int, dict] = {}
    for r in recs:
        if isinstance(r, EpochRecord) and r.run == run:
            out.setdefault(r.epoch, {}).update(r.metrics)
    return out


@pytest.fixture(scope="module")
def offline(wandb_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_runs")
    sink = WandbSink(dir=root / "ab", mode="offline")
    cli = WandbSink(project="cli-proj", group="cli-group", dir=root / "cd", mode="offline")
    sweep_env = {"WANDB_SWEEP_ID": "swp123", "WANDB_RUN_ID": "agentrun1",
                 "WANDB_PROJECT": "sweep-proj"}
    cd = _run("job-c", 2, env={"WANDB_PROJECT": "env-proj", "WANDB_RUN_GROUP": "env-group"})
    cd += _run("job-d", 2, env=sweep_env, seed=2)
    records = _records_ab()
    worst_write_s = 0.0
    for rec in records:
        t0 = time.perf_counter()
        sink.write(rec)
        worst_write_s = max(worst_write_s, time.perf_counter() - t0)
    for rec in cd:
        cli.write(rec)
    t0 = time.monotonic()
    sink.close(timeout_s=60.0)
    cli.close(timeout_s=60.0)
    close_s = time.monotonic() - t0
    runs = {}
    for sub in ("ab", "cd"):
        for run_dir in find_offline_runs(root / sub):
            run = read_offline_run(run_dir)
            runs[run["name"]] = run
    return {"runs": runs, "stats": sink.stats, "cli_stats": cli.stats, "root": root,
            "records": records, "worst_write_s": worst_write_s, "close_s": close_s}


def _epoch_rows(run: dict) -> dict[int, dict]:
    """wandb's history by epoch: an amendment's row over the original's."""
    out: dict[int, dict] = {}
    for row in run["history"]:
        if "epoch" in row:
            out.setdefault(row["epoch"], {}).update(row)
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and math.isnan(a) and isinstance(b, float)
                      and math.isnan(b))


def test_one_wandb_run_per_training_run(offline):
    assert len(find_offline_runs(offline["root"] / "ab")) == 2
    assert sorted(offline["runs"]) == sorted([RUN_A, RUN_B, "job-c", "job-d"])
    a = offline["runs"][RUN_A]
    assert a["run_id"] == wandb_run_id(RUN_A) != RUN_A
    assert offline["runs"][RUN_B]["run_id"] == RUN_B
    assert all(run["exit_code"] == 0 for run in offline["runs"].values())


def test_stats_count_every_record(offline):
    # every record written except b's epoch after its summary; writes never waited on wandb
    n = len(offline["records"])
    assert offline["stats"] == {"written": n - 1, "dropped": 1, "failed": 0, "alerts": 0}
    assert offline["cli_stats"]["failed"] == 0
    assert offline["worst_write_s"] < 1.0  # a queue put; waiting on wandb takes seconds


def test_project_entity_group_from_the_run_env(offline):
    a, b = offline["runs"][RUN_A], offline["runs"][RUN_B]
    assert (a["project"], a["entity"], a["group"]) == ("gait", "team-x", "ddp")
    assert (b["project"], b["group"]) == ("trainwatch", None)


def test_cli_flags_win_over_env_but_a_sweep_keeps_its_own(offline):
    c, d = offline["runs"]["job-c"], offline["runs"]["job-d"]
    assert (c["project"], c["group"]) == ("cli-proj", "cli-group")
    assert (d["project"], d["run_id"], d["sweep_id"]) == ("sweep-proj", "agentrun1", "swp123")


def test_config_holds_hyperparameters_and_world_size(offline):
    a = offline["runs"][RUN_A]
    cfg = next(r.config for r in offline["records"]
               if isinstance(r, ConfigRecord) and r.run == RUN_A)
    assert a["config"] == {**cfg, "world_size": 1}


def test_every_metric_and_flag_equals_the_records_every_epoch(offline):
    for name, n in ((RUN_A, EPOCHS_A), (RUN_B, EPOCHS_B)):
        ours = _epochs(offline["records"][:-1], name)
        rows = _epoch_rows(offline["runs"][name])
        assert sorted(rows) == sorted(ours) == list(range(1, n + 1))
        for epoch, metrics in ours.items():
            for key, value in metrics.items():
                assert _same(rows[epoch].get(key), value), (name, epoch, key)
    # the rule stayed raised for epochs on end, cleared, and was raised again: wandb says it
    rows = _epoch_rows(offline["runs"][RUN_A])
    raised = [e for e in sorted(rows) if rows[e]["health/exploding_gradients"] == 1]
    assert raised == list(EXPLODE_A)


def test_rows_go_at_step_epoch_amendments_after_at_their_epoch(offline):
    a = offline["runs"][RUN_A]
    steps = [row["_step"] for row in a["history"]]
    assert steps == sorted(set(steps))  # a row per step: the step curve's rows take theirs
    rows = [row for row in a["history"] if "epoch" in row]
    originals = [row for row in rows if "ranks/reporting" in row]
    assert [row["epoch"] for row in originals] == list(range(1, EPOCHS_A + 1))
    for row in originals:  # at step = epoch, or the next step once the curve's rows took it
        prev = max((s for s in steps if s < row["_step"]), default=-1)
        assert row["_step"] == max(row["epoch"], prev + 1)
    assert any(row["_step"] > row["epoch"] for row in originals)  # the curve came first
    assert all(row["ranks/reporting"] == 1 and row["ranks/missing"] == 0 for row in originals)


def test_thresholds_where_the_records_have_them_and_data_stats_once(offline):
    ours = _epochs(offline["records"], RUN_A)
    rows = _epoch_rows(offline["runs"][RUN_A])
    with_thresholds = {e for e, m in ours.items() if "threshold/knee_r_std" in m}
    assert with_thresholds == set(range(2, EPOCHS_A + 1, 2))  # the validation epochs
    assert {e for e, row in rows.items() if "threshold/knee_r_std" in row} == with_thresholds
    data = next(r.metrics for r in offline["records"]
                if isinstance(r, DataStatsRecord) and r.run == RUN_A)
    first = min(rows)
    assert all(_same(rows[first][k], v) for k, v in data.items())
    assert not any(k in row for k in data for e, row in rows.items() if e != first)


def test_epoch_is_the_step_metric_and_summaries_aggregate(offline):
    a = offline["runs"][RUN_A]
    assert a["metrics"]["*"]["step_metric"] == "epoch"
    assert a["metrics"]["train/total_loss"] == {"step_metric": "epoch", "summary": ["min"]}
    ours = _epochs(offline["records"], RUN_A)
    s = a["summary"]
    assert s["train/total_loss"] == {"min": min(m["train/total_loss"] for m in ours.values())}
    summary = next(r for r in offline["records"]
                   if isinstance(r, SummaryRecord) and r.run == RUN_A)
    assert all(_same(s[k], v) for k, v in summary.metrics.items())
    assert s["trainwatch/ended"] == summary.ended == "finished"


def test_events_table_holds_every_event_the_records_hold(offline):
    a = offline["runs"][RUN_A]
    tables = a["tables"]
    assert tables and all(t["key"] == "health/events" and t["columns"] == EVENT_COLUMNS
                          for t in tables)
    events = [[r.epoch, e.rule, e.kind, e.severity, e.message, e.remedy]
              for r in offline["records"] if r.run == RUN_A
              and isinstance(r, EpochRecord | EventRecord) for e in r.events]
    assert tables[-1]["data"] == events  # the last table has them all, in order
    assert ["exploding_gradients", "raised"] in [row[1:3] for row in events]
    assert ["exploding_gradients", "cleared"] in [row[1:3] for row in events]


def test_no_alerts_offline_by_default(offline):
    assert all(run["alerts"] == [] for run in offline["runs"].values())


def _event(rule: str, severity: str) -> Event:
    return Event(rule, RAISED, severity, f"{rule} detected", f"fix {rule}")


def _feed(sink: WandbSink, run: str, n: int) -> float:
    """A run's first ``n`` records: its run record and ``n - 1`` epochs (no summary)."""
    # wandb-core refuses a run id that one of this process's runs still holds: one per test
    worst = 0.0
    for rec in [r for r in _run(run, n) if isinstance(r, RunRecord | EpochRecord)][:n]:
        t0 = time.perf_counter()
        sink.write(rec)
        worst = max(worst, time.perf_counter() - t0)
    return worst


def test_init_that_raises_counts_failures(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="offline", settings={"x_stats_sampling_interval": 0.01})
    worst = _feed(sink, "bad-settings", 5)
    sink.close(timeout_s=30.0)
    assert worst < 1.0
    assert sink.stats == {"written": 0, "dropped": 0, "failed": 5, "alerts": 0}


def test_dir_that_is_a_file_counts_failures(wandb_env, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("")
    sink = WandbSink(dir=target, mode="offline")
    _feed(sink, "bad-dir", 3)
    sink.close(timeout_s=30.0)
    sink.close(timeout_s=30.0)  # idempotent
    assert sink.stats["failed"] == 3 and sink.stats["written"] == 0
    sink.write(RunRecord("after-close", 1))
    assert sink.stats["dropped"] == 1


def test_stalled_wandb_server_never_blocks_write_or_close(wandb_env, tmp_path):
    # A server that accepts connections and never answers: wandb.init hangs in the worker.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    port = server.getsockname()[1]
    try:
        sink = WandbSink(dir=tmp_path, mode="online", queue_size=4, settings={
            "base_url": f"http://127.0.0.1:{port}", "api_key": "k" * 40, "init_timeout": 2.0})
        worst = _feed(sink, "stalled", 50)
        t0 = time.monotonic()
        sink.close(timeout_s=0.5)
        close_s = time.monotonic() - t0
        assert worst < 1.0  # init alone times out after 2 s
        assert close_s < 5.0  # bounded, not the 30 s of a hung wandb
        # one record is in the stalled init, at most four queued, the rest dropped
        assert sink.stats["dropped"] >= 45 and sink.stats["written"] == 0
        sink._thread.join(30.0)  # wandb gives up after init_timeout: counted as a failure
        assert not sink._thread.is_alive()
        assert sink.stats["failed"] == 1 and sink.stats["dropped"] == 49
    finally:
        server.close()


def test_block_when_full_loses_nothing(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="offline", queue_size=1, block_when_full=True)
    _feed(sink, "blocking", 8)
    sink.close(timeout_s=30.0)
    assert sink.stats == {"written": 8, "dropped": 0, "failed": 0, "alerts": 0}
    (run_dir,) = find_offline_runs(tmp_path)
    assert len(read_offline_run(run_dir)["history"]) == 7


def test_a_relaunched_run_gets_a_new_wandb_run(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="offline")
    sessions = [_run("relaunched", 2, samples=None), _run("relaunched", 1, samples=None)]
    for recs in sessions:
        for rec in recs:
            sink.write(rec)
    late = EpochRecord("relaunched", 3, {"train/total_loss": 1.0})
    sink.write(late)  # after the summary, no run record: dropped
    sink.close(timeout_s=30.0)
    n = sum(map(len, sessions))
    assert sink.stats == {"written": n, "dropped": 1, "failed": 0, "alerts": 0}
    runs = [read_offline_run(d) for d in find_offline_runs(tmp_path)]
    assert [[row["epoch"] for row in r["history"] if "epoch" in row]
            for r in runs] == [[1, 2], [1]]
    assert {r["run_id"] for r in runs} == {"relaunched"}


def test_open_runs_are_finished_as_failed_at_close(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="offline")
    _feed(sink, "unfinished", 3)
    sink.write(EventRecord("unfinished", 2, 40, 1, (_event("rank_desync", "warning"),)))
    sink.close(timeout_s=30.0)
    (run_dir,) = find_offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    assert run["exit_code"] == 1 and len(run["history"]) == 2
    assert run["tables"][-1]["data"][-1][1] == "rank_desync"


def test_alerts_on_each_raise_never_a_clear_within_the_per_minute_cap(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="offline", alerts=True, alerts_per_min=3)
    a, b, c = (_event("a", "warning"), _event("b", "critical"), _event("c", "info"))
    cleared = (Event("a", CLEARED, "info", "a cleared"), Event("b", CLEARED, "info", "b cleared"))
    sink.write(RunRecord("alerting", 1))
    for epoch, events in enumerate([(a,), (b,), cleared, (a,)], start=1):
        raised = tuple(e.rule for e in events if e.kind == RAISED)
        sink.write(EpochRecord("alerting", epoch, {"train/total_loss": 1.0}, events, raised))
    sink.write(EventRecord("alerting", 4, 9, 0, (c,)))  # over the cap: not sent
    sink.write(SummaryRecord("alerting", 4, {}))
    sink.close(timeout_s=30.0)
    assert sink.stats["alerts"] == 3 and sink.stats["failed"] == 0
    (run_dir,) = find_offline_runs(tmp_path)
    alerts = read_offline_run(run_dir)["alerts"]
    assert [(x["title"], x["level"]) for x in alerts] == [
        ("a: alerting", "WARN"), ("b: alerting", "ERROR"), ("a: alerting", "WARN")]
    assert alerts[1]["text"].startswith("b detected\nRemedy: fix b")


def test_disabled_mode_accepts_records_and_writes_no_files(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="disabled")
    _feed(sink, "disabled", 3)
    sink.close(timeout_s=30.0)
    assert sink.stats == {"written": 3, "dropped": 0, "failed": 0, "alerts": 0}
    assert find_offline_runs(tmp_path) == []


def test_alert_gate_caps_alerts_per_minute():
    gate = AlertGate(per_min=2)
    assert [gate.allow(t) for t in (0.0, 1.0, 2.0, 59.9, 60.5)] == [True, True, False, False,
                                                                     True]


def test_mode_offline_unless_a_key_is_configured(wandb_env, monkeypatch, tmp_path):
    assert resolve_mode(None) == "offline"
    assert resolve_mode("disabled") == "disabled"
    with pytest.raises(ValueError):
        resolve_mode("dryrun")
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert resolve_mode(None) == "offline"  # the netrc entry is for another host
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode(None) == "online"


def test_wandb_run_id_is_safe_deterministic_and_distinct():
    assert wandb_run_id("job-18_a") == "job-18_a"
    weird = wandb_run_id("a/b:c")
    assert weird == wandb_run_id("a/b:c") and weird.startswith("a-b-c-")
    assert wandb_run_id("a/b:c") != wandb_run_id("a:b/c")
    assert len(wandb_run_id("x" * 300)) <= 64
    assert all(ch.isalnum() or ch in "-_" for ch in wandb_run_id("ü ?#/;,'"))


def test_readback_joins_records_split_across_blocks(wandb_env, tmp_path):
    import wandb

    wide = {f"k/{i:05d}": i + 0.5 for i in range(6000)}  # one ~150 KiB record: 5 blocks
    settings = wandb.Settings(mode="offline", silent=True, console="off",
                              reinit="create_new", x_disable_stats=True)
    run = wandb.init(project="p", id="wide", dir=str(tmp_path), settings=settings)
    run.log(wide)
    run.log({"after": 1})
    run.finish()
    (run_dir,) = find_offline_runs(tmp_path)
    assert next(run_dir.glob("*.wandb")).stat().st_size > 4 * 32768
    history = read_offline_run(run_dir)["history"]
    assert {k: history[0][k] for k in wide} == wide and history[1]["after"] == 1


def test_readback_agrees_with_wandb_leet_inspect(offline):
    """wandb's own reader (``wandb leet inspect --json``, in wandb-core) sees the same rows."""
    (run_dir,) = [d for d in find_offline_runs(offline["root"] / "ab") if "job-17" in d.name]
    out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                          str(run_dir)], capture_output=True, text=True, timeout=60, check=True)
    theirs = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert len(theirs) == len(list(iter_records(next(run_dir.glob("*.wandb")))))
    their_rows = [r["history"]["item"] for r in theirs if r["type"] == "history"]
    ours = read_offline_run(run_dir)["history"]
    assert len(their_rows) == len(ours)
    for their, our in zip(their_rows, ours, strict=True):
        for key, value in our.items():
            if isinstance(value, dict):
                continue  # leet flattens nested keys ("health/events.path")
            if isinstance(value, float) and math.isnan(value):
                assert their[key] == "NaN"
            else:
                assert their[key] == value, key


def test_importing_the_sink_does_not_import_wandb():
    code = ("import sys; sys.path.insert(0, 'tests'); "
            "import collector.sinks.wandb_sink, support.wandb_readback; "
            "sys.exit('wandb' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    assert subprocess.run([sys.executable, "-c", code], cwd=root).returncode == 0
