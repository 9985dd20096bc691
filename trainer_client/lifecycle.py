"""The clients of this process through its life: a forked child (a DataLoader worker)
silences them, and the interpreter's exit says goodbye for those a script never closed,
with how the script ended (finished, interrupted by Ctrl-C, crashed)."""

from __future__ import annotations

import atexit
import os
import sys
import weakref
from typing import Protocol

__all__ = ["how_it_ended", "track"]


class _Client(Protocol):
    def close(self, timeout: float = ..., ended: str = ...) -> None: ...
    def _forked(self) -> None: ...


_clients: weakref.WeakSet[_Client] = weakref.WeakSet()


def track(client: _Client) -> None:
    """Watch ``client`` until it is garbage."""
    _clients.add(client)


def how_it_ended(exc: BaseException | None) -> str:
    """The word a goodbye carries for a script that ended with ``exc`` (None: normally)."""
    if exc is None:
        return "finished"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"crashed: {type(exc).__name__}"


def _after_fork_in_child() -> None:
    # The sender thread did not survive the fork and the socket belongs to the parent:
    # a forked DataLoader worker must go quiet, never send.
    for client in list(_clients):
        client._forked()


def _close_all_at_exit() -> None:
    # A script that forgets close() still says goodbye, so the collector sees the run end,
    # and how: a Ctrl-C or an exception that ended the script (Python keeps the last
    # unhandled one in sys.last_exc) makes it an interrupted or crashed run.
    ended = how_it_ended(getattr(sys, "last_exc", None) or getattr(sys, "last_value", None))
    for client in list(_clients):
        client.close(timeout=2.0, ended=ended)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_all_at_exit)
