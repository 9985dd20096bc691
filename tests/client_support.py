"""Plumbing shared by the tests of the training client (tests/test_client_*.py)."""

from __future__ import annotations

import logging
import time

import zmq

from trainer_client import wire


class Receiver:
    """A real PULL socket, bound before the client connects; ``until_bye`` drains it."""

    def __init__(self, tmp_path) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PULL)
        self.endpoint = f"ipc://{tmp_path}/pull.sock"
        self.sock.bind(self.endpoint)

    def until_bye(self, timeout: float = 30.0) -> list[wire.Message]:
        got, deadline = [], time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(200):
                got.append(wire.decode(self.sock.recv_multipart()))
                if got[-1].kind == wire.KIND_BYE:
                    break
        self.sock.close(0)
        self.ctx.term()
        return got


def warnings_with(caplog, text: str) -> list[str]:
    """The WARNING-or-worse messages captured so far that contain ``text``."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and text in r.getMessage()]


def kill_leftovers(procs: list) -> None:
    """Kill the collector processes a test started that still run (a failed assertion
    must not leave one behind)."""
    for c in procs:
        if c.proc is not None and c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait(10)
