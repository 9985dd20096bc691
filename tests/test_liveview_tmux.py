"""The live board on a real terminal: a real collector in tmux, two real training runs that
raise health warnings; the warnings scroll above a board that stays whole.

``tmux capture-pane`` reads what the terminal shows (with its scrollback), so a log line
written into the board, or a board fragment left behind by one, is seen as a person would.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, env, finish, start_trainer

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux on PATH")

RUNS = ("board-a", "board-b")
HEADER = "trainwatch collector  up "


class Pane:
    """A tmux server of this test's own (its own socket) with one 160x50 pane."""

    def __init__(self, tmp: Path, command: str) -> None:
        self.socket = tmp / "tmux.sock"
        self._tmux("new-session", "-d", "-s", "board", "-x", "160", "-y", "50", command)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", str(self.socket), *args], check=True,
                              capture_output=True, text=True, timeout=30).stdout

    def text(self) -> str:
        """Everything the pane shows and scrolled past, trailing blank lines dropped."""
        return self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "board").rstrip("\n")

    def steady(self, timeout_s: float = 20.0) -> str:
        """A capture that two reads in a row agree on (not one taken mid-redraw)."""
        deadline = time.monotonic() + timeout_s
        last = self.text()
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.text()
            if now == last:
                return now
            last = now
        raise AssertionError("the pane never held still:\n" + last)

    def wait_for(self, ok, what: str, timeout_s: float = 180.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            text = self.text()
            if ok(text):
                return self.steady()
            time.sleep(0.2)
        raise AssertionError(f"{what} never showed:\n{self.text()}")

    def close(self) -> None:
        subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True,
                       timeout=30)


def _board(text: str) -> tuple[int, list[str]]:
    """The board's first line and its lines; asserts there is one, whole."""
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith(HEADER)]
    assert len(heads) == 1, f"{len(heads)} board headers:\n{text}"
    h = heads[0]
    assert lines[h + 1].startswith("┏") and lines[h + 2].startswith("┃ run")
    assert lines[h + 3].startswith("┡")
    end = next(i for i in range(h + 4, len(lines)) if not lines[i].startswith("│"))
    rows = lines[h + 4:end]  # a row may take two lines when a cell wraps
    assert [r.split("│")[1].strip() for r in rows if r.split("│")[1].strip()] == list(RUNS)
    assert lines[end].startswith("└") and lines[end + 1].startswith("rejected: "), text
    for mark in ("┏", "┡", "└", "┃ run", "rejected: "):  # no fragment of another board
        assert sum(line.startswith(mark) for line in lines) == 1, (mark, text)
    return h, lines[h:end + 2]


def _warned(text: str, rule: str) -> bool:
    return all(any("WARNING" in line and f"[{run}]" in line and rule in line
                   for line in text.splitlines()) for run in RUNS)


def test_warnings_scroll_above_a_board_that_stays_whole(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/c.sock"
    collect = [sys.executable, "-m", "collector", "collect", "--bind", endpoint, "--record",
               str(tmp_path / "c.twrec"), "--wandb-mode", "disabled", "--once", "--quiet", "3"]
    child = env()
    # the pane's own size, not a width inherited from the test's environment
    command = (f"cd {shlex.quote(str(tmp_path))} && env -u COLUMNS -u LINES PYTHONPATH="
               f"{shlex.quote(child['PYTHONPATH'])} PYTHONUNBUFFERED=1 WANDB_SILENT=true "
               f"{shlex.join(collect)}; echo COLLECTOR-EXITED $?; sleep 600")
    pane = Pane(tmp_path, command)
    try:
        pane.wait_for(lambda t: "collecting on" in t, "the collector starting", timeout_s=90)
        trainers = [start_trainer(endpoint, run, 0, 1, tmp_path / f"{run}.json",
                                  validate=True, epochs=6, steps=10, step_sleep=0.05)
                    for run in RUNS]
        # Both runs raise grf_collapsed (their samples barely spread) at the first epoch.
        during = pane.wait_for(lambda t: _warned(t, "grf_collapsed") and
                               all(f"│ {run}" in t for run in RUNS), "warnings of both runs")
        finish(trainers)
        after = pane.wait_for(lambda t: "COLLECTOR-EXITED" in t, "the collector exiting")
        assert "COLLECTOR-EXITED 0" in after
        for text in (during, after):
            h, board = _board(text)
            above = text.splitlines()[:h]
            warnings = [line for line in text.splitlines() if "trainwatch.health" in line]
            assert warnings and all(line in above for line in warnings), text
            assert not any("trainwatch." in line for line in board)  # no log line inside
        rows = [line for line in _board(after)[1] if line.startswith("│ board-")]
        assert len(rows) == 2 and all("grf_collaps" in row for row in rows)  # as logged
        assert _warned(after, "loss_term_dominant")  # raised later, still above the board
    finally:
        pane.close()


def test_off_a_terminal_the_log_stays_plain(tmp_path: Path) -> None:
    # The same command with its output in a file: plain log lines, no board, no rich markup.
    log = tmp_path / "c.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "collector", "collect", "--bind",
                                 f"ipc://{tmp_path}/c.sock", "--wandb-mode", "disabled",
                                 "--once", "--quiet", "1"], stdout=fh, stderr=subprocess.STDOUT,
                                env=env(), cwd=ROOT)
        try:
            trainer = start_trainer(f"ipc://{tmp_path}/c.sock", "plain", 0, 1,
                                    tmp_path / "t.json", validate=True, epochs=2, steps=5)
            finish([trainer])
            assert proc.wait(120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    text = log.read_text()
    assert HEADER not in text and "┏" not in text and "\x1b[" not in text
    warning = next(line for line in text.splitlines() if "grf_collapsed" in line)
    assert " trainwatch.health WARNING [plain] epoch 1 grf_collapsed" in warning
