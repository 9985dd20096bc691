"""The recording's format: the collector's durable, append-only log of what it accepted.

File layout: an 8-byte magic, then records::

    record := MARK(4) body_len(u32) crc32(u32) body
    body   := type(u8) n_frames(u16) frame_len(u32) * n_frames  frames...

``type`` is MESSAGE (the frames exactly as they came off the socket) or CONTROL (one
msgpack frame: a decision the live collector made from the clock, e.g. closing an epoch
after a timeout, so a replay makes the same decision). A record cut off by a crash ends
the readable part; a record whose checksum fails is skipped, counted, and reading
resumes at the next MARK. ``scan`` reads a whole file in compiled code, and ingest packs
its one-frame messages there too, byte for byte alike.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

__all__ = ["BODY", "CONTROL", "HEAD", "MAGIC", "MARK", "MAX_BODY", "MESSAGE", "ONE",
           "pack_record"]

MAGIC = b"TWREC\x01\n\x00"
MARK = b"\xa5TW\x5a"
MESSAGE = 0
CONTROL = 1
HEAD = struct.Struct("<4sII")  # MARK, body_len, crc32
BODY = struct.Struct("<BH")  # type, n_frames (then n_frames u32 lengths)
ONE = struct.Struct("<BHI")  # a one-frame body's head: type, 1, the frame's length
MAX_BODY = 1 << 31


def pack_record(rtype: int, frames: Sequence[bytes | memoryview]) -> bytes:
    """One record, as ``RecordWriter`` writes it and ``scan.pack_messages`` packs it."""
    if len(frames) == 1:  # most messages: one struct call, one concatenation
        body = ONE.pack(rtype, 1, len(frames[0])) + frames[0]
    else:
        lens = [len(f) for f in frames]
        body = b"".join([BODY.pack(rtype, len(frames)), struct.pack(f"<{len(lens)}I", *lens),
                         *frames])
    return HEAD.pack(MARK, len(body), zlib.crc32(body)) + body
