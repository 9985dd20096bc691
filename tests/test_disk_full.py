"""A disk that fills mid-run, for real: a small tmpfs (or, where mounting is not allowed,
a file size limit the kernel enforces). The log says so once per change of state, and
the accounting is exact: what the file reads back is what was counted written, and
written + unrecorded is everything appended."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import harness
import numpy as np
import pytest
from conftest import env  # noqa: F401 - the repository on the children's path

from collector.recording.format import CONTROL, MESSAGE
from collector.recording.reader import ReadStats, read_records
from collector.recording.writer import RecordWriter

MiB = 1 << 20


def _payload(i: int, size: int) -> bytes:
    return i.to_bytes(4, "little") * (size // 4)


def _read_back(path: Path) -> tuple[list[int], ReadStats]:
    st = ReadStats()
    ids = [int.from_bytes(bytes(fr[0][:4]), "little") for _, fr in read_records(path, st)]
    return ids, st


def test_the_writer_on_a_disk_that_fills_and_frees(tmp_path, caplog):
    with harness.small_disk(tmp_path / "disk", MiB) as disk:
        if disk is None:
            pytest.skip("mounting a tmpfs needs root (the collector test below falls back)")
        filler = harness.fill(disk, 100_000)  # room for 1.6 flushes: the second is cut short
        w = RecordWriter(disk / "r.twrec")
        caplog.set_level(logging.INFO, "trainwatch.recording")
        cut_flushes = 0
        i = 0
        for round_ in range(30):
            if round_ == 20:
                filler.unlink()  # room again: the next flush writes
            before = (w.recorded, w.unrecorded)
            for _ in range(5):  # ~60 KB a flush: single records and a packed batch
                w.append(MESSAGE if i % 7 else CONTROL, [_payload(i, 4000 + 36 * (i % 5))])
                i += 1
            lens = np.array([1000 + 12 * k for k in range(40)], np.int64)
            buf = np.frombuffer(b"".join(_payload(i + k, int(n)) for k, n in enumerate(lens)),
                                np.uint8)
            offs = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
            w.append_messages(buf, offs, lens)
            i += len(lens)
            w.flush()
            wrote, lost = w.recorded - before[0], w.unrecorded - before[1]
            cut_flushes += wrote > 0 and lost > 0
        w.close()
        ids, st = _read_back(disk / "r.twrec")
    assert w.appended == i == w.recorded + w.unrecorded
    assert w.unrecorded > 0 and cut_flushes >= 1  # a write the disk cut short, kept in part
    assert len(ids) == w.recorded and ids == sorted(set(ids))  # exactly, in order, no repeat
    assert st.corrupted == 0 and st.truncated_bytes == 0  # the cut record was trimmed off
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    again = [r for r in caplog.records if "writes again" in r.getMessage()]
    assert len(errors) == 1 and len(again) == 1, [r.getMessage() for r in caplog.records]
    assert "No space left on device" in errors[0].getMessage()
    assert re.search(r"written \d+, unrecorded \d+", errors[0].getMessage())
    assert "unrecorded 0" not in again[0].getMessage()


def test_a_nearly_full_disk_that_takes_small_writes_is_two_lines_not_a_flood(tmp_path, caplog):
    with harness.small_disk(tmp_path / "disk", MiB) as disk:
        if disk is None:
            pytest.skip("mounting a tmpfs needs root")
        harness.fill(disk, 16_384)
        w = RecordWriter(disk / "r.twrec")
        caplog.set_level(logging.INFO, "trainwatch.recording")
        for i in range(41):  # small records that fit, between big ones that never do
            w.append(MESSAGE, [_payload(i, 64_000 if i % 2 else 40)])
            w.flush()
        assert w.error is not None  # still failing now and then: not over yet
        w.close()
        ids, st = _read_back(disk / "r.twrec")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "No space left" in lines[0] and "writes again after 20 failed flushes" in lines[1]
    assert w.recorded == 21 == len(ids) and w.unrecorded == 20 and st.corrupted == 0


def test_a_collector_whose_disk_fills_mid_run(tmp_path):
    disk_cm = harness.small_disk(tmp_path / "disk", MiB)
    disk = disk_cm.__enter__()
    try:
        _collector_on_a_filling_disk(tmp_path, disk)
    finally:
        disk_cm.__exit__(None, None, None)


def _collector_on_a_filling_disk(tmp_path: Path, disk: Path | None) -> None:
    run = harness.disk_fill_run(tmp_path, disk)
    col, rec, outs, codes, col_code = run.col, run.rec, run.outs, run.codes, run.col_code
    filler, full_mid_run = disk, run.full_mid_run  # with a mount, the disk was freed again
    log = col.log_text()
    assert codes == [0, 0] and col_code == 0, log[-3000:]
    assert full_mid_run, "the run ended before the disk filled"
    written, unrecorded, appended = map(int, re.findall(
        r"closed: (\d+) records written, unrecorded (\d+) \(of (\d+)\)", log)[-1])
    assert written + unrecorded == appended and unrecorded > 0
    # one line per change of state, not one per flush
    assert log.count("trainwatch.recording ERROR cannot write the recording") == 1, log
    # (a size limit takes the last small records that fit: it may end in a good flush)
    assert log.count("writes again") == 1 if filler is not None else \
        log.count("writes again") <= 1, log
    info = harness.inspect(rec)
    on_disk = sum(c["messages"] for c in info["runs"]["fills"]["ranks"].values())
    # one control in this run: the limits the collector records when it starts
    assert info["records"] == written and on_disk == written - 1
    assert info["corrupted"] == 0 and info["truncated_bytes"] == 0
    sent = sum(json.loads(o.read_text())["stats"]["sent"] for o in outs.values())
    dropped = sum(json.loads(o.read_text())["stats"]["dropped"] for o in outs.values())
    assert appended == sent + 1  # every message the ranks sent was accepted, and the limits
    recs = col.records()  # ingest and the rules went on: the JSONL is whole
    assert [r["epoch"] for r in recs if r["type"] == "epoch"] == list(range(1, 13))
    summary = recs[-1]
    assert summary["type"] == "summary"
    assert summary["metrics"]["summary/seq_gaps"] == dropped == 0


def test_a_cut_record_the_writer_could_not_trim_is_skipped_by_readers(tmp_path):
    """Trimming is the first line; if it fails too, the reader's resync is the second."""
    from collector.recording.format import MAGIC, pack_record

    recs = [pack_record(MESSAGE, [_payload(i, 400 + 40 * i)]) for i in range(6)]
    for cut in (13, len(recs[2]) // 2, len(recs[2]) - 1):  # in the head, the body, the end
        path = tmp_path / f"cut{cut}.twrec"
        path.write_bytes(MAGIC + recs[0] + recs[1] + recs[2][:cut] + b"".join(recs[3:]))
        ids, st = _read_back(path)
        assert ids == [0, 1, 3, 4, 5] and st.corrupted == 1, (cut, ids, st)
