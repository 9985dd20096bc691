"""The recording: the collector's durable, append-only log of what it accepted.

File layout: an 8-byte magic, then records::

    record := MARK(4) body_len(u32) crc32(u32) body
    body   := type(u8) n_frames(u16) frame_len(u32) * n_frames  frames...

``type`` is MESSAGE (the frames exactly as they came off the socket) or CONTROL (one
msgpack frame: a decision the live collector made from the clock, e.g. closing an epoch
after a timeout, so a replay makes the same decision). A record cut off by a crash ends
the readable part; a record whose checksum fails is skipped, counted, and reading
resumes at the next MARK.

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

__all__ = ["CONTROL", "MESSAGE", "ReadStats", "RecordWriter", "read_records"]

MAGIC = b"TWREC\x01\n\x00"
MARK = b"\xa5TW\x5a"
MESSAGE = 0
CONTROL = 1
_HEAD = struct.Struct("<4sII")  # MARK, body_len, crc32
_BODY = struct.Struct("<BH")
_LEN = struct.Struct("<I")
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


def read_records(path: str | Path, stats: ReadStats | None = None
                 ) -> Iterator[tuple[int, list[memoryview]]]:
    """Yield (type, frames) for every whole, intact record, in order."""
    st = stats if stats is not None else ReadStats()
    raw = Path(path).read_bytes()
    data = memoryview(raw)
    if len(raw) < len(MAGIC) and MAGIC.startswith(raw):
        st.truncated_bytes = len(raw)  # killed before the first record: empty, not junk
        return
    if bytes(data[:len(MAGIC)]) != MAGIC:
        raise ValueError(f"{path} is not a trainwatch recording (bad magic)")
    pos, end = len(MAGIC), len(data)
    unpack_head, unpack_body, crc32 = _HEAD.unpack_from, _BODY.unpack_from, zlib.crc32
    unpack_len = _LEN.unpack_from
    while pos < end:
        if end - pos < _HEAD.size:
            st.truncated_bytes = end - pos
            return
        mark, blen, crc = unpack_head(data, pos)
        start = pos + _HEAD.size
        if mark != MARK or blen < _BODY.size:
            st.corrupted += 1
            pos = _resync(raw, pos + 1)
            continue
        if start + blen > end:
            # Either the tail of a crash or a corrupted length: resync tells them apart.
            nxt = _resync(raw, pos + 1)
            if nxt >= end:
                st.truncated_bytes = end - pos
                return
            st.corrupted += 1
            pos = nxt
            continue
        body = data[start:start + blen]
        if crc32(body) != crc:
            st.corrupted += 1
            pos = _resync(raw, pos + 1)
            continue
        rtype, n = unpack_body(body, 0)
        off = _BODY.size + 4 * n
        if off > blen:
            st.corrupted += 1
            pos = _resync(raw, pos + 1)
            continue
        if n == 1:  # most messages: one header frame
            frames = [body[off:]]
            off = blen if unpack_len(body, _BODY.size)[0] == blen - off else -1
        else:
            frames = []
            for ln in struct.unpack_from(f"<{n}I", body, _BODY.size):
                frames.append(body[off:off + ln])
                off += ln
        pos = start + blen
        if off != blen:
            st.corrupted += 1
            continue
        st.records += 1
        yield rtype, frames


def _resync(raw: bytes, pos: int) -> int:
    i = raw.find(MARK, pos)
    return len(raw) if i < 0 else i
