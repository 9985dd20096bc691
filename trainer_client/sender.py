"""The sender: a bounded queue and the one thread that owns the ZeroMQ socket.

The training thread only appends to a deque (constant time, never a lock the sender
holds, never a socket call). The sender thread waits for each item's device copy (CUDA
event), packs it and sends it without blocking: a full socket is waited on briefly, then
the message is dropped and counted. Drops by reason:

- ``queue_full``: the queue (count or bytes) was full when the message was made;
- ``send_failed``: the socket stayed full (collector slow or gone) or raised;
- ``closed``: still queued when ``close`` ran out of time, or made after close;
- ``build_failed``: packing the message raised (a bug: logged once);
- ``mutated``: a CPU tensor was changed in place before the sender could read it.

Every message's header carries how many lower-numbered messages were dropped, so the
collector can compare its sequence gaps with what the client reports.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from . import wire
from .reductions import MutatedError

_log = logging.getLogger("trainwatch.client")

POLL_S = 0.02  # how often an idle sender looks at the queue: the latency of a message
WAKE_AT = 256  # queued items that make the training thread wake the sender at once

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
    """Owns the socket on its own daemon thread; see the module docstring."""

    def __init__(self, endpoint: str, run: str, rank: int, world_size: int, instance: int,
                 max_queue: int = 10_000, max_queue_bytes: int = 1 << 30,
                 sndhwm: int = 10_000, send_wait_s: float = 0.1,
                 connect_grace_s: float = 5.0,
                 curve: dict[str, bytes] | None = None) -> None:
        self.endpoint = endpoint
        self._ident = (run, rank, world_size, instance)
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes
        self._sndhwm = sndhwm
        self._send_wait_ms = int(send_wait_s * 1000)
        # The first message may wait this long for a collector that starts after the
        # trainer (its own thread waits; the training thread keeps queueing).
        self._grace_ms = int(connect_grace_s * 1000)
        self._curve = curve
        self._queue: deque[Item] = deque()
        self._wake = threading.Event()
        self._stop_at: float | None = None  # monotonic deadline once close() has begun
        self.enq_bytes = 0  # written by the training thread only
        self.deq_bytes = 0  # written by the sender thread only
        self.enq_dropped = 0  # training thread only
        self.sent = 0
        self.drops = {"queue_full": 0, "send_failed": 0, "closed": 0, "build_failed": 0,
                      "mutated": 0}
        self._thread = threading.Thread(target=self._run, name="trainwatch-sender", daemon=True)
        self._thread.start()

    # -- training thread -------------------------------------------------------------
    def offer(self, item: Item) -> bool:
        """Queue an item; False (and counted) when the queue is full. Never blocks."""
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

    def queued(self) -> int:
        return len(self._queue)

    def close(self, deadline: float, final: Item | None) -> bool:
        """Send what fits before ``deadline`` (monotonic), then ``final``; True if joined."""
        if final is not None:
            self.enq_bytes += final.nbytes
            self._queue.append(final)
        self._stop_at = deadline
        self._wake.set()
        self._thread.join(max(0.0, deadline - time.monotonic()) + 0.05)
        return not self._thread.is_alive()

    # -- sender thread ---------------------------------------------------------------
    def _socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, self._sndhwm)
        sock.setsockopt(zmq.LINGER, 0)  # close() sets a bounded linger explicitly
        # Queue only on live connections: with no collector a send fails at once and the
        # drop is counted here, instead of piling up in a buffer that close() discards.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self._curve:
            sock.curve_secretkey = self._curve["secret"]
            sock.curve_publickey = self._curve["public"]
            sock.curve_serverkey = self._curve["server"]
        if _ipv6_host(self.endpoint):
            sock.setsockopt(zmq.IPV6, 1)  # else libzmq cannot even resolve tcp://[::1]:P
        sock.connect(self.endpoint)
        return sock

    def _run(self) -> None:
        ctx = zmq.Context()
        sock = self._socket(ctx)
        try:
            self._loop(sock)
        except Exception:
            _log.exception("trainwatch sender stopped")
        finally:
            # Give the socket what is left of the close deadline to hand queued bytes over.
            left = 0.0 if self._stop_at is None else self._stop_at - time.monotonic()
            sock.close(linger=max(0, int(left * 1000)))
            ctx.term()

    def _loop(self, sock: zmq.Socket) -> None:
        q = self._queue
        while True:
            if not q:
                if self._stop_at is not None:
                    return
                self._wake.wait(POLL_S)
                self._wake.clear()
                continue
            if self._stop_at is not None and time.monotonic() >= self._stop_at - 0.05:
                self._abandon()
                final = q.popleft()
                self.deq_bytes += final.nbytes
                self._send(sock, final, wait=False)
                return
            item = q.popleft()
            self.deq_bytes += item.nbytes
            self._send(sock, item)

    def _abandon(self) -> None:
        """Out of time at close: drop all but the final message, which says so."""
        q = self._queue
        while len(q) > 1:
            item = q.popleft()
            self.deq_bytes += item.nbytes
            self.drops["closed"] += 1

    def _send(self, sock: zmq.Socket, item: Item, wait: bool = True) -> None:
        try:
            if item.event is not None:
                item.event.synchronize()  # releases the GIL; only this thread waits
            body, tensors = item.build(item.host)
            run, rank, world, instance = self._ident
            dropped = item.dropped_before + self._sender_dropped()
            frames = wire.encode(wire.Header(item.kind, run, rank, world, instance, item.seq,
                                             item.step, item.epoch, item.wall, dropped, body),
                                 tensors)
        except MutatedError:
            self.drops["mutated"] += 1
            return
        except Exception:
            self.drops["build_failed"] += 1
            if self.drops["build_failed"] == 1:
                _log.exception("trainwatch could not pack a %s message",
                               wire.KINDS.get(item.kind))
            return
        item.host = item.event = None
        for attempt in range(2):
            try:
                sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                self.sent += 1
                return
            except zmq.Again:
                if attempt == 0 and wait:
                    self._wait_writable(sock)
            except zmq.ZMQError:
                break
        self.drops["send_failed"] += 1

    def _wait_writable(self, sock: zmq.Socket) -> None:
        """Poll for room: briefly, or through the first-connect grace; close() cuts it short."""
        grace, self._grace_ms = self._grace_ms, 0
        left = max(grace, self._send_wait_ms)
        while left > 0 and (self._stop_at is None or time.monotonic() < self._stop_at - 0.1):
            if sock.poll(min(left, self._send_wait_ms), zmq.POLLOUT):
                return
            left -= self._send_wait_ms

    def _sender_dropped(self) -> int:
        d = self.drops
        return d["send_failed"] + d["closed"] + d["build_failed"] + d["mutated"]


def _ipv6_host(endpoint: str) -> bool:
    """A tcp endpoint whose host is an IPv6 address: the host precedes the port's ':',
    after any source address (``src;host:port``), as libzmq reads it."""
    if not endpoint.startswith("tcp://"):
        return False
    return ":" in endpoint[6:].rpartition(";")[2].rpartition(":")[0]
