"""Per-run, per-rank state: decoded messages in, assembled epochs and records out.

The per-step path only appends the message to its rank's open epoch; arrays are built
once per epoch, when every rank of the run has closed it (``EpochInput``), and handed to
the run's health stage. Epochs close strictly in order. A rank that never closes an
epoch is waited for until the live collector's clock says otherwise; that decision comes
back in as a control (``close_epoch``) so that a replay decides the same.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from collector.analysis.health import RunHealth
from collector.analysis.inputs import DataConstants, EpochInput, StepSeries, ValidationInput
from collector.analysis.profile import Profile
from collector.ingest.counters import RankCounters
from collector.ingest.stepscan import Groups, Steps, gather_pnorms, stream_key
from trainer_client import wire

Emit = Callable[[dict], None]

_NP_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32,
              "float64": np.float64}


class StepColumns:
    """One rank's open epoch, column by column.

    Rows from the bulk path arrive as numpy blocks; rows from the per-message path wait
    in lists and are sealed into a block before the next bulk append, so blocks stay in
    row order. Floats, ints and arrays are not tracked by Python's cycle collector, so a
    long epoch costs no garbage-collection time; a tuple or list per step would
    (quadratically).
    """

    __slots__ = ("step", "loss", "grad_norm", "lr", "comp_values", "blocks", "sealed",
                 "comp_segments", "pnorms", "pn_blocks")

    def __init__(self) -> None:
        self.step: list[int] = []
        self.loss: list[float] = []
        self.grad_norm: list[float] = []
        self.lr: list[float] = []
        self.comp_values: list[float] = []  # flat, row by row
        self.blocks: list[tuple[np.ndarray, ...]] = []  # (step, loss, grad_norm, lr, comps)
        self.sealed = 0  # rows in blocks
        self.comp_segments: list = []  # [first_row, names] each time the names change
        self.pnorms: dict[int, bytes] = {}  # row -> float32 bytes
        self.pn_blocks: list[tuple[np.ndarray, np.ndarray]] = []  # (rows, float32 matrix)

    def add(self, msg: wire.Message) -> None:
        loss, gn, names, values, lr = msg.body
        row = self.sealed + len(self.loss)
        self.step.append(msg.step)
        self.loss.append(loss)
        self.grad_norm.append(_NAN if gn is None else gn)
        self.lr.append(_NAN if lr is None else lr)
        segs = self.comp_segments
        if not segs or names != segs[-1][1]:
            segs.append([row, names])
        self.comp_values.extend(values)
        pn = msg.tensors.get("param_norms") if msg.tensors else None
        if pn is not None:
            self.pnorms[row] = bytes(pn.data)

    def _seal(self) -> None:
        if self.loss:
            self.blocks.append((np.asarray(self.step, np.int64), np.asarray(self.loss, np.float64),
                                np.asarray(self.grad_norm, np.float64),
                                np.asarray(self.lr, np.float64),
                                np.asarray(self.comp_values, np.float64)))
            self.sealed += len(self.loss)
            self.step, self.loss, self.grad_norm, self.lr, self.comp_values = [], [], [], [], []

    def extend(self, g: Groups, j: int, seg_names: list[list[str]], s: Steps,
               buf: np.ndarray) -> None:
        """Append stream ``j`` of a regrouped stretch of fast steps (``stepscan``) at once;
        the same result as ``add`` on each. ``seg_names``: the names at each of its
        ``changes``."""
        self._seal()
        row0 = self.sealed
        lo, hi = g.bounds[j], g.bounds[j + 1]
        self.blocks.append((g.step[lo:hi].copy(), g.loss[lo:hi].copy(),
                            g.grad_norm[lo:hi].copy(), g.lr[lo:hi].copy(),
                            g.comps[g.comp_bounds[j]:g.comp_bounds[j + 1]].copy()))
        self.sealed += hi - lo
        segs = self.comp_segments
        starts = g.changes[g.change_bounds[j]:g.change_bounds[j + 1]].tolist()
        for p, nm in zip(starts, seg_names, strict=True):
            if not segs or nm != segs[-1][1]:
                segs.append([row0 + p - lo, nm])
        if not g.pn_rows[j]:
            return
        rows = g.rows[lo:hi]
        width = s.pn_at[rows, 1]
        has = np.flatnonzero(width >= 0)  # not empty: pn_rows[j] > 0
        if (width[has] == width[has[0]]).all():
            self.pn_blocks.append((row0 + has, gather_pnorms(buf, s.pn_at, rows[has],
                                                             int(width[has[0]]))))
            return
        for k in has.tolist():  # mixed widths in one batch: rare, row by row
            o = int(s.pn_at[rows[k], 0])
            self.pnorms[row0 + k] = buf[o:o + 4 * int(width[k])].tobytes()

    def series(self) -> StepSeries:
        self._seal()
        n = self.sealed
        cols = [np.concatenate([b[k] for b in self.blocks]) if self.blocks
                else np.empty(0, np.int64 if k == 0 else np.float64) for k in range(5)]
        comps: dict[str, np.ndarray] = {}
        flat = cols[4]
        # one bound per segment; an epoch with no steps has no segment
        bounds = [seg[0] for seg in self.comp_segments[1:]] + [n] if self.comp_segments else []
        off = 0
        for (start, names), stop in zip(self.comp_segments, bounds, strict=True):
            k = len(names)
            block = flat[off:off + (stop - start) * k].reshape(stop - start, k)
            off += (stop - start) * k
            for j, name in enumerate(names):
                arr = comps.get(name)
                if arr is None:
                    arr = comps[name] = np.full(n, np.nan)
                arr[start:stop] = block[:, j]
        pn = None
        widths = {len(b) // 4 for b in self.pnorms.values()}
        widths.update(m.shape[1] for _, m in self.pn_blocks)
        if len(widths) == 1:
            pn = np.full((n, widths.pop()), np.nan, dtype=np.float32)
            for row, b in self.pnorms.items():
                pn[row] = np.frombuffer(b, np.float32)
            for rows, m in self.pn_blocks:
                pn[rows] = m
        return StepSeries(cols[0], cols[1], cols[2], comps, pn, lr=cols[3])


_NAN = float("nan")


class RankState:
    __slots__ = ("counters", "open_steps", "last_epoch", "finished", "host", "rank")

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.counters = RankCounters()
        self.open_steps = StepColumns()
        self.last_epoch = -1
        self.finished = False
        self.host = ""


class Stream(NamedTuple):
    """A client instance of a rank, as the bulk step path finds it by its key."""

    run: RunState
    rank: RankState
    instance: int
    run_bytes: bytes


class RunState:
    def __init__(self, run: str, world_size: int, profile: Profile) -> None:
        self.run = run
        self.world_size = world_size
        self.ranks: dict[int, RankState] = {}
        self.pending: dict[int, dict[int, tuple]] = {}  # epoch -> rank -> (steps, body)
        self.pending_since: dict[int, float] = {}  # epoch -> monotonic time first seen
        self.last_closed = -1
        self.validations: list[tuple[int, int, wire.Tensor, list[str] | None]] = []
        self.param_names: list[str] = []
        self.health = RunHealth(run, profile)
        self.config_seen = False
        self.data_rank: int | None = None
        self.data_acc: Any = None
        self.data_count = 0  # chunks announced by chunk 0
        self.data_seen: set[int] = set()  # never sized by the sender's claim
        self.data_channels: list[str] = []
        self.finished = False
        self.rejected: dict[str, int] = {}
        self.late_epochs = 0
        self.seen = (0, time.monotonic())  # (messages, when that count was first seen)


class State:
    """All runs seen. ``accept`` each message; records go to ``emit``."""

    def __init__(self, profile: Profile, emit: Emit) -> None:
        self.profile = profile
        self.emit = emit
        self.runs: dict[str, RunState] = {}
        self.streams: dict[int, Stream] = {}  # stream key -> stream, for ``accept_steps``
        self.before_apply: Callable[[list | None], None] | None = None

    # -- messages ------------------------------------------------------------------
    def accept(self, msg: wire.Message, frames: list | None = None) -> str | None:
        """Admit and apply one message, or return why it is rejected (then nothing changed).

        ``before_apply(frames)`` (the recording) runs between the two, so that what is
        recorded is exactly what was accepted, before any of its effects. A rank whose
        client instance changed (a restarted process) starts afresh.
        """
        run = self.runs.get(msg.run)
        rank = run.ranks.get(msg.rank) if run is not None else None
        fresh = rank is None
        if rank is not None:
            counters = rank.counters
            if msg.instance != counters.instance:
                fresh = True
                rank.last_epoch = -1
                rank.open_steps = StepColumns()
                rank.finished = False
            if not counters.admit(msg.instance, msg.seq):
                return "duplicate_seq"
            if msg.kind == wire.KIND_EPOCH and msg.epoch <= rank.last_epoch:
                return "epoch_out_of_order"
        if self.before_apply is not None:
            self.before_apply(frames)
        if run is None:
            run = self.runs[msg.run] = RunState(msg.run, msg.world_size, self.profile)
            # Every rank's launcher gave it the same WANDB_* environment: the first
            # hello (whichever rank) speaks for the run.
            env = msg.body.get("env", {}) if msg.kind == wire.KIND_HELLO else {}
            self.emit({"type": "run", "run": run.run, "epoch": None,
                       "metrics": {"world_size": msg.world_size}, "events": [],
                       "env": dict(env)})
        elif msg.world_size > run.world_size:
            run.world_size = msg.world_size
        if rank is None:
            rank = run.ranks[msg.rank] = RankState(msg.rank)
            rank.counters.admit(msg.instance, msg.seq)
        if fresh:
            self._register(run, rank, msg.instance)
        rank.counters.count(msg.kind, msg.seq, msg.dropped, msg.wall_time)
        self._apply(run, rank, msg)
        return None

    def _register(self, run: RunState, rank: RankState, instance: int) -> None:
        self.streams[stream_key(run.run, rank.rank, instance)] = Stream(
            run, rank, instance, run.run.encode())

    def stream(self, key: int, run_bytes: bytes) -> Stream | None:
        """The live stream behind a bulk step key, or None (then the message goes alone)."""
        st = self.streams.get(key)
        if st is None or st.rank.counters.instance != st.instance or st.run_bytes != run_bytes:
            return None
        return st

    def accept_steps(self, st: Stream, g: Groups, j: int, seg_names: list[list[str]],
                     s: Steps, buf: np.ndarray) -> None:
        """Apply stream ``j`` of a regrouped stretch of admitted fast steps
        (``before_apply`` already ran): what ``accept`` does for each, at once."""
        run, rank = st.run, st.rank
        world = int(g.max_world[j])
        if world > run.world_size:
            run.world_size = world
        rank.counters.count_many(wire.KIND_STEP, int(g.bounds[j + 1] - g.bounds[j]),
                                 int(g.last_seq[j]), int(g.max_dropped[j]),
                                 float(g.last_wall[j]))
        rank.open_steps.extend(g, j, seg_names, s, buf)

    def _apply(self, run: RunState, rank: RankState, msg: wire.Message) -> None:
        kind = msg.kind
        if kind == wire.KIND_STEP:
            rank.open_steps.add(msg)
            loss, gn = msg.body[0], msg.body[1]
            if not math.isfinite(loss) or (gn is not None and not math.isfinite(gn)):
                ev = run.health.step_event(msg.rank, msg.step, float(loss),
                                           None if gn is None else float(gn))
                if ev is not None:
                    self.emit({"type": "event", "run": run.run, "epoch": msg.epoch,
                               "step": msg.step, "rank": msg.rank, "metrics": {},
                               "events": [ev]})
        elif kind == wire.KIND_EPOCH:
            self._rank_epoch(run, rank, msg)
        elif kind == wire.KIND_HELLO:
            rank.host = str(msg.body.get("host", ""))
        elif kind == wire.KIND_VALIDATION:
            run.validations.append((msg.body.get("epoch", msg.epoch), msg.rank,
                                    msg.tensors["samples"], msg.body.get("channels")))
        elif kind == wire.KIND_CONFIG:
            if not run.config_seen:
                run.config_seen = True
                cfg = dict(msg.body["config"])
                if msg.body.get("num_params") is not None:
                    cfg["num_params"] = msg.body["num_params"]
                run.health.on_config(cfg)
                self.emit({"type": "config", "run": run.run, "epoch": None, "metrics": cfg,
                           "events": []})
        elif kind == wire.KIND_DATA:
            self._data(run, msg)
        elif kind == wire.KIND_BYE:
            rank.finished = True
            self._maybe_finish(run)

    def _rank_epoch(self, run: RunState, rank: RankState, msg: wire.Message) -> None:
        steps, rank.open_steps = rank.open_steps, StepColumns()
        rank.last_epoch = msg.epoch
        if msg.body.get("param_names"):
            run.param_names = list(msg.body["param_names"])
        if msg.epoch <= run.last_closed:
            run.late_epochs += 1  # closed without this rank after a timeout
            return
        slot = run.pending.setdefault(msg.epoch, {})
        if not slot:
            run.pending_since[msg.epoch] = time.monotonic()
        slot[msg.rank] = (steps, msg.body)
        self._close_ready(run)

    def _close_ready(self, run: RunState) -> None:
        """Close complete epochs in order; an incomplete earlier epoch holds later ones."""
        while run.pending:
            epoch = min(run.pending)
            present = run.pending[epoch]
            alive = [r for r in range(run.world_size)
                     if not (r in run.ranks and run.ranks[r].finished and r not in present)]
            if not all(r in present for r in alive) or not present:
                return
            self._close(run, epoch, [r for r in range(run.world_size) if r not in present])

    def _close(self, run: RunState, epoch: int, missing: list[int]) -> None:
        present = run.pending.pop(epoch, {})
        run.pending_since.pop(epoch, None)
        run.last_closed = max(run.last_closed, epoch)
        steps, weights, ema = {}, {}, {}
        for r in sorted(present):
            msgs, body = present[r]
            steps[r] = msgs.series()
            if body.get("weights") is not None:
                weights[r] = np.asarray(body["weights"], dtype=np.float64)
            if body.get("ema") is not None:
                ema[r] = np.asarray(body["ema"], dtype=np.float64)
        inp = EpochInput(run.run, epoch, run.world_size, steps, weights, ema,
                         list(run.param_names), missing, self._validation(run, epoch))
        metrics, events = run.health.on_epoch(inp)
        self.emit({"type": "epoch", "run": run.run, "epoch": epoch, "metrics": metrics,
                   "events": events, "ranks": sorted(present), "missing_ranks": missing})

    def _validation(self, run: RunState, epoch: int) -> ValidationInput | None:
        """Pool the samples sent for epochs up to this one (one dtype and channel list)."""
        ready = [v for v in run.validations if v[0] <= epoch]
        if not ready:
            return None
        run.validations = [v for v in run.validations if v[0] > epoch]
        first = ready[-1]
        same = [v for v in ready if v[0] == first[0] and v[2].dtype == first[2].dtype
                and v[2].shape[-1] == first[2].shape[-1]]
        arrays = [np.frombuffer(v[2].data, _NP_DTYPES[v[2].dtype]).reshape(v[2].shape)
                  for v in same]
        names = first[3] or run.data_channels or [f"ch{i}" for i in range(first[2].shape[-1])]
        return ValidationInput(first[0], first[2].dtype, arrays, list(names))

    def _data(self, run: RunState, msg: wire.Message) -> None:
        from collector.analysis.datastats import DataStatsAccumulator

        body = msg.body
        if run.data_rank is None and body["index"] == 0:
            run.data_rank = msg.rank
            run.data_acc = DataStatsAccumulator()
            run.data_count = body["count"]
            run.data_channels = list(body["channels"])
            consts = {k: np.frombuffer(msg.tensors[k].data, np.float64).copy()
                      if k in msg.tensors else None for k in ("mean", "std")}
            run.health.on_data_constants(DataConstants(run.data_channels, consts["mean"],
                                                       consts["std"]))
        if msg.rank != run.data_rank or body["index"] in run.data_seen \
                or body["index"] >= run.data_count or body["channels"] != run.data_channels:
            return  # another rank's copy, a repeat, or a chunk that contradicts chunk 0
        t = msg.tensors["chunk"]
        run.data_acc.add(np.frombuffer(t.data, _NP_DTYPES[t.dtype]).reshape(t.shape), t.dtype)
        run.data_seen.add(body["index"])
        if len(run.data_seen) == run.data_count:
            self.emit({"type": "data_stats", "run": run.run, "epoch": None,
                       "metrics": run.data_acc.metrics(run.data_channels), "events": []})

    # -- decisions and the end -----------------------------------------------------
    def reject(self, run: str | None, reason: str, n: int = 1) -> None:
        rs = self.runs.get(run) if run else None
        if rs is not None:
            rs.rejected[reason] = rs.rejected.get(reason, 0) + n

    def overdue(self, now: float, timeout_s: float) -> list[dict]:
        """Controls the live clock calls for: epochs waited on too long, silent runs."""
        out = []
        for run in self.runs.values():
            if run.finished:
                continue
            for epoch, since in sorted(run.pending_since.items()):
                if now - since >= timeout_s:
                    missing = [r for r in range(run.world_size) if r not in run.pending[epoch]]
                    out.append({"op": "close_epoch", "run": run.run, "epoch": epoch,
                                "missing": missing})
            # Some ranks said goodbye and the rest went quiet: they died. All quiet for
            # much longer: the whole job died. (Quiet = no new message since a tick.)
            msgs = sum(r.counters.messages for r in run.ranks.values())
            if msgs != run.seen[0]:
                run.seen = (msgs, now)
            quiet = now - run.seen[1]
            done = any(r.finished for r in run.ranks.values())
            if quiet >= (timeout_s if done else 5 * timeout_s):
                out.append({"op": "finish_run", "run": run.run})
        return out

    def control(self, ctl: dict) -> None:
        run = self.runs.get(ctl.get("run", ""))
        if ctl.get("op") == "rejects":
            for name, reasons in ctl["counts"].items():
                for reason, n in reasons.items():
                    self.reject(name or None, reason, n)
            return
        if run is None or run.finished:
            return
        if ctl["op"] == "close_epoch" and ctl["epoch"] in run.pending:
            # Everything before it closes first (in order), then it, then what follows.
            for epoch in sorted(e for e in run.pending if e <= ctl["epoch"]):
                missing = [r for r in range(run.world_size) if r not in run.pending[epoch]]
                self._close(run, epoch, missing)
            self._close_ready(run)
        elif ctl["op"] == "finish_run":
            self._finish(run)

    def _maybe_finish(self, run: RunState) -> None:
        self._close_ready(run)
        if all(r in run.ranks and run.ranks[r].finished for r in range(run.world_size)):
            self._finish(run)

    def _finish(self, run: RunState) -> None:
        for epoch in sorted(run.pending):
            self._close(run, epoch, [r for r in range(run.world_size)
                                     if r not in run.pending[epoch]])
        run.finished = True
        counts = {
            "dropped": sum(r.counters.reported_drops for r in run.ranks.values()),
            "seq_gaps": sum(r.counters.seq_gaps for r in run.ranks.values()),
            "rejected": sum(run.rejected.values()),
            "late_epochs": run.late_epochs,
            "missing_ranks": sum(1 for r in range(run.world_size) if r not in run.ranks
                                 or not run.ranks[r].finished),
        }
        self.emit({"type": "summary", "run": run.run, "epoch": run.last_closed,
                   "metrics": run.health.summary(counts), "events": []})

    def finish_all(self) -> None:
        for run in list(self.runs.values()):
            if not run.finished:
                self._finish(run)

    def all_finished(self) -> bool:
        return bool(self.runs) and all(r.finished for r in self.runs.values())

    def rank_table(self) -> dict[str, dict[int, dict]]:
        return {name: {r: rs.counters.as_dict() for r, rs in sorted(run.ranks.items())}
                for name, run in self.runs.items()}
