"""The recording: the collector's durable, append-only log of what it accepted.

File layout: an 8-byte magic, then records::

    record := MARK(4) body_len(u32) crc32(u32) body
    body   := type(u8) n_frames(u16) frame_len(u32) * n_frames  frames...

``type`` is MESSAGE (the frames exactly as they came off the socket) or CONTROL (one
msgpack frame: a decision the live collector made from the clock, e.g. closing an epoch
after a timeout, so a replay makes the same decision). A record cut off by a crash ends
the readable part; a record whose checksum fails is skipped, counted, and reading
resumes at the next MARK. Reading scans the whole file in compiled code
(``recordscan``); ingest packs its one-frame messages there too, byte for byte alike.

    with RecordWriter("run.twrec") as w:
        w.append(MESSAGE, frames)
    for rtype, frames in read_records("run.twrec"):
        ...
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["CONTROL", "MESSAGE", "ReadStats", "RecordWriter", "read_records"]

MAGIC = b"TWREC\x01\n\x00"
MARK = b"\xa5TW\x5a"
MESSAGE = 0
CONTROL = 1
_HEAD = struct.Struct("<4sII")  # MARK, body_len, crc32
_BODY = struct.Struct("<BH")
_ONE = struct.Struct("<BHI")  # a one-frame body's head: type, 1, the frame's length
MAX_BODY = 1 << 31

_log = logging.getLogger("trainwatch.recording")


def pack_record(rtype: int, frames: Sequence[bytes | memoryview]) -> bytes:
    if len(frames) == 1:  # most messages: one struct call, one concatenation
        body = _ONE.pack(rtype, 1, len(frames[0])) + frames[0]
    else:
        lens = [len(f) for f in frames]
        body = b"".join([_BODY.pack(rtype, len(frames)), struct.pack(f"<{len(lens)}I", *lens),
                         *frames])
    return _HEAD.pack(MARK, len(body), zlib.crc32(body)) + body


class RecordWriter:
    """Appends records; ``flush()`` hands them to the OS (enough to survive SIGKILL).

    Write errors (disk full, unwritable) never raise into ingest: the writer logs once,
    counts every record it could not keep in ``unrecorded`` and retries on later flushes.
    """

    def __init__(self, path: str | Path, buffer_bytes: int = 1 << 20) -> None:
        self.path = Path(path)
        self.recorded = 0
        self.unrecorded = 0
        self.error: str | None = None
        self._buf: list[bytes] = []
        self._pending = 0  # records in _buf
        self._buf_bytes = 0
        self._limit = buffer_bytes
        self._fh = None
        self._open()

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fh = open(self.path, "ab")  # noqa: SIM115 - lives as long as the writer
            if fh.tell() == 0:
                fh.write(MAGIC)
                fh.flush()
            self._fh = fh
            self.error = None
        except OSError as exc:
            self._fail(exc)

    def append(self, rtype: int, frames: Sequence[bytes | memoryview]) -> None:
        rec = pack_record(rtype, frames)
        self._buf.append(rec)
        self._pending += 1
        self._buf_bytes += len(rec)
        if self._buf_bytes >= self._limit:
            self.flush()

    def append_packed(self, records: bytes | memoryview, count: int) -> None:
        """``count`` records already packed (``recordscan.pack_messages``), in order."""
        self._buf.append(records)
        self._pending += count
        self._buf_bytes += len(records)
        if self._buf_bytes >= self._limit:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        if self._fh is None:
            self._open()
        if self._fh is not None:
            try:
                self._fh.write(b"".join(self._buf))
                self._fh.flush()
                self.recorded += self._pending
            except OSError as exc:
                self._fail(exc)
                self._fh = None  # reopen later: a partial write leaves a cut record,
                # which readers skip by the next MARK
                self.unrecorded += self._pending
        else:
            self.unrecorded += self._pending
        self._buf.clear()
        self._pending = 0
        self._buf_bytes = 0

    def _fail(self, exc: OSError) -> None:
        msg = f"cannot write the recording {self.path}: {exc.strerror or exc}"
        if msg != self.error:
            _log.error("%s; ingest goes on, unrecorded messages are counted", msg)
        self.error = msg

    def close(self) -> None:
        self.flush()
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError as exc:
                self._fail(exc)
            self._fh = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ReadStats:
    records: int = 0
    corrupted: int = 0  # records skipped for a bad checksum or a bad length
    truncated_bytes: int = 0  # an incomplete last record (a crash mid-write)


def open_recording(path: str | Path, stats: ReadStats) -> np.ndarray | None:
    """The file's bytes after the magic, or None for a file cut before its first record."""
    raw = Path(path).read_bytes()
    if len(raw) < len(MAGIC) and MAGIC.startswith(raw):
        stats.truncated_bytes = len(raw)  # killed before the first record: empty, not junk
        return None
    if raw[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a trainwatch recording (bad magic)")
    return np.frombuffer(raw, np.uint8)


def scan(raw: np.ndarray, stats: ReadStats, chunk: int = 1 << 16) -> Iterator[tuple]:
    """The records' columns (``recordscan.scan_records``), ``chunk`` records at a time."""
    from .recordscan import scan_records  # here: recordscan takes the layout from this module

    pos = len(MAGIC)
    while True:
        cols = scan_records(raw, pos, chunk)
        pos, corrupted, truncated = cols[6], cols[7], cols[8]
        stats.records += len(cols[0])
        stats.corrupted += corrupted
        yield cols
        if truncated >= 0:
            stats.truncated_bytes = truncated
            return


def frames_of(raw: np.ndarray, body: int, n_frames: int, first: int) -> list[memoryview]:
    """One record's frames, as views into the file's bytes."""
    mv = memoryview(raw)
    lens = struct.unpack_from(f"<{n_frames}I", mv, body + _BODY.size)
    out = []
    for ln in lens:
        out.append(mv[first:first + ln])
        first += ln
    return out


def read_records(path: str | Path, stats: ReadStats | None = None
                 ) -> Iterator[tuple[int, list[memoryview]]]:
    """Yield (type, frames) for every whole, intact record, in order."""
    st = stats if stats is not None else ReadStats()
    raw = open_recording(path, st)
    if raw is None:
        return
    for rtype, body, _, nfr, first, _, *_ in scan(raw, st):
        for i in range(len(rtype)):
            yield int(rtype[i]), frames_of(raw, int(body[i]), int(nfr[i]), int(first[i]))
