"""The live collector: one PULL socket that every rank of every run connects to, and the
back-channel's PUB beside it (``health_binds``) that every rank subscribes to.

The loop drains the PULL in batches into the pipeline, flushes the recording after each
batch (so a SIGKILL loses at most the batch in flight), and every half second asks the
pipeline for the clock's decisions and the stop policy for its, republishes the runs'
verdicts and refreshes the status view. The PUB shares the PULL's CURVE keys and
authenticator. SIGINT/SIGTERM: drain what has arrived, finish the recording and the
sinks, return 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import time
from typing import Any

import zmq

from collector.ingest.batch import Batch
from collector.ingest.binds import BindError, bind_all, check_binds
from collector.ingest.pipeline import Pipeline
from collector.ingest.stops import NO_STOPS, NoStops, StopPolicy
from collector.report.liveview import NullView, StatusView
from collector.sinks.health_pub import NULL_PUBLISHER, HealthPublisher, NullPublisher
from collector.text import printable

__all__ = ["Collector", "receive"]

_log = logging.getLogger("trainwatch.collector")

DRAIN_BATCH = 500  # messages per pipeline batch: amortises it, keeps the socket's queue warm
DRAIN_LIMIT = 5000  # messages between two looks at the clock
DRAIN_BYTES = 32 << 20  # tensor bytes per batch (validation samples, data chunks)
TICK_S = 0.5
PUB_HWM = 10_000  # back-channel messages queued per subscriber before it loses some
PUB_LINGER_S = 0.5  # at the end, the last verdicts' time to leave
_NOBLOCK = int(zmq.NOBLOCK)


def receive(sock: zmq.Socket, limit: int, max_bytes: int = DRAIN_BYTES) -> list[list]:
    """Up to ``limit`` waiting messages (lists of frames), without blocking, and no more
    once their tensor frames reach ``max_bytes`` (a batch of large samples is held whole
    until processed: its size is bounded here).

    Frames come zero-copy because a frame knows whether more parts follow; asking the
    socket instead (``recv_multipart``) costs pyzmq an option lookup of ~1.5 us per
    message, more than all the collector's work on a step. A multipart message arrives
    whole or not at all, so ``Again`` never splits one.
    """
    out: list[list] = []
    append, recv = out.append, sock.recv
    held = 0
    try:
        while len(out) < limit:
            f = recv(_NOBLOCK, copy=False)
            if f.more:
                parts = [f]
                while f.more:
                    f = recv(_NOBLOCK, copy=False)
                    parts.append(f)
                    held += len(f.buffer)
                append(parts)
                if held >= max_bytes:
                    break
            else:
                append([f])
    except zmq.Again:
        pass
    return out


def _load_trim():  # noqa: ANN202 - a ctypes function, or None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to give back this way
        return None


_TRIM = _load_trim()


def _give_back_memory() -> None:
    """Return freed heap to the OS. glibc raises its mmap threshold after large frees, so
    the buffers of large messages, once freed, would otherwise stay in the process's RSS
    for good: a burst of samples that were refused would look like memory held."""
    if _TRIM is not None:
        _TRIM(0)


class Collector:
    """Serves ``binds`` into ``pipeline`` until stopped (or, with ``once``, until done).

    ``health``: the back-channel's publisher (also one of the pipeline's sinks), bound to
    ``health_binds``; when they cannot be bound the collector goes on without it (a
    warning), unless ``health_required`` (the user named them). ``actions``: the stop
    policy (also a sink), asked at every tick.
    """

    def __init__(self, binds: list[str], pipeline: Pipeline, curve_keys: str | None = None,
                 once: bool = False, quiet_s: float = 3.0, view: StatusView | None = None,
                 max_msg_bytes: int = 64 << 20, rcvhwm: int = 10_000,
                 insecure: bool = False, health: HealthPublisher | NullPublisher = NULL_PUBLISHER,
                 health_binds: list[str] | None = None, health_required: bool = False,
                 actions: StopPolicy | NoStops = NO_STOPS) -> None:
        self.binds = binds
        self.health = health
        self.health_binds = list(health_binds or [])
        self.health_required = health_required
        self.actions = actions
        self.insecure = insecure  # bind beyond loopback without CURVE (binds.check_binds)
        self.pipeline = pipeline
        self.curve_keys = curve_keys
        self.once = once
        self.quiet_s = quiet_s
        self.view: StatusView = view if view is not None else NullView()
        self.max_msg_bytes = max_msg_bytes
        self.rcvhwm = rcvhwm
        self._stop = False
        self._big_since_trim = False  # tensor frames came and went since the last trim
        self.started = time.monotonic()
        self._counts: dict[str, tuple[float, int]] = {}
        self._unrecorded_told = (0, -1e18)  # (count, monotonic time) last written to the log

    def stop(self, *_: Any) -> None:
        self._stop = True

    def serve(self) -> int:
        check_binds(self.binds + self.health_binds, bool(self.curve_keys), self.insecure)
        ctx = zmq.Context()
        auth = pub = None
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, self.rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_msg_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve_keys:
            from collector.ingest.auth import start_authenticator

            auth = start_authenticator(ctx, sock, self.curve_keys)
        # Before the warm-up: a SIGTERM while the kernels compile must stop the collector
        # cleanly (exit 0, recording closed), not kill it.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.stop)
        try:
            bind_all(sock, self.binds)
            pub = self._publisher(ctx)
        except BindError:
            sock.close()
            if auth is not None:
                auth.stop()
            ctx.term()
            self.pipeline.recorder.close()
            raise
        _log.info("collecting on %s", ", ".join(printable(b) for b in self.binds))
        # Bound first: while the kernels compile (seconds on a cold cache), messages wait
        # in the socket's queue instead of being refused.
        t0 = time.monotonic()
        self.pipeline.warm_up()
        _log.info("ready (kernels loaded in %.1f s)", time.monotonic() - t0)
        try:
            self._loop(sock)
            self._drain(sock)
        finally:
            self.pipeline.finish()
            self._tell_unrecorded(final=True)
            self.view.update(self.status())
            self.view.close()
            sock.close()
            if pub is not None:
                pub.close(linger=int(PUB_LINGER_S * 1000))
            if auth is not None:
                auth.stop()
            ctx.term()
        return 0

    def _publisher(self, ctx: zmq.Context) -> zmq.Socket | None:
        """The back-channel's PUB, bound and handed to the publisher; None without one."""
        if not self.health_binds:
            return None
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, PUB_HWM)
        pub.setsockopt(zmq.LINGER, 0)
        if self.curve_keys:
            from collector.ingest.auth import curve_server

            curve_server(pub, self.curve_keys)
        shown = ", ".join(printable(b) for b in self.health_binds)
        try:
            bind_all(pub, self.health_binds)
        except BindError as exc:
            pub.close()
            if self.health_required:
                raise
            _log.warning("no back-channel (%s): the ranks hear no verdicts or stops; pass "
                         "--health-bind to choose its endpoint", exc)
            return None
        self.health.attach(pub)
        _log.info("back-channel on %s", shown)
        return pub

    def _loop(self, sock: zmq.Socket) -> None:
        last_msg = time.monotonic()
        next_tick = last_msg + TICK_S
        while not self._stop:
            if sock.poll(int(TICK_S * 1000), zmq.POLLIN):
                if self._drain(sock, DRAIN_LIMIT):
                    last_msg = time.monotonic()
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self.pipeline.tick(now)
                # recorded decisions, like the clock's
                for ctl in self.actions.due(self.pipeline.state, time.time()):
                    self.pipeline.control(ctl)
                self.pipeline.flush()
                if self._big_since_trim:
                    self._big_since_trim = False
                    _give_back_memory()
                self.health.tick(now)
                self._tell_unrecorded()
                self.view.update(self.status())
                if self.once and self.pipeline.state.all_finished() \
                        and now - last_msg >= self.quiet_s:
                    return

    def _drain(self, sock: zmq.Socket, limit: int | None = None) -> int:
        """Feed what is waiting (up to ``limit`` messages, else all) in batches of
        ``DRAIN_BATCH``, without blocking; then flush the recording."""
        total = 0
        while limit is None or total < limit:
            batch = receive(sock, DRAIN_BATCH if limit is None
                            else min(DRAIN_BATCH, limit - total))
            if not batch:
                break
            self.pipeline.feed_batch(Batch.of(batch))
            total += len(batch)
            self._big_since_trim |= any(len(m) > 1 for m in batch)
        if total:
            self.pipeline.flush()
        return total

    def _tell_unrecorded(self, final: bool = False, every_s: float = 30.0) -> None:
        """What the recording lost, in the log: all a --no-view collector shows."""
        rec = self.pipeline.recorder
        if rec.path is None:
            return
        told, at = self._unrecorded_told
        now = time.monotonic()
        if not final and (rec.unrecorded == told or now - at < every_s):
            return
        self._unrecorded_told = (rec.unrecorded, now)
        _log.log(logging.WARNING if rec.unrecorded else logging.INFO,
                 "recording %s%s: %d records written, unrecorded %d (of %d)%s", rec.path,
                 " closed" if final else "", rec.recorded, rec.unrecorded, rec.appended,
                 f" ({rec.error})" if rec.error else "")

    def status(self) -> dict:
        """What the live view shows; computed from the state, twice a second at most."""
        p = self.pipeline
        now = time.monotonic()
        runs = p.state.run_status()
        for name, run in runs.items():
            t0, n0 = self._counts.get(name, (self.started, 0))
            run["msgs_per_s"] = (run["messages"] - n0) / max(1e-3, now - t0)
            run["active_warnings"] = list(p.active.get(name, ()))
            self._counts[name] = (now, run["messages"])
        rec = p.recorder
        return {"uptime_s": now - self.started, "recorded": rec.recorded,
                "unrecorded": rec.unrecorded, "recording_error": rec.error,
                "rejected": dict(p.rejected), "runs": runs}
