"""The recording: append-only, checksummed, readable after a crash and around damage."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.recording.format import CONTROL, MESSAGE
from collector.recording.reader import ReadStats, read_records
from collector.recording.writer import RecordWriter


def _write(path: Path, n: int) -> list[list[bytes]]:
    msgs = [[f"head{i}".encode(), bytes([i % 256]) * (i * 7)] for i in range(n)]
    with RecordWriter(path) as w:
        for m in msgs:
            w.append(MESSAGE, m)
        w.append(CONTROL, [b"ctl"])
    return msgs


def test_round_trip_and_append_across_sessions(tmp_path):
    p = tmp_path / "r.twrec"
    msgs = _write(p, 50)
    with RecordWriter(p) as w:  # a second session appends
        w.append(MESSAGE, [b"later"])
    got = list(read_records(p))
    assert [[bytes(f) for f in fr] for t, fr in got if t == MESSAGE] == msgs + [[b"later"]]
    assert [t for t, _ in got].count(CONTROL) == 1


def test_truncated_tail_reads_to_the_last_whole_record(tmp_path):
    p = tmp_path / "r.twrec"
    _write(p, 20)
    data = p.read_bytes()
    for cut in (1, 5, 13, 21):  # the last record (a control) is 22 bytes long
        q = tmp_path / f"cut{cut}.twrec"
        q.write_bytes(data[:-cut])
        st = ReadStats()
        got = list(read_records(q, st))
        assert len(got) == 20  # the control record (last) is cut off
        assert st.truncated_bytes > 0 and st.corrupted == 0


def test_corrupted_record_is_skipped_and_counted(tmp_path):
    p = tmp_path / "r.twrec"
    msgs = _write(p, 10)
    data = bytearray(p.read_bytes())
    i = data.index(b"head4")
    data[i] ^= 0xFF  # flip a byte inside record 4's body
    p.write_bytes(bytes(data))
    st = ReadStats()
    got = [[bytes(f) for f in fr] for t, fr in read_records(p, st) if t == MESSAGE]
    assert st.corrupted == 1
    assert got == msgs[:4] + msgs[5:]


def test_corrupted_length_resyncs_on_the_next_mark(tmp_path):
    p = tmp_path / "r.twrec"
    msgs = _write(p, 10)
    data = bytearray(p.read_bytes())
    i = data.index(b"head2") - 7 - 8  # into record 2's length field
    data[i + 4:i + 8] = b"\xff\xff\xff\x7f"
    p.write_bytes(bytes(data))
    st = ReadStats()
    got = [[bytes(f) for f in fr] for t, fr in read_records(p, st) if t == MESSAGE]
    assert st.corrupted >= 1
    assert msgs[3:] == got[-7:]


def test_not_a_recording(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not a trainwatch recording"):
        list(read_records(p))


def test_disk_full_counts_instead_of_raising():
    w = RecordWriter("/dev/full")  # every write fails with ENOSPC, as on a full disk
    for _ in range(3):
        w.append(MESSAGE, [b"x"])
        w.flush()  # never raises into ingest
    assert w.unrecorded == 3 and w.recorded == 0
    assert "No space left" in w.error


def test_unwritable_path_counts_instead_of_raising(tmp_path):
    w = RecordWriter(tmp_path)  # a directory: cannot be opened for appending
    w.append(MESSAGE, [b"x"])
    w.flush()
    assert w.unrecorded == 1 and "cannot write the recording" in w.error
