"""The collector's live status: change-only log lines off a terminal, a rich board on one."""

from __future__ import annotations

import io
import os
import re
import select

from rich.console import Console

from collector.report.liveview import (
    PlainView,
    RichView,
    board_console,
    board_log_handler,
    make_view,
)

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _status(epoch: int | None = 3, warnings: tuple[str, ...] = (), dropped: int = 0,
            connected: int = 4, rejected: dict[str, int] | None = None) -> dict:
    return {
        "uptime_s": 12.5, "recorded": 120, "unrecorded": 0, "rejected": rejected or {},
        "runs": {"gait-lr4e-4": {
            "epoch": epoch, "ranks_connected": connected, "world_size": 4, "messages": 480,
            "msgs_per_s": 38.4, "dropped": dropped, "rejected": 0,
            "active_warnings": list(warnings)}},
    }


class Clock:
    """A settable time source, so the rate limit is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_plain_view_writes_on_changes_and_not_on_identical_updates() -> None:
    buf, clock = io.StringIO(), Clock()
    view = PlainView(buf, min_interval_s=0.0, clock=clock)
    view.update(_status())
    assert len(_lines(buf)) == 1
    assert "run=gait-lr4e-4 epoch=3 ranks=4/4" in _lines(buf)[0]
    for _ in range(5):
        clock.now += 1.0
        view.update(_status())  # msgs/s and uptime move every tick; nothing shown changed
    assert len(_lines(buf)) == 1
    view.update(_status(epoch=4))
    view.update(_status(epoch=4, dropped=7))
    view.update(_status(epoch=4, dropped=7, warnings=("mode_collapse",)))
    lines = _lines(buf)
    assert len(lines) == 4
    assert "epoch=4" in lines[1] and "dropped=7" in lines[2]
    assert "warnings=mode_collapse" in lines[3]
    view.close()
    assert len(_lines(buf)) == 4


def test_plain_view_rate_limits_epochs_but_not_warnings() -> None:
    buf, clock = io.StringIO(), Clock()
    view = PlainView(buf, min_interval_s=10.0, clock=clock)
    view.update(_status(epoch=1))
    for epoch in range(2, 6):  # fast epochs inside one interval coalesce
        clock.now += 1.0
        view.update(_status(epoch=epoch))
    assert len(_lines(buf)) == 1
    view.update(_status(epoch=5, warnings=("vanishing_gradients",)))  # urgent: at once
    assert "epoch=5" in _lines(buf)[-1] and "vanishing_gradients" in _lines(buf)[-1]
    clock.now += 1.0
    view.update(_status(epoch=6, warnings=("vanishing_gradients",)))
    assert len(_lines(buf)) == 2
    clock.now += 10.0
    view.update(_status(epoch=7, warnings=("vanishing_gradients",)))
    assert len(_lines(buf)) == 3 and "epoch=7" in _lines(buf)[-1]
    clock.now += 1.0
    view.update(_status(epoch=8, warnings=("vanishing_gradients",)))
    view.close()  # the coalesced state is written on close
    assert len(_lines(buf)) == 4 and "epoch=8" in _lines(buf)[-1]


def test_plain_view_reports_rejects_and_a_lost_rank() -> None:
    buf = io.StringIO()
    view = PlainView(buf, min_interval_s=60.0, clock=Clock())
    view.update(_status())
    view.update(_status(connected=3, rejected={"bad_checksum": 2, "unknown_version": 0}))
    lines = _lines(buf)
    assert any("ranks=3/4" in line for line in lines)
    assert any("collector" in line and "bad_checksum=2" in line for line in lines)
    assert not any("unknown_version" in line for line in lines)


def test_recording_failure_and_a_finished_run_are_shown() -> None:
    buf = io.StringIO()
    view = PlainView(buf, min_interval_s=60.0, clock=Clock())
    view.update(_status())
    done = _status()
    done["runs"]["gait-lr4e-4"]["finished"] = True
    done["recording_error"] = "No space left on device"
    view.update(done)
    assert "finished" in _lines(buf)[-2] and "No space left" in _lines(buf)[-1]
    board = io.StringIO()
    rich_view = RichView(Console(file=board, force_terminal=True, width=160))
    rich_view.update(done)
    rich_view.close()
    text = ANSI.sub("", board.getvalue())
    assert "recording failed: No space left on device" in text and "3 done" in text


def test_plain_view_quotes_a_run_id_that_could_forge_a_line() -> None:
    buf = io.StringIO()
    status = _status()
    status["runs"] = {"evil\nrun=x": status["runs"]["gait-lr4e-4"]}
    PlainView(buf, min_interval_s=0.0).update(status)
    assert len(_lines(buf)) == 1 and "'evil\\nrun=x'" in buf.getvalue()


def test_rich_view_shows_the_run_and_its_warning() -> None:
    buf = io.StringIO()
    view = RichView(Console(file=buf, force_terminal=True, width=140))
    view.update(_status(epoch=17, warnings=("mode_collapse",), dropped=5,
                        rejected={"bad_checksum": 2}))
    view.close()
    out = buf.getvalue()
    assert "\x1b[" in out  # drawn as a live terminal board, with colour
    text = ANSI.sub("", out)
    row = next(line for line in text.splitlines() if "gait-lr4e-4" in line)
    assert "17" in row and "4/4" in row and "38.4" in row and "mode_collapse" in row
    assert "bad_checksum 2" in text
    # The warning is coloured red.
    assert re.search(r"\x1b\[[0-9;]*31m[^\x1b]*mode_collapse", out)


def test_rich_view_before_any_run_connects() -> None:
    buf = io.StringIO()
    view = RichView(Console(file=buf, force_terminal=True, width=120))
    view.update({"uptime_s": 0.5, "recorded": 0, "unrecorded": 0, "rejected": {}, "runs": {}})
    view.close()
    view.close()
    assert "waiting for ranks" in ANSI.sub("", buf.getvalue())


def test_make_view_picks_by_terminal() -> None:
    assert isinstance(make_view(io.StringIO()), PlainView)
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w", closefd=True) as tty:
            view = make_view(tty)
            assert isinstance(view, RichView)
            view.update(_status())
            view.close()
        drawn = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the slave side is closed: all read
                break
            if not chunk:
                break
            drawn += chunk
        assert b"gait-lr4e-4" in drawn
    finally:
        os.close(master)


def test_log_records_go_through_the_board_console_above_the_board() -> None:
    import logging

    assert board_console(io.StringIO()) is None  # no terminal: no board, plain logging
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=140)
    view = make_view(io.StringIO(), console)  # the console given is the one drawn with
    assert isinstance(view, RichView)
    log = logging.getLogger("trainwatch.test-board")
    handler = board_log_handler(console)
    log.addHandler(handler)
    log.propagate = False
    try:
        view.update(_status())
        log.warning("[gait-lr4e-4] epoch 3 mode_collapse: samples collapsed")
        view.update(_status(warnings=("mode_collapse",)))
        view.close()
    finally:
        log.removeHandler(handler)
        log.propagate = True
    text = ANSI.sub("", buf.getvalue())
    at = text.index("mode_collapse: samples collapsed")
    # the board is drawn again after the line, below it (rich moves up over the old one)
    assert text.rindex("trainwatch collector") > at
    assert "WARNING" in text[:at + 60]
