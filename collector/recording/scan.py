"""The recording's records in bulk, in numba: pack a batch of messages, scan a file.

Byte for byte the layout ``format`` documents; the CRC is zlib's CRC-32, so one record
reads the same whichever side wrote it. Packing a few thousand one-frame messages in one
call, and finding every record of a file in one pass, is what lets ingest and replay
keep up with the wire (a Python loop costs ~1 us a record before any work).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from collector.recording.format import BODY, HEAD, MARK, MESSAGE

__all__ = ["ScanResult", "crc32", "pack_messages", "scan_records"]

_MARK = np.frombuffer(MARK, np.uint8)
_HEAD_SIZE = HEAD.size  # MARK, body_len u32, crc u32
_BODY_HEAD = BODY.size  # type u8, n_frames u16
_ONE_HEAD = _BODY_HEAD + 4  # and the one frame's length


def _tables() -> np.ndarray:
    """Slicing-by-8 tables for the reflected CRC-32 polynomial (row 0: the classic table)."""
    t = np.zeros((8, 256), np.uint32)
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        t[0, i] = c
    for k in range(1, 8):
        for i in range(256):
            t[k, i] = (int(t[k - 1, i]) >> 8) ^ int(t[0, int(t[k - 1, i]) & 0xFF])
    return t


_CRC_TABLE = _tables()


@njit(cache=True, inline="always")
def _crc(t: np.ndarray, crc: np.uint32, buf: np.ndarray, o: int, n: int) -> np.uint32:
    ff = np.uint32(0xFF)
    while n >= 8:  # eight bytes a round: ~4x the byte-at-a-time loop
        one = crc ^ (np.uint32(buf[o]) | np.uint32(buf[o + 1]) << np.uint32(8)
                     | np.uint32(buf[o + 2]) << np.uint32(16)
                     | np.uint32(buf[o + 3]) << np.uint32(24))
        crc = (t[7, one & ff] ^ t[6, (one >> np.uint32(8)) & ff]
               ^ t[5, (one >> np.uint32(16)) & ff] ^ t[4, one >> np.uint32(24)]
               ^ t[3, buf[o + 4]] ^ t[2, buf[o + 5]] ^ t[1, buf[o + 6]] ^ t[0, buf[o + 7]])
        o += 8
        n -= 8
    for k in range(n):
        crc = t[0, (crc ^ buf[o + k]) & ff] ^ (crc >> np.uint32(8))
    return crc


@njit(cache=True)
def _crc32(table: np.ndarray, buf: np.ndarray, o: int, n: int) -> np.uint32:
    return _crc(table, np.uint32(0xFFFFFFFF), buf, o, n) ^ np.uint32(0xFFFFFFFF)


def crc32(data: bytes) -> int:
    """zlib.crc32, as the bulk paths compute it."""
    return int(_crc32(_CRC_TABLE, np.frombuffer(data, np.uint8), 0, len(data)))


@njit(cache=True, inline="always")
def _put(out: np.ndarray, o: int, v: int, n: int) -> None:
    for k in range(n):
        out[o + k] = (v >> (8 * k)) & 0xFF


@njit(cache=True)
def _pack(table, mark, buf, offs, lens):  # noqa: ANN001, ANN202 - numba
    total = 0
    for i in range(len(offs)):
        total += _HEAD_SIZE + _ONE_HEAD + lens[i]
    out = np.empty(total, np.uint8)
    p = 0
    for i in range(len(offs)):
        n = lens[i]
        out[p:p + 4] = mark
        _put(out, p + 4, _ONE_HEAD + n, 4)
        b = p + _HEAD_SIZE
        out[b] = MESSAGE
        _put(out, b + 1, 1, 2)
        _put(out, b + _BODY_HEAD, n, 4)
        out[b + _ONE_HEAD:b + _ONE_HEAD + n] = buf[offs[i]:offs[i] + n]
        _put(out, p + 8, _crc32(table, out, b, _ONE_HEAD + n), 4)
        p = b + _ONE_HEAD + n
    return out


def pack_messages(buf: np.ndarray, offs: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """MESSAGE records for one-frame messages ``buf[offs[i]:offs[i]+lens[i]]``, in order."""
    return _pack(_CRC_TABLE, _MARK, buf, offs, lens)


@njit(cache=True, inline="always")
def _resync(raw: np.ndarray, pos: int, mark: np.ndarray) -> int:
    end = len(raw) - 3
    while pos < end:
        if raw[pos] == mark[0] and raw[pos + 1] == mark[1] and raw[pos + 2] == mark[2] \
                and raw[pos + 3] == mark[3]:
            return pos
        pos += 1
    return len(raw)


@njit(cache=True, inline="always")
def _u32(raw: np.ndarray, o: int) -> int:
    return np.int64(raw[o]) | np.int64(raw[o + 1]) << 8 | np.int64(raw[o + 2]) << 16 \
        | np.int64(raw[o + 3]) << 24


@njit(cache=True)
def _scan(table, mark, raw, pos, limit):  # noqa: ANN001, ANN202 - numba
    """Up to ``limit`` whole, intact records from ``pos``. Returns the records' columns,
    where to go on, how many were corrupted, and the bytes of a cut-off tail (>= 0 ends)."""
    rtype = np.empty(limit, np.int64)
    body = np.empty(limit, np.int64)  # offset of the body
    blen = np.empty(limit, np.int64)
    nfr = np.empty(limit, np.int64)
    first = np.empty(limit, np.int64)  # offset of the first frame
    flen = np.empty(limit, np.int64)
    end = len(raw)
    corrupted = 0
    truncated = -1
    n = 0
    while pos < end and n < limit:
        if end - pos < _HEAD_SIZE:
            truncated = end - pos
            break
        ln = _u32(raw, pos + 4)
        start = pos + _HEAD_SIZE
        if raw[pos] != mark[0] or raw[pos + 1] != mark[1] or raw[pos + 2] != mark[2] \
                or raw[pos + 3] != mark[3] or ln < _BODY_HEAD:
            corrupted += 1
            pos = _resync(raw, pos + 1, mark)
            continue
        if start + ln > end:
            # The tail of a crash, or a corrupted length: resync tells them apart.
            nxt = _resync(raw, pos + 1, mark)
            if nxt >= end:
                truncated = end - pos
                break
            corrupted += 1
            pos = nxt
            continue
        if _crc32(table, raw, start, ln) != _u32(raw, pos + 8):
            corrupted += 1
            pos = _resync(raw, pos + 1, mark)
            continue
        k = np.int64(raw[start + 1]) | np.int64(raw[start + 2]) << 8
        off = _BODY_HEAD + 4 * k
        if off > ln:
            corrupted += 1
            pos = _resync(raw, pos + 1, mark)
            continue
        total = off
        for j in range(k):
            total += _u32(raw, start + _BODY_HEAD + 4 * j)
        pos = start + ln
        if total != ln:
            corrupted += 1
            continue
        rtype[n] = raw[start]
        body[n] = start
        blen[n] = ln
        nfr[n] = k
        first[n] = start + off
        flen[n] = _u32(raw, start + _BODY_HEAD) if k else 0
        n += 1
    if pos >= end and truncated < 0:
        truncated = 0
    return (rtype[:n], body[:n], blen[:n], nfr[:n], first[:n], flen[:n], pos, corrupted,
            truncated)


class ScanResult(NamedTuple):
    """Up to ``limit`` records' columns (offsets into the file's bytes), and where to go on."""

    rtype: np.ndarray
    body: np.ndarray  # offset of the body
    body_len: np.ndarray
    n_frames: np.ndarray
    first: np.ndarray  # offset of the first frame
    first_len: np.ndarray
    next_pos: int
    corrupted: int  # records skipped in this stretch
    truncated: int  # bytes of a cut-off tail; -1 while there is more to read


def scan_records(raw: np.ndarray, pos: int, limit: int = 65536) -> ScanResult:
    """Up to ``limit`` whole, intact records from byte ``pos`` (see ``ScanResult``)."""
    r = _scan(_CRC_TABLE, _MARK, raw, pos, limit)
    return ScanResult(*r[:6], int(r[6]), int(r[7]), int(r[8]))


def warm_up() -> None:
    """Compile (or load) for writable and read-only buffers (bytes off a socket or a file)."""
    buf = np.frombuffer(b"abc", np.uint8)
    z, three = np.zeros(1, np.int64), np.full(1, 3, np.int64)
    out = pack_messages(buf, z, three)
    pack_messages(out, z, three)
    scan_records(out, 0, 4)
    scan_records(np.frombuffer(out.tobytes(), np.uint8), 0, 4)
    crc32(b"abc")
