"""Run ids with newlines, NUL, escape sequences or bidi overrides cannot forge or garble a
log line or the live board: real loggers, the real board, a real collector's log file."""

from __future__ import annotations

import io
import logging
import re
import time
import unicodedata

import harness
import hostile
import msgpack
import zmq
from hypothesis import given
from hypothesis import strategies as st

from collector.records import RAISED, EpochRecord, Event, SummaryRecord
from collector.report.liveview import PlainView, RichView
from collector.sinks.console import EventLogSink
from collector.text import SafeFormatter, printable
from trainer_client import wire

FORGED = hostile.FORGED_LINE
NASTY = hostile.HOSTILE_RUN_IDS
BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _visible(s: str) -> bool:
    return s.isprintable() and not BIDI & set(s)


def test_printable_escapes_what_is_not_visible_and_keeps_the_rest():
    for s in NASTY:
        out = printable(s)
        assert _visible(out), repr(out)
    assert printable("rtl\u202eexe.txt") == "rtl\\u202eexe.txt"
    assert printable("nul\x00") == "nul\\x00" and printable("a\\n") == "a\\\\n"
    for plain in ("gait-diffusion/run 7", "été_日本", "x" * 256):
        assert printable(plain) == plain


@given(st.text(max_size=30), st.text(max_size=30))
def test_printable_is_one_to_one_and_always_visible(a, b):
    assert _visible(printable(a))
    if a != b:
        assert printable(a) != printable(b)


def _epoch_record(run: str, message: str) -> EpochRecord:
    ev = Event("nonfinite", RAISED, "error", message, "remedy\nforged")
    return EpochRecord(run, 1, {}, (ev,), ("nonfinite",), (0,), ())


def test_event_lines_on_a_real_logger_stay_one_line_each(caplog):
    caplog.set_level(logging.INFO, "trainwatch.health")
    sink = EventLogSink()
    for run in NASTY:
        sink.write(_epoch_record(run, f"loss is nan in {run}"))
        sink.write(SummaryRecord(run, 1, {"summary/dropped": 0}, "finished"))
    assert len(caplog.records) == 2 * len(NASTY)
    for r in caplog.records:
        assert _visible(r.getMessage()), repr(r.getMessage())
    assert len(caplog.text.splitlines()) == len(caplog.records)
    assert "[victim]" in caplog.text  # still there, as text inside its own line
    assert all(not line.startswith("2026-01-01") for line in caplog.text.splitlines())


def test_the_formatter_escapes_what_a_call_site_forgot():
    stream = io.StringIO()
    h = logging.StreamHandler(stream)
    h.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tw-test-formatter")
    log.addHandler(h)
    log.propagate = False
    try:
        log.warning("internal error on run %s", "x" + FORGED)
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("with a traceback, run %s", "y\u202e")
    finally:
        log.removeHandler(h)
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("WARNING internal error on run x\\n2026") and len(lines[0]) > 60
    assert lines[1] == "ERROR with a traceback, run y\\u202e"
    assert lines[2] == "Traceback (most recent call last):"  # a traceback keeps its lines
    assert all(_visible(line) for line in lines)


def _status(runs: list[str]) -> dict:
    return {"uptime_s": 3.0, "recorded": 1, "unrecorded": 0, "rejected": {}, "runs": {
        r: {"epoch": 1, "ranks_connected": 1, "world_size": 1, "messages": 3,
            "msgs_per_s": 1.0, "dropped": 0, "rejected": 0, "finished": False}
        for r in runs}}


def test_the_live_board_shows_run_ids_escaped():
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=400, color_system=None).print(RichView.render(_status(NASTY)))
    text = out.getvalue()
    assert all(_visible(line) for line in text.splitlines())
    assert "rtl\\u202eexe.txt" in text and "nul\\x00byte" in text
    plain = io.StringIO()
    PlainView(plain).update(_status(NASTY))
    lines = plain.getvalue().splitlines()
    assert len(lines) == len(NASTY) and all(_visible(line) for line in lines)


# -- a real collector ------------------------------------------------------------------
def _frames(run: str, kind: int, seq: int, body: object, epoch: int = 0) -> list[bytes]:
    head = [wire.VERSION, kind, run, 0, 1, 5, seq, seq, epoch, 1.7e9, 0, body, []]
    return [msgpack.packb(head)]


def test_a_real_collector_logs_every_hostile_run_id_escaped(tmp_path):
    col = harness.CollectorProc(tmp_path, f"ipc://{tmp_path}/c.sock", "--once", "--quiet",
                                "1", view=True).start()
    out = tmp_path / "rank0.json"
    ranks = [harness.start_rank(col.endpoint, "beside", 0, 1, out, steps=90,
                                steps_per_epoch=30, val_every=0, step_sleep=0.02)]
    deadline = time.monotonic() + 90  # the run beside is live before the attack
    while not any(r["run"] == "beside" for r in col.records()) and time.monotonic() < deadline:
        time.sleep(0.05)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 5000)
    push.connect(col.endpoint)
    try:
        for run in NASTY:  # a NaN loss: an event line and a summary line per run
            for frames in (_frames(run, wire.KIND_HELLO, 0, {"host": "h\nforged"}),
                           _frames(run, wire.KIND_STEP, 1, [float("nan"), 1.0, [], []], 1),
                           _frames(run, wire.KIND_EPOCH, 2, {}, 1),
                           _frames(run, wire.KIND_BYE, 3, {}, 2)):
                push.send_multipart(frames)
    finally:
        push.close(linger=5000)
        ctx.term()
    try:
        assert harness.wait_all(ranks, 150) == [0]
        assert col.wait(60) == 0, col.log_text()[-3000:]
    finally:
        harness.reap(ranks)
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(,\d+)? trainwatch")
    for name, text in (("log", col.log_text()), ("board", col.out_text())):
        lines = text.splitlines()
        assert lines and all(stamp.match(line) for line in lines), (name, text[-2000:])
        assert all(_visible(line) for line in lines), name
        assert not any(line.startswith("2026-01-01") for line in lines)
    log = col.log_text()
    for run in NASTY:
        assert log.count(f"[{printable(run)}]") >= 2, run  # its event and its summary
    assert all(unicodedata.category(c) != "Cf" for c in log)
    info = harness.inspect(col.record)
    row = harness.losses_per_rank(info, "beside", {0: harness.read_json(out)})[0]
    assert row["lost_beyond_reported"] == 0 and row["gaps_minus_drops"] == 0
