"""The sender: a bounded queue and the one thread that owns the ZeroMQ socket.

The training thread only appends to a deque (constant time, never a lock the sender
holds, never a socket call). The sender thread waits for each item's device copy (CUDA
event), packs it and sends it without blocking: a full socket is waited on briefly, then
the message is dropped and counted. A socket monitor (read on this thread only) tells it
whether a collector is connected: while none is, the queue holds what was logged (up to
its bounds) instead of trickling it into a socket that cannot deliver, and the trainer's
console is told once when nothing connected in ``connect_warn_s``, and whenever a
connection is lost or comes back. The back-channel's SUB socket (``feedback.HealthSocket``)
is this thread's too, read at the same cadence as the monitor. Drops by reason:

- ``queue_full``: the queue (count or bytes) was full when the message was made;
- ``send_failed``: the socket stayed full (collector slow) or raised;
- ``no_peer``: still queued, or due, when ``close`` found no collector connected;
- ``closed``: still queued when ``close`` ran out of time, or made after close;
- ``build_failed``: packing the message raised (a bug: logged once);
- ``mutated``: a CPU tensor was changed in place before the sender could read it;
- ``log_failed``: the ``log_*`` call's own device work raised (logged once);
- ``sender_dead``: made after the sender thread died (logged once, when it died).

``handed_to_socket`` counts messages ZeroMQ accepted; that is not delivery (a collector
killed with messages in flight loses them). Every message's header carries how many
lower-numbered messages were dropped, so the collector can tell its sequence gaps that
the client reported from real transport loss.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from . import wire
from .curve import use_client_keys
from .feedback import HealthSocket
from .identity import dial_options
from .reductions import MutatedError

_log = logging.getLogger("trainwatch.client")

POLL_S = 0.02  # how often an idle sender looks at the queue: the latency of a message
WAKE_AT = 256  # queued items that make the training thread wake the sender at once
CONNECT_WARN_S = 5.0  # seconds without any collector before one warning says so
# close() of a client that has never seen a collector waits for one only until this many
# seconds after the client started: a live collector connects in milliseconds.
FIRST_PEER_S = 1.0
READY_S = 10.0  # the constructor waits at most this long for the sender's socket

DROP_REASONS = ("queue_full", "send_failed", "no_peer", "closed", "build_failed", "mutated",
                "log_failed", "sender_dead")
# Drops counted on the sender thread (the others on the training thread): the part of a
# message header's ``dropped`` count the sender adds.
_SENDER_SIDE = ("send_failed", "no_peer", "closed", "build_failed", "mutated")

# A connection counts once its ZMTP (and CURVE) handshake is done: only then does a PUSH
# socket with IMMEDIATE set queue messages on it.
_UP = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
_AUTH_FAILED = getattr(zmq, "EVENT_HANDSHAKE_FAILED_AUTH", 0)
_EVENTS = _UP | zmq.EVENT_DISCONNECTED | _AUTH_FAILED

# build(host) -> (body, [wire.Tensor]); runs on the sender thread after the event.
Build = Callable[[Any], tuple[Any, list[wire.Tensor]]]


class Item:
    __slots__ = ("kind", "seq", "step", "epoch", "wall", "dropped_before", "build", "host",
                 "event", "nbytes")

    def __init__(self, kind: int, seq: int, step: int, epoch: int, dropped_before: int,
                 build: Build, host: Any = None, event: Any = None, nbytes: int = 0) -> None:
        self.kind = kind
        self.seq = seq
        self.step = step
        self.epoch = epoch
        self.wall = time.time()
        self.dropped_before = dropped_before
        self.build = build
        self.host = host
        self.event = event
        self.nbytes = nbytes


class Sender:
    """Owns the socket on its own daemon thread; see the module docstring.

    Raises ValueError when ZeroMQ refuses to connect to ``endpoint``.
    """

    def __init__(self, endpoint: str, run: str, rank: int, world_size: int, instance: int,
                 max_queue: int = 10_000, max_queue_bytes: int = 1 << 30,
                 sndhwm: int = 10_000, send_wait_s: float = 0.1,
                 connect_warn_s: float = CONNECT_WARN_S, first_peer_s: float = FIRST_PEER_S,
                 curve: dict[str, bytes] | None = None,
                 health: HealthSocket | None = None) -> None:
        self.endpoint = endpoint
        self._ident = (run, rank, world_size, instance)
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self._sndhwm = sndhwm
        self._send_wait_ms = int(send_wait_s * 1000)
        self._connect_warn_s = connect_warn_s
        self._first_peer_s = first_peer_s
        self._curve = curve
        self._health = health
        self._queue: deque[Item] = deque()
        self._wake = threading.Event()
        self._stop_at: float | None = None  # monotonic deadline once close() has begun
        self.enq_bytes = 0  # written by the training thread only
        self.deq_bytes = 0  # written by the sender thread only
        self.enq_dropped = 0  # training thread only
        self.handed_to_socket = 0
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        # Written by the sender thread, read by the training thread (single bools).
        self.connected = False
        self.ever_connected = False
        self.dead = False
        self._started = time.monotonic()
        self._lost_at: float | None = None
        self._warned_absent = False
        self._auth_failed = False
        self._ready = threading.Event()
        self._connect_error: zmq.ZMQError | None = None
        self._thread = threading.Thread(target=self._run, name="trainwatch-sender", daemon=True)
        self._thread.start()
        self._ready.wait(READY_S)
        if self._connect_error is not None:
            raise ValueError(f"trainwatch: ZeroMQ cannot connect to {endpoint!r}: "
                             f"{self._connect_error}") from None

    # -- training thread -------------------------------------------------------------
    def offer(self, item: Item) -> bool:
        """Queue an item; False (and counted) when the queue is full. Never blocks."""
        if self.dead:
            self.enq_dropped += 1
            self.drops["sender_dead"] += 1
            return False
        q = self._queue
        if len(q) >= self.max_queue or self.enq_bytes - self.deq_bytes + item.nbytes > \
                self.max_queue_bytes:
            self.enq_dropped += 1
            self.drops["queue_full"] += 1
            return False
        self.enq_bytes += item.nbytes
        q.append(item)
        # Waking a thread is a syscall (~5-10 us): the sender polls every POLL_S anyway,
        # so the training thread wakes it only when a batch's worth is waiting.
        if len(q) >= WAKE_AT and not self._wake.is_set():
            self._wake.set()
        return True

    def count_failed(self) -> None:
        """A ``log_*`` call whose own work raised: its sequence number is spent, so count
        it as a drop the next message reports (training thread)."""
        self.enq_dropped += 1
        self.drops["log_failed"] += 1

    def queued(self) -> int:
        return len(self._queue)

    def state(self) -> str:
        if self.dead:
            return "dead"
        return "running" if self._thread.is_alive() else "closed"

    def close(self, deadline: float, final: Item | None) -> bool:
        """Send what fits before ``deadline`` (monotonic), then ``final``; True if joined.

        With no collector ever connected (and the client older than ``first_peer_s``) it
        returns at once, the queued messages counted as ``no_peer``.
        """
        if final is not None:
            self.enq_bytes += final.nbytes
            self._queue.append(final)
        if self.dead or not self._thread.is_alive():
            self._drain_dead()
            return True
        self._stop_at = deadline
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.05)
        if self.dead:
            self._drain_dead()
        return not self._thread.is_alive()

    def _drain_dead(self) -> None:
        """The sender is gone: what is still queued can never leave (training thread)."""
        q = self._queue
        while q:
            q.popleft()
            self.drops["sender_dead"] += 1

    # -- sender thread ---------------------------------------------------------------
    def _socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.LINGER, 0)  # close() sets a bounded linger explicitly
        # Queue only on live connections: with no collector a send fails at once, and the
        # sender holds its own (bounded, counted) queue instead of a buffer close() discards.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        dial_options(sock, self.endpoint)
        use_client_keys(sock, self._curve)
        return sock

    def _run(self) -> None:
        ctx = sock = mon = None
        clean = False
        try:
            ctx = zmq.Context()
            sock = self._socket(ctx)
            mon = sock.get_monitor_socket(_EVENTS)
            try:
                sock.connect(self.endpoint)
            except zmq.ZMQError as exc:
                self._connect_error = exc  # the constructor raises it as a ValueError
                clean = True
                return
            if self._health is not None:
                self._health.open(ctx)
            self._ready.set()
            self._loop(sock, mon)
            clean = True
        except BaseException as exc:  # whatever it was, the thread is gone
            # Said before ``dead`` is set, so whoever sees the state "dead" can also
            # already see why (the finally below sets it should the logging itself fail).
            _log.warning("trainwatch: the sender thread stopped (%s: %s); monitoring is off "
                         "and every later message is dropped (stats: sender_dead)",
                         type(exc).__name__, exc, exc_info=True)
            self.dead = True
        finally:
            if not clean:
                self.dead = True
            self._ready.set()
            # Give the socket what is left of the close deadline to hand queued bytes over.
            left = 0.0 if self._stop_at is None else self._stop_at - time.monotonic()
            if self._health is not None:
                self._health.close()
            if mon is not None:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
                mon.close(0)
            if sock is not None:
                sock.close(linger=max(0, int(left * 1000)))
            if ctx is not None:
                ctx.term()

    def _loop(self, sock: zmq.Socket, mon: zmq.Socket) -> None:
        q = self._queue
        next_watch = 0.0
        while True:
            now = time.monotonic()
            if now >= next_watch:
                self._watch(mon, now)
                if self._health is not None:
                    self._health.poll()
                next_watch = now + POLL_S
            if self._stop_at is not None:
                if not q:
                    return
                if now >= self._stop_at - 0.05 or not self._may_wait_at_close(now):
                    self._abandon()
                    final = q.popleft()
                    self.deq_bytes += final.nbytes
                    self._send(sock, final, wait=False)
                    return
            if not q:
                self._wake.wait(POLL_S)
                self._wake.clear()
                continue
            if not self.connected and not sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT:
                # No collector: hold the queue (bounded; once full, new messages are
                # dropped as queue_full) and wait for a monitor event or close().
                mon.poll(int(POLL_S * 1000))
                continue
            item = q.popleft()
            self.deq_bytes += item.nbytes
            self._send(sock, item)

    def _may_wait_at_close(self, now: float) -> bool:
        """Whether close() should still wait for a collector: not when none ever came."""
        return self.connected or self.ever_connected or \
            now < self._started + self._first_peer_s

    def _watch(self, mon: zmq.Socket, now: float) -> None:
        """Connection state from the monitor's events; the warnings the user sees."""
        while mon.poll(0):
            ev = recv_monitor_message(mon)["event"]
            if ev & _UP:
                self._up(now)
            elif ev & zmq.EVENT_DISCONNECTED:
                self._down(now)
            elif ev & _AUTH_FAILED:
                self._auth_failed = True
        if not self.ever_connected and not self._warned_absent \
                and now - self._started >= self._connect_warn_s:
            self._warned_absent = True
            hint = " (a CURVE handshake was refused: check the keys)" if self._auth_failed \
                else ""
            _log.warning("trainwatch: no collector has connected at %s in %.0f s%s; "
                         "monitoring is off until one does (up to %d messages wait, later "
                         "ones are dropped and counted in stats)", self.endpoint,
                         self._connect_warn_s, hint, self.max_queue)

    def _up(self, now: float) -> None:
        if self.connected:
            return
        self.connected = True
        if self._lost_at is not None:
            _log.warning("trainwatch: the collector at %s is back after %.1f s",
                         self.endpoint, now - self._lost_at)
            self._lost_at = None
        elif self._warned_absent:
            _log.warning("trainwatch: a collector connected at %s after %.1f s",
                         self.endpoint, now - self._started)
        self.ever_connected = True

    def _down(self, now: float) -> None:
        if not self.connected:
            return
        self.connected = False
        self._lost_at = now
        _log.warning("trainwatch: lost the collector at %s; messages wait (up to %d) until "
                     "it is back", self.endpoint, self.max_queue)

    def _abandon(self) -> None:
        """Out of time (or no collector) at close: drop all but the final message. Each
        is still packed, so one that could never have been sent counts as what it is."""
        q = self._queue
        reason = "closed" if self.connected else "no_peer"
        while len(q) > 1:
            item = q.popleft()
            self.deq_bytes += item.nbytes
            if self._pack(item) is not None:
                self.drops[reason] += 1

    def _pack(self, item: Item) -> list | None:
        """The item's frames; None (and counted) when its values changed or packing raised."""
        try:
            if item.event is not None:
                item.event.synchronize()  # releases the GIL; only this thread waits
            body, tensors = item.build(item.host)
            run, rank, world, instance = self._ident
            dropped = item.dropped_before + self._sender_dropped()
            return wire.encode(wire.Header(item.kind, run, rank, world, instance, item.seq,
                                           item.step, item.epoch, item.wall, dropped, body),
                               tensors)
        except MutatedError:
            self.drops["mutated"] += 1
        except Exception:
            self.drops["build_failed"] += 1
            if self.drops["build_failed"] == 1:
                _log.exception("trainwatch could not pack a %s message",
                               wire.KINDS.get(item.kind))
        finally:
            item.host = item.event = None
        return None

    def _send(self, sock: zmq.Socket, item: Item, wait: bool = True) -> None:
        frames = self._pack(item)
        if frames is None:
            return
        for attempt in range(2):
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.handed_to_socket += 1
                return
            except zmq.Again:
                if attempt == 0 and wait and self.connected:
                    self._wait_writable(sock)
                else:
                    break
            except zmq.ZMQError:
                break
        self.drops["send_failed" if self.connected else "no_peer"] += 1

    def _wait_writable(self, sock: zmq.Socket) -> None:
        """Poll briefly for room in a full socket; close() cuts it short."""
        if self._stop_at is None or time.monotonic() < self._stop_at - 0.1:
            sock.poll(self._send_wait_ms, zmq.POLLOUT)

    def _sender_dropped(self) -> int:
        d = self.drops
        return sum(d[k] for k in _SENDER_SIDE)
