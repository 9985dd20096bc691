"""The wandb sink: one wandb run per training run, fed from a bounded queue on its own thread.

The collector owns every wandb call, so the training loop never meets one. ``write`` only
puts the record on a bounded queue (full -> dropped and counted); a daemon thread makes
the wandb calls, so a slow, stalled or failing wandb never slows ingest::

    sink = WandbSink(project="gait-diffusion", dir="out")   # offline unless a key is set
    sink.write(epoch_record)                                 # a collector.records record
    sink.close(timeout_s=10.0)                               # finishes open runs, returns
    print(sink.stats)                                        # {"written": .., "dropped": ..}

Each epoch record is one ``log`` call with ``epoch`` defined as every metric's step
metric, at ``step = epoch`` while no other row took that step; its pictures of samples
(``SamplesPictureRecord``, sent just before it: ``pictures/<kind>``, a ``wandb.Plotly``
figure) go in that row. wandb has one step counter, so each point of the per-step curve
(a ``StepCurveRecord``: ``steps/*`` against its own axis, ``trainer_step``) takes a row
of its own, and an epoch row after them goes at the next free step: every chart reads its
own axis (``epoch`` or ``trainer_step``), never wandb's counter. An amendment of an epoch
already logged goes one step after, at its ``epoch``: charts on the epoch axis show it
where it belongs. The flags are the record's own (the collector's state at that epoch);
the sink infers nothing. A stop decision (``StopRecord``) writes the summary's
``trainwatch/stopped_by`` (the finding) and ``trainwatch/stop_step``.
``wandb`` is imported on the sink's thread at its first run, never at collector import.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collector.records import (
    RAISED,
    ConfigRecord,
    DataStatsRecord,
    EpochRecord,
    Event,
    EventRecord,
    Record,
    RunRecord,
    SamplesPictureRecord,
    StepCurveRecord,
    StopRecord,
    SummaryRecord,
)
from collector.sinks.wandb_setup import (
    BASE_SETTINGS,
    AlertGate,
    resolve_mode,
    supersede_offline,
    wandb_run_id,
)
from collector.sinks.wandb_views import (
    define_step_axes,
    picture_entry,
    step_rows,
)
from collector.text import printable

__all__ = ["EVENT_COLUMNS", "WandbSink"]

_log = logging.getLogger("trainwatch.wandb")

EVENT_COLUMNS = ["epoch", "rule", "kind", "severity", "message", "remedy"]
# Summary aggregations the seed compares across a sweep (guide: "What to compare").
SUMMARY_AGGREGATIONS = {
    "train/total_loss": "min",
    "train/grad_norm_max": "max",
    "validation/knee_healthy": "last",
    "validation/grf_healthy": "last",
}
_STOP = object()


@dataclass
class _Run:
    run: Any  # a wandb Run, or None when wandb.init failed
    axes_defined: bool = False
    step_axes_defined: bool = False
    pictures: dict[int, dict[str, Any]] = field(default_factory=dict)  # epoch -> its row's
    last_step: int = -1
    data_stats: dict[str, Any] = field(default_factory=dict)  # waits for the first row
    event_rows: list[list[Any]] = field(default_factory=list)
    events_unlogged: bool = False


class WandbSink:
    """Writes trainwatch records to wandb on a daemon thread; see the module docstring.

    The validation thresholds reach wandb as the records' own ``threshold/*`` metrics
    (constant series the panels draw as lines). ``project``/``entity``/``group`` come from
    the CLI; unset, the run's forwarded
    ``WANDB_PROJECT``/``WANDB_ENTITY``/``WANDB_RUN_GROUP``, then the collector's own, then
    project "trainwatch". ``settings`` overrides the sink's wandb.Settings.
    ``block_when_full`` makes ``write`` wait for room instead of dropping: for uploading a
    recording, where no training loop waits and nothing should be lost. ``resume`` (a
    collector restarted on its recording, which rebuilds every record): each run continues
    its wandb run by id; offline, the earlier session's run directory (possibly cut off by a
    crash) is set aside as ``superseded-*`` and the run is written whole again, so there is
    one readable directory per training run. ``alerts``
    (default: online only) sends ``run.alert`` when a rule is raised (never when it
    clears); an offline run would keep them in its file and send them, stale, at
    ``wandb sync``.
    """

    def __init__(self, project: str | None = None, entity: str | None = None,
                 group: str | None = None, mode: str | None = None,
                 dir: str | Path | None = None, queue_size: int = 1000,
                 settings: Mapping[str, Any] | None = None, alerts_per_min: int = 6,
                 finish_timeout_s: float = 60.0, log_every_s: float = 10.0,
                 block_when_full: bool = False, alerts: bool | None = None,
                 resume: bool = False) -> None:
        self.mode = resolve_mode(mode)
        self._resume = resume
        self._owners: dict[str, str] = {}  # wandb run id -> the trainwatch run writing to it
        self.dir = None if dir is None else Path(dir)
        self.stats = {"written": 0, "dropped": 0, "failed": 0, "alerts": 0}
        self._project, self._entity, self._group = project, entity, group
        self._settings = {"mode": self.mode, "finish_timeout": finish_timeout_s,
                          **(settings or {})}
        self._gate = AlertGate(alerts_per_min)
        self._log_every_s = log_every_s
        self._block = block_when_full
        self._alerts = self.mode == "online" if alerts is None else alerts
        self._last_log: dict[str, float] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._runs: dict[str, _Run] = {}
        self._ended: set[str] = set()
        self._closed = False
        self._closing = threading.Event()
        self._drain_until = float("inf")
        self._thread = threading.Thread(target=self._work, name="trainwatch-wandb", daemon=True)
        self._thread.start()

    # --- caller side: constant time; never blocks unless block_when_full ----------------
    def write(self, record: Record) -> None:
        if self._closed:
            self._count("dropped")
            return
        try:
            if self._block:
                while self._thread.is_alive() and not self._closed:
                    try:
                        self._queue.put(record, timeout=1.0)
                        return
                    except queue.Full:
                        continue
                raise queue.Full
            self._queue.put_nowait(record)
        except queue.Full:
            self._count("dropped")
            self._warn("full", "wandb queue full: %d records dropped so far",
                       self.stats["dropped"])

    def flush(self) -> None:
        """Nothing to do: the sink's thread hands records to wandb as they come."""

    def close(self, timeout_s: float = 10.0) -> None:
        """Process what is queued, finish open runs, return within ``timeout_s``. Idempotent."""
        start = time.monotonic()
        if not self._closed:
            self._closed = True
            # Half the time drains the queue; the rest is kept for finishing the runs.
            self._drain_until = start + 0.5 * timeout_s
            self._closing.set()
            try:
                self._queue.put_nowait(_STOP)
            except queue.Full:
                pass  # the worker is busy and sees _closing between records
        self._thread.join(max(0.0, timeout_s - (time.monotonic() - start)))
        if self._thread.is_alive():
            self._warn("close", "wandb did not finish within %.1f s; %d runs left open",
                       timeout_s, len(self._runs))

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def _warn(self, key: str, msg: str, *args: Any, exc: bool = False) -> None:
        now = time.monotonic()
        if now - self._last_log.get(key, -1e18) >= self._log_every_s:
            self._last_log[key] = now
            (_log.exception if exc else _log.warning)(msg, *args)

    # --- the sink's thread: every wandb call happens here ------------------------------
    def _work(self) -> None:
        while True:
            if self._closing.is_set():
                if time.monotonic() >= self._drain_until:
                    break
                try:
                    record = self._queue.get_nowait()
                except queue.Empty:
                    break
            else:
                record = self._queue.get()
            if record is not _STOP:
                self._handle(record)
        left = 0
        while True:
            try:
                left += self._queue.get_nowait() is not _STOP
            except queue.Empty:
                break
        self._count("dropped", left)
        for run_id in list(self._runs):
            self._end(run_id, exit_code=1)  # the training run had not ended

    def _handle(self, record: Record) -> None:
        run_id, kind = record.run, type(record).__name__
        reopen = run_id in self._ended
        if reopen and not isinstance(record, RunRecord):
            self._count("dropped")
            self._warn("late", "wandb: %s of run %r after its summary, dropped", kind, run_id)
            return
        self._ended.discard(run_id)  # a run record after the summary: the job was relaunched
        try:
            state = self._runs.get(run_id)
            if state is None:
                state = self._runs[run_id] = _Run(run=None)
                env = record.env if isinstance(record, RunRecord) else {}
                state.run = self._init(run_id, env, reopen)
            if state.run is None:
                self._count("failed")  # its init failed before; not retried
            else:
                self._HANDLERS[type(record)](self, run_id, state, record)
                self._count("written")
        except Exception:
            self._count("failed")
            self._warn("failed", "wandb failed on a %s of run %r (%d failures so far)",
                       kind, run_id, self.stats["failed"], exc=True)
        if isinstance(record, SummaryRecord):
            self._ended.add(run_id)
            self._runs.pop(run_id, None)

    def _init(self, run_id: str, env: Mapping[str, str], reopen: bool) -> Any:
        import wandb

        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)  # wandb falls back to /tmp otherwise

        def pick(mine: str | None, name: str) -> str | None:
            return mine or env.get(name) or os.environ.get(name) or None

        sweep_id = env.get("WANDB_SWEEP_ID") or None
        # Inside a sweep, as in wandb.init, the agent's project and entity win over flags.
        first = (lambda mine, name: env.get(name) or pick(mine, name)) if sweep_id else pick
        known = getattr(wandb.Settings, "model_fields", BASE_SETTINGS)  # older wandb: fewer
        options = {k: v for k, v in BASE_SETTINGS.items() if k in known} | self._settings
        if sweep_id:
            options["sweep_id"] = sweep_id  # per run; WANDB_SWEEP_ID is read once per process
        tags = [t.strip() for t in env.get("WANDB_TAGS", "").split(",") if t.strip()]
        wid = self._wandb_id(run_id, env)
        resume = "allow" if reopen else None
        if self._resume and wid not in self._owners.values():
            if self.mode == "offline":
                supersede_offline(self.dir, wid)
            else:
                resume = "allow"
        self._owners[wid] = run_id
        run = wandb.init(
            project=first(self._project, "WANDB_PROJECT") or "trainwatch",
            entity=first(self._entity, "WANDB_ENTITY"),
            group=pick(self._group, "WANDB_RUN_GROUP"), job_type=env.get("WANDB_JOB_TYPE"),
            notes=env.get("WANDB_NOTES"), tags=tags or None,
            id=wid, name=run_id, resume=resume,
            dir=None if self.dir is None else str(self.dir), settings=wandb.Settings(**options))
        where = run.url if self.mode == "online" else run.dir  # offline .url only warns
        _log.info("wandb run %s (%s): %s", printable(run_id), self.mode, printable(where))
        return run

    def _wandb_id(self, run_id: str, env: Mapping[str, str]) -> str:
        """The launcher's WANDB_RUN_ID (a sweep agent's run), unless another trainwatch run
        already writes to that id: then this run's own id, and a warning."""
        wid = wandb_run_id(run_id)
        asked = env.get("WANDB_RUN_ID")
        if asked:
            owner = self._owners.get(asked)
            if owner is None or owner == run_id:
                return asked
            self._warn(f"id-{run_id}", "wandb: run %s asked for wandb id %s, which run %s "
                       "writes to; it gets its own id %s", printable(run_id), printable(asked),
                       printable(owner), wid)
        return wid

    # --- one handler per record type ----------------------------------------------------
    def _on_run(self, run_id: str, state: _Run, record: RunRecord) -> None:
        state.run.config.update({"world_size": record.world_size}, allow_val_change=True)

    def _on_config(self, run_id: str, state: _Run, record: ConfigRecord) -> None:
        state.run.config.update(record.config, allow_val_change=True)

    def _on_data_stats(self, run_id: str, state: _Run, record: DataStatsRecord) -> None:
        state.run.summary.update(record.metrics)
        state.data_stats.update(record.metrics)  # logged once, in the first epoch's row

    def _on_epoch(self, run_id: str, state: _Run, record: EpochRecord) -> None:
        run, epoch = state.run, record.epoch
        if not state.axes_defined:
            # Defined at the first epoch, so that nothing logged earlier gets an epoch.
            run.define_metric("epoch")
            run.define_metric("*", step_metric="epoch")
            for name, agg in SUMMARY_AGGREGATIONS.items():
                run.define_metric(name, step_metric="epoch", summary=agg)
            state.axes_defined = True
        self._log_pictures(state, but=epoch)
        row: dict[str, Any] = {**state.data_stats, **record.metrics,
                               **state.pictures.pop(epoch, {}), "epoch": epoch}
        state.data_stats = {}
        row["health/n_raised"] = len(record.raised)
        if not record.amends:
            row["ranks/reporting"] = record.ranks.count
            row["ranks/missing"] = record.missing.count
        self._add_events(state, epoch, record.events)
        if state.events_unlogged:
            row["health/events"] = self._events_table(state)
        # step = epoch keeps wandb's own axis on the epoch; a repeated epoch (an amendment)
        # goes one after, and the epoch axis puts it where it belongs.
        step = epoch if epoch > state.last_step else state.last_step + 1
        run.log(row, step=step, commit=True)  # now, not when the next step begins
        state.last_step = step
        self._alert(run_id, state, epoch, record.events)

    def _on_event(self, run_id: str, state: _Run, record: EventRecord) -> None:
        # Shown in the next epoch's row, or in the summary when the run ends first.
        self._add_events(state, record.epoch, record.events)
        self._alert(run_id, state, record.epoch, record.events)

    def _on_stop(self, run_id: str, state: _Run, record: StopRecord) -> None:
        # A sweep's agent reads the summary: this run was stopped, and by what.
        state.run.summary.update({"trainwatch/stopped_by": record.rule,
                                  "trainwatch/stop_step": record.step})

    def _on_summary(self, run_id: str, state: _Run, record: SummaryRecord) -> None:
        state.run.summary.update({**record.metrics, "trainwatch/ended": record.ended})
        self._finish(state, exit_code=0)

    def _on_steps(self, run_id: str, state: _Run, record: StepCurveRecord) -> None:
        """One row per point, ``trainer_step`` its x: wandb has one step counter, so each
        row takes the next one (the epoch rows after them keep their own ``epoch`` axis)."""
        if not state.step_axes_defined:
            define_step_axes(state.run)
            state.step_axes_defined = True
        for row in step_rows(record):
            state.last_step += 1
            state.run.log(row, step=state.last_step, commit=True)

    def _on_pictures(self, run_id: str, state: _Run, record: SamplesPictureRecord) -> None:
        """The picture (a plotly figure, built here) goes in the row of its epoch's record,
        which the pipeline sends right after it."""
        key, value = picture_entry(record)
        state.pictures.setdefault(record.epoch, {})[key] = value

    def _log_pictures(self, state: _Run, but: int | None = None) -> None:
        """Pictures whose epoch row did not come next, in rows of their own."""
        for epoch in [e for e in state.pictures if e != but]:
            state.last_step += 1
            state.run.log({**state.pictures.pop(epoch), "epoch": epoch},
                          step=state.last_step, commit=True)

    _HANDLERS = {RunRecord: _on_run, ConfigRecord: _on_config, DataStatsRecord: _on_data_stats,
                 EpochRecord: _on_epoch, EventRecord: _on_event, SummaryRecord: _on_summary,
                 StopRecord: _on_stop, StepCurveRecord: _on_steps,
                 SamplesPictureRecord: _on_pictures}

    # --- events, alerts, finishing -------------------------------------------------------
    def _add_events(self, state: _Run, epoch: int | None, events: tuple[Event, ...]) -> None:
        for e in events:
            state.event_rows.append([epoch, e.rule, e.kind, e.severity, e.message, e.remedy])
            state.events_unlogged = True

    def _events_table(self, state: _Run) -> Any:
        import wandb

        state.events_unlogged = False
        return wandb.Table(columns=EVENT_COLUMNS, data=[list(r) for r in state.event_rows])

    def _alert(self, run_id: str, state: _Run, epoch: int | None,
               events: tuple[Event, ...]) -> None:
        """``run.alert`` for each rule raised now (never a clear); a failed alert fails no
        record."""
        if not self._alerts:
            return
        for e in events:
            if e.kind != RAISED:
                continue
            if not self._gate.allow(time.monotonic()):
                self._warn("alerts", "wandb alerts over %d/min: %r of run %r not sent",
                           self._gate.per_min, e.rule, run_id)
                continue
            sev = e.severity.lower()
            level = "ERROR" if "crit" in sev or "err" in sev else (
                "WARN" if "warn" in sev else "INFO")
            try:
                state.run.alert(title=f"{e.rule}: {run_id}"[:63], level=level,
                                text=f"{e.message}\nRemedy: {e.remedy}\nRun {run_id}, "
                                     f"epoch {epoch}.")
                self._count("alerts")
            except Exception:
                self._warn("alert", "wandb alert for run %r failed", run_id, exc=True)

    def _finish(self, state: _Run, exit_code: int) -> None:
        self._log_pictures(state)
        state.data_stats = {}  # already in the summary
        if state.events_unlogged:  # events after the last epoch row
            state.run.summary["health/events"] = self._events_table(state)
        state.run.finish(exit_code=exit_code)

    def _end(self, run_id: str, exit_code: int) -> None:
        state = self._runs.pop(run_id)
        if state.run is None:
            return
        try:
            self._finish(state, exit_code)
        except Exception:
            self._count("failed")
            self._warn("finish", "wandb failed to finish run %r", run_id, exc=True)
