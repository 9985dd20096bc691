"""The collector's live status: a rich board on a terminal, change-only log lines elsewhere.

The collector calls ``update`` on every tick with a status dict; the view decides what to
show. On a terminal the board is redrawn in place; in a batch job's log file a run gets a
line only when something it shows changed, so a week-long job does not fill the disk::

    console = board_console(sys.stdout)     # None unless stdout is a terminal
    if console is not None:                 # log lines then scroll above the board
        logging.getLogger().addHandler(board_log_handler(console))
    view = make_view(sys.stdout, console)
    view.update({"uptime_s": 3.0, "recorded": 10, "unrecorded": 0, "rejected": {},
                 "runs": {"r1": {"epoch": 0, "ranks_connected": 2, "world_size": 2, ...}}})
    view.close()
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TextIO

from collector.text import printable

if TYPE_CHECKING:
    import logging

    from rich.console import Console

__all__ = ["NullView", "PlainView", "RichView", "StatusView", "board_console",
           "board_log_handler", "make_view"]

Status = dict[str, Any]


class StatusView(Protocol):
    def update(self, status: Status) -> None: ...

    def close(self) -> None: ...


class NullView:
    """A view that shows nothing (``collect --no-view``), so the server never asks."""

    def update(self, status: Status) -> None:
        pass

    def close(self) -> None:
        pass


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(callable(isatty) and isatty())


def board_console(stream: TextIO = sys.stdout) -> Console | None:
    """The rich console a board on ``stream`` draws with; None when it is not a terminal."""
    if not _isatty(stream):
        return None
    from rich.console import Console

    return Console(file=stream)


def board_log_handler(console: Console) -> logging.Handler:
    """Log records printed through the board's console: rich draws each line above the
    board and the board again below it, so neither garbles the other."""
    from rich.logging import RichHandler

    return RichHandler(console=console, show_path=False, markup=False, rich_tracebacks=False,
                       log_time_format="%Y-%m-%d %H:%M:%S")


def make_view(stream: TextIO = sys.stdout, console: Console | None = None) -> StatusView:
    """A rich board when ``stream`` is a terminal (drawn with ``console`` if given, the one
    log records go through), else a plain change log."""
    if console is None:
        console = board_console(stream)
    if console is not None:
        return RichView(console)
    return PlainView(stream)


def _uptime(seconds: float) -> str:
    s = int(max(0.0, seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _rejects(rejected: dict[str, int]) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in sorted(rejected.items()) if n) or "none"


def _printable(text: str) -> str:
    """A run id as one log token: quoted when it holds spaces or control characters."""
    text = str(text)
    return text if text.isprintable() and " " not in text else repr(text)


def _epoch(run: dict[str, Any]) -> str:
    epoch = run.get("epoch")
    return "-" if epoch is None else str(epoch)


class RichView:
    """A rich ``Live`` table redrawn on each update (no refresh thread: the tick drives it)."""

    def __init__(self, console: Any) -> None:
        from rich.live import Live

        self._console = console
        self._live = Live(console=console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False)
        self._started = False
        self._closed = False

    def update(self, status: Status) -> None:
        if self._closed:
            return
        if not self._started:
            self._live.start()
            self._started = True
        self._live.update(self.render(status), refresh=True)

    def close(self) -> None:
        if self._started and not self._closed:
            self._live.stop()
        self._closed = True

    @staticmethod
    def render(status: Status) -> Any:
        """The board for one status: the collector's totals, a table of runs, the rejects."""
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        unrecorded = int(status.get("unrecorded", 0))
        title = Text.assemble(
            ("trainwatch collector", "bold"),
            f"  up {_uptime(status.get('uptime_s', 0.0))}  recorded {status.get('recorded', 0)}",
            ("  unrecorded ", ""),
            (str(unrecorded), "bold red" if unrecorded else "green"),
        )
        if status.get("recording_error"):
            title.append(f"  recording failed: {status['recording_error']}", style="bold red")
        rejected = status.get("rejected") or {}
        caption = Text.assemble(("rejected: ", "dim"),
                                (_rejects(rejected), "yellow" if any(rejected.values()) else "dim"))
        table = Table(expand=False)
        for name, justify in (("run", "left"), ("epoch", "right"), ("ranks", "right"),
                              ("msgs", "right"), ("msgs/s", "right"), ("dropped", "right"),
                              ("rejected", "right"), ("warnings", "left")):
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        runs = status.get("runs") or {}
        if not runs:
            table.add_row(Text("waiting for ranks to connect", style="dim"), *[""] * 7)
        for run_id, run in sorted(runs.items()):
            connected, world = run.get("ranks_connected", 0), run.get("world_size", 0)
            dropped, rejected_n = run.get("dropped", 0), run.get("rejected", 0)
            warnings = run.get("active_warnings") or []
            warn_text = (Text(", ".join(warnings), style="bold red") if warnings
                         else Text("ok", style="green"))
            finished = bool(run.get("finished"))
            table.add_row(
                Text(printable(run_id), style="dim" if finished else "bold"),
                _epoch(run) + (" done" if finished else ""),
                Text(f"{connected}/{world}",
                     style="green" if connected >= world or finished else "yellow"),
                str(run.get("messages", 0)),
                f"{run.get('msgs_per_s', 0.0):.1f}",
                Text(str(dropped), style="yellow" if dropped else ""),
                Text(str(rejected_n), style="yellow" if rejected_n else ""),
                warn_text,
            )
        return Group(title, table, caption)


class PlainView:
    """One log line per run when what it shows changes, at most one per ``min_interval_s``.

    Warning changes and lost ranks are written at once; epoch and drop changes wait out the
    interval (the latest state is written then, so nothing is lost, only coalesced).
    """

    def __init__(self, stream: TextIO, min_interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._min_interval_s = min_interval_s
        self._clock = clock
        self._shown: dict[str, tuple[Any, ...]] = {}  # run -> last state written
        self._last_line: dict[str, float] = {}
        # (unrecorded, rejects, recording error) as last written
        self._collector_shown: tuple[Any, ...] = (0, (), None)
        self._last: Status | None = None
        self._closed = False

    def update(self, status: Status) -> None:
        if self._closed:
            return
        self._last = status
        self._emit(status, force=False)

    def close(self) -> None:
        if self._closed:
            return
        if self._last is not None:
            self._emit(self._last, force=True)  # coalesced changes are not lost on exit
        self._closed = True
        self._stream.flush()

    @staticmethod
    def _key(run: dict[str, Any]) -> tuple[Any, ...]:
        return (run.get("epoch"), run.get("ranks_connected", 0), run.get("world_size", 0),
                run.get("dropped", 0), run.get("rejected", 0),
                tuple(run.get("active_warnings") or ()), bool(run.get("finished")))

    def _emit(self, status: Status, force: bool) -> None:
        now = self._clock()
        lines = []
        for run_id, run in sorted((status.get("runs") or {}).items()):
            key = self._key(run)
            old = self._shown.get(run_id)
            if old == key:
                continue
            urgent = old is None or old[5:] != key[5:] or key[1] < old[1]
            due = now - self._last_line.get(run_id, -1e18) >= self._min_interval_s
            if force or urgent or due:
                self._shown[run_id] = key
                self._last_line[run_id] = now
                lines.append(self._run_line(run_id, run))
        collector = (int(status.get("unrecorded", 0)),
                     tuple(sorted((k, n) for k, n in (status.get("rejected") or {}).items() if n)),
                     status.get("recording_error"))
        if collector != self._collector_shown:
            urgent = collector[0] > self._collector_shown[0] or collector[2] is not None
            due = now - self._last_line.get("", -1e18) >= self._min_interval_s
            if force or urgent or due:
                self._collector_shown = collector
                self._last_line[""] = now
                rejected = " ".join(f"{k}={n}" for k, n in collector[1]) or "none"
                error = f" recording_error={collector[2]!r}" if collector[2] else ""
                lines.append(f"collector recorded={status.get('recorded', 0)} "
                             f"unrecorded={collector[0]} rejected: {rejected}{error}")
        if lines:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._stream.write("".join(f"{stamp} trainwatch {line}\n" for line in lines))
            self._stream.flush()

    @staticmethod
    def _run_line(run_id: str, run: dict[str, Any]) -> str:
        warnings = ",".join(run.get("active_warnings") or ()) or "none"
        return (f"run={_printable(run_id)} epoch={_epoch(run)} "
                f"ranks={run.get('ranks_connected', 0)}/{run.get('world_size', 0)} "
                f"msgs/s={run.get('msgs_per_s', 0.0):.1f} dropped={run.get('dropped', 0)} "
                f"rejected={run.get('rejected', 0)} warnings={warnings}"
                + (" finished" if run.get("finished") else ""))
