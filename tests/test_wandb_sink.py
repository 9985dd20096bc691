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

from collector.analysis.profile import load_profile
from collector.records import (
    RAISED,
    ConfigRecord,
    DataStatsRecord,
    EpochRecord,
    Event,
    EventRecord,
    Ranks,
    RunRecord,
    SummaryRecord,
)
from collector.sinks.wandb_sink import (
    EVENT_COLUMNS,
    WandbSink,
    _AlertGate,
    resolve_mode,
    wandb_run_id,
)

THRESHOLD_SERIES = load_profile(None).thresholds

RUN_A, RUN_B = "gait/job-17:lr=1e-4", "job-18"
EPOCHS_A, EPOCHS_B = 4, 3
VALIDATION_EPOCHS = {1, 3}
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


def _epoch_metrics(run: str, epoch: int) -> dict[str, float]:
    base = 1.0 if run == RUN_A else 2.0
    m = {
        "train/total_loss": base / (epoch + 1), "train/grad_norm_mean": 2.0 - 0.1 * epoch,
        "train/grad_norm_std": 0.3, "train/grad_norm_max": 4.0 + epoch,
        "train/grad_norm_min": 0.5, "train/batch_loss_mean": base / (epoch + 1),
        "train/batch_loss_std": 0.05, "train/batch_loss_cv": 0.1,
        "model/weight_mean": 0.05, "model/ema_diff": 0.01 / (epoch + 1),
        "train/is_improving": 1.0, "loss_ratio/simple": 0.6, "loss_ratio/vel": 0.4,
    }
    if run == RUN_A and epoch == 2:
        m["train/loss_decrease_pct"] = float("nan")  # a diverging step reaches wandb as NaN
    if run == RUN_A and epoch in VALIDATION_EPOCHS:
        m.update({"validation/gen_std": 0.6, "validation/knee_r_std": 0.05 * epoch,
                  "validation/knee_healthy": float(epoch == 3), "validation/grf_vz_r_std": 20.0,
                  "validation/grf_healthy": 1.0})
    return m


def _event(rule: str, severity: str) -> Event:
    return Event(rule, RAISED, severity, f"{rule} detected", f"fix {rule}")


EVENTS_A = {2: [_event("mode_collapse", "warning")],
            3: [_event("mode_collapse", "warning"), _event("exploding_gradients", "critical")]}
LATE_EVENT = _event("rank_desync", "warning")


def _rec(kind: str, run: str, epoch: int | None = None, metrics: dict | None = None,
         events: list | None = None, **extra: Any) -> Any:
    metrics, events = metrics or {}, tuple(events or ())
    if kind == "run":
        return RunRecord(run, metrics.get("world_size", 1), extra.get("env", {}))
    if kind == "config":
        return ConfigRecord(run, metrics)
    if kind == "data_stats":
        return DataStatsRecord(run, metrics)
    if kind == "event":
        return EventRecord(run, epoch or 0, 0, 0, events)
    if kind == "summary":
        return SummaryRecord(run, epoch, metrics)
    raised = tuple(sorted({e.rule for e in events if e.kind == RAISED}))
    flags = {f"health/{r}": 1 for r in raised}
    return EpochRecord(run, epoch, {**metrics, **flags}, events, raised,
                       Ranks.of(extra.get("ranks", [])), Ranks.of(extra.get("missing_ranks", [])))


def _epoch_rec(run: str, epoch: int) -> Any:
    return _rec("epoch", run, epoch, _epoch_metrics(run, epoch),
                EVENTS_A.get(epoch, []) if run == RUN_A else [],
                ranks=[0, 1], missing_ranks=[1] if epoch == 3 else [])


def _records_ab() -> list[dict[str, Any]]:
    a, b = RUN_A, RUN_B
    env_a = {"WANDB_PROJECT": "gait", "WANDB_ENTITY": "team-x", "WANDB_RUN_GROUP": "ddp"}
    return [
        _rec("run", a, metrics={"world_size": 2}, env=env_a),
        _rec("run", b, metrics={"world_size": 1}, env={}),
        _rec("config", a, metrics={"learning_rate": 1e-4, "batch_size": 64, "num_params": 12345}),
        _rec("config", b, metrics={"learning_rate": 4e-4, "batch_size": 32}),
        _rec("data_stats", a, metrics={"data_stats/normalized_mean": 0.01,
                                       "data_stats/knee_r_std": 0.4}),
        _epoch_rec(a, 0), _epoch_rec(b, 0), _epoch_rec(a, 1), _epoch_rec(b, 1),
        _epoch_rec(b, 2), _epoch_rec(a, 2),
        _rec("summary", b, metrics={"final/epochs": 3}),
        _epoch_rec(a, 3),
        _rec("event", a, None, events=[LATE_EVENT]),
        _epoch_rec(b, 3),  # after b's summary: dropped
        _rec("summary", a, metrics={"final/epochs": 4, "final/mode_collapse": 1}),
    ]


@pytest.fixture(scope="module")
def offline(wandb_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("wandb_runs")
    sink = WandbSink(dir=root / "ab", mode="offline", thresholds=THRESHOLD_SERIES)
    cli = WandbSink(project="cli-proj", group="cli-group", dir=root / "cd", mode="offline")
    sweep_env = {"WANDB_SWEEP_ID": "swp123", "WANDB_RUN_ID": "agentrun1",
                 "WANDB_PROJECT": "sweep-proj"}
    cd = [_rec("run", "job-c", metrics={"world_size": 1},
               env={"WANDB_PROJECT": "env-proj", "WANDB_RUN_GROUP": "env-group"}),
          _rec("run", "job-d", metrics={"world_size": 1}, env=sweep_env),
          _epoch_rec("job-c", 0), _epoch_rec("job-d", 0),
          _rec("summary", "job-c"), _rec("summary", "job-d")]
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
            "n_records": len(records), "worst_write_s": worst_write_s, "close_s": close_s}


def _epoch_rows(run: dict) -> list[dict]:
    return [row for row in run["history"] if "epoch" in row]


def test_one_wandb_run_per_training_run(offline):
    assert len(find_offline_runs(offline["root"] / "ab")) == 2
    assert sorted(offline["runs"]) == sorted([RUN_A, RUN_B, "job-c", "job-d"])
    a = offline["runs"][RUN_A]
    assert a["run_id"] == wandb_run_id(RUN_A) != RUN_A
    assert offline["runs"][RUN_B]["run_id"] == RUN_B
    assert all(run["exit_code"] == 0 for run in offline["runs"].values())


def test_stats_count_every_record(offline):
    # every record written except b's epoch after its summary; writes never waited on wandb
    assert offline["stats"] == {"written": offline["n_records"] - 1, "dropped": 1,
                                "failed": 0, "alerts": 0}
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
    a, b = offline["runs"][RUN_A], offline["runs"][RUN_B]
    assert a["config"] == {"learning_rate": 1e-4, "batch_size": 64, "num_params": 12345,
                           "world_size": 2}
    assert b["config"]["learning_rate"] == 4e-4 and b["config"]["world_size"] == 1


def test_one_history_row_per_epoch_at_step_epoch(offline):
    for name, n in ((RUN_A, EPOCHS_A), (RUN_B, EPOCHS_B)):
        run = offline["runs"][name]
        assert len(run["history"]) == n  # nothing but the epoch rows
        rows = _epoch_rows(run)
        assert [row["epoch"] for row in rows] == list(range(n))
        assert [row["_step"] for row in rows] == list(range(n))
        for row in rows:
            for key, value in _epoch_metrics(name, row["epoch"]).items():
                assert math.isnan(row[key]) if math.isnan(value) else row[key] == value, key
            assert row["ranks/reporting"] == 2
            assert row["ranks/missing"] == (1 if row["epoch"] == 3 else 0)


def test_thresholds_only_with_validation_and_data_stats_once(offline):
    rows = _epoch_rows(offline["runs"][RUN_A])
    for row in rows:
        has_thresholds = all(row.get(k) == v for k, v in THRESHOLD_SERIES.items())
        assert has_thresholds == (row["epoch"] in VALIDATION_EPOCHS)
    assert rows[0]["data_stats/knee_r_std"] == 0.4
    assert not any("data_stats/knee_r_std" in row for row in rows[1:])


def test_health_flags_are_the_records_own(offline):
    rows = _epoch_rows(offline["runs"][RUN_A])
    assert [row["health/n_raised"] for row in rows] == [0, 0, 1, 2]
    assert "health/mode_collapse" not in rows[1]
    assert (rows[2]["health/mode_collapse"], rows[3]["health/mode_collapse"]) == (1, 1)
    assert rows[3]["health/exploding_gradients"] == 1


def test_epoch_is_the_step_metric_and_summaries_aggregate(offline):
    a = offline["runs"][RUN_A]
    assert a["metrics"]["*"]["step_metric"] == "epoch"
    assert a["metrics"]["train/total_loss"] == {"step_metric": "epoch", "summary": ["min"]}
    s = a["summary"]
    assert s["train/total_loss"] == {"min": 0.25}
    assert s["validation/knee_healthy"] == {"last": 1.0}
    assert s["validation/grf_healthy"] == {"last": 1.0}
    assert s["data_stats/normalized_mean"] == 0.01
    assert s["final/epochs"] == 4 and s["final/mode_collapse"] == 1
    assert offline["runs"][RUN_B]["summary"]["final/epochs"] == 3


def test_events_table_accumulates(offline):
    a = offline["runs"][RUN_A]
    tables = a["tables"]
    assert all(t["key"] == "health/events" and t["columns"] == EVENT_COLUMNS for t in tables)
    assert [(t["epoch"], len(t["data"])) for t in tables[:2]] == [(2, 1), (3, 3)]
    assert tables[1]["data"][1] == [3, "mode_collapse", "raised", "warning",
                                    "mode_collapse detected", "fix mode_collapse"]
    # the event after the last epoch reaches the summary's table
    final = tables[-1]
    assert final["step"] is None and len(final["data"]) == 4
    assert final["data"][-1][:2] == [0, "rank_desync"]
    assert offline["runs"][RUN_B]["tables"] == []


def test_no_alerts_offline_by_default(offline):
    assert all(run["alerts"] == [] for run in offline["runs"].values())


def _feed(sink: WandbSink, run: str, n: int) -> float:
    # wandb-core refuses a run id that one of this process's runs still holds: one per test
    recs = [_rec("run", run, metrics={"world_size": 1}, env={})]
    recs += [_epoch_rec(run, e) for e in range(n - 1)]
    worst = 0.0
    for rec in recs:
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
    sink.write(_rec("run", "after-close"))
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
    for epochs in ([0, 1], [2]):
        sink.write(_rec("run", "relaunched", metrics={"world_size": 1}, env={}))
        for e in epochs:
            sink.write(_epoch_rec("relaunched", e))
        sink.write(_rec("summary", "relaunched"))
    sink.write(_epoch_rec("relaunched", 3))  # after the summary, no run record: dropped
    sink.close(timeout_s=30.0)
    assert sink.stats == {"written": 7, "dropped": 1, "failed": 0, "alerts": 0}
    runs = [read_offline_run(d) for d in find_offline_runs(tmp_path)]
    assert [[row["epoch"] for row in r["history"]] for r in runs] == [[0, 1], [2]]
    assert {r["run_id"] for r in runs} == {"relaunched"}


def test_open_runs_are_finished_as_failed_at_close(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="offline")
    _feed(sink, "unfinished", 3)
    sink.write(_rec("event", "unfinished", None, events=[LATE_EVENT]))
    sink.close(timeout_s=30.0)
    (run_dir,) = find_offline_runs(tmp_path)
    run = read_offline_run(run_dir)
    assert run["exit_code"] == 1 and len(run["history"]) == 2
    assert run["tables"][-1]["data"][-1][1] == "rank_desync"


def test_alerts_on_each_raise_never_a_clear_within_the_per_minute_cap(wandb_env, tmp_path):
    sink = WandbSink(dir=tmp_path, mode="offline", alerts=True, alerts_per_min=3)
    a, b, c = (_event("a", "warning"), _event("b", "critical"), _event("c", "info"))
    cleared = [Event(r, "cleared", "info", f"{r} cleared") for r in ("a", "b")]
    sink.write(_rec("run", "alerting", metrics={"world_size": 1}, env={}))
    for epoch, events in enumerate([[a], [b], cleared, [a]]):
        sink.write(_rec("epoch", "alerting", epoch, {"train/total_loss": 1.0}, events))
    sink.write(_rec("event", "alerting", None, events=[c]))  # over the cap: not sent
    sink.write(_rec("summary", "alerting"))
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
    gate = _AlertGate(per_min=2)
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
