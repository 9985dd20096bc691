"""Reading a recording (see ``format``): every whole, intact record, in order.

    for rtype, frames in read_records("run.twrec"):
        ...
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from collector.recording.format import BODY, CONTROL, MAGIC, MESSAGE
from collector.recording.scan import ScanResult, scan_records

__all__ = ["ReadStats", "frames_of", "open_recording", "read_records", "scan"]


@dataclass
class ReadStats:
    """What reading found: whole records, skipped ones, and a cut-off tail."""

    records: int = 0
    corrupted: int = 0  # records skipped for a bad checksum or a bad length
    truncated_bytes: int = 0  # an incomplete last record (a crash mid-write)
    bad_controls: int = 0  # intact CONTROL records that fail the schema (``controls``)
    unknown_types: int = 0  # intact records of a type this version does not know

    @property
    def skipped(self) -> int:
        """Intact records skipped as invalid: counted apart from the corrupted ones."""
        return self.bad_controls + self.unknown_types

    def summary(self) -> str:
        """The counts as a phrase for the commands' one-line reports."""
        return (f"{self.records} records, {self.corrupted} corrupted, {self.truncated_bytes} "
                f"truncated bytes, {self.bad_controls} bad controls and {self.unknown_types} "
                "records of unknown type skipped")


def open_recording(path: str | Path, stats: ReadStats) -> np.ndarray | None:
    """The file's bytes after the magic, or None for a file cut before its first record."""
    raw = Path(path).read_bytes()
    if len(raw) < len(MAGIC) and MAGIC.startswith(raw):
        stats.truncated_bytes = len(raw)  # killed before the first record: empty, not junk
        return None
    if raw[:len(MAGIC)] != MAGIC:
        raise ValueError(f"{path} is not a trainwatch recording (bad magic)")
    return np.frombuffer(raw, np.uint8)


def scan(raw: np.ndarray, stats: ReadStats, chunk: int = 1 << 16) -> Iterator[ScanResult]:
    """The records' columns (``scan.scan_records``), ``chunk`` records at a time."""
    pos = len(MAGIC)
    while True:
        cols = scan_records(raw, pos, chunk)
        pos = cols.next_pos
        stats.records += len(cols.rtype)
        stats.corrupted += cols.corrupted
        stats.unknown_types += int(np.count_nonzero((cols.rtype != MESSAGE)
                                                    & (cols.rtype != CONTROL)))
        yield cols
        if cols.truncated >= 0:
            stats.truncated_bytes = cols.truncated
            return


def frames_of(raw: np.ndarray, body: int, n_frames: int, first: int) -> list[memoryview]:
    """One record's frames, as views into the file's bytes."""
    mv = memoryview(raw)
    lens = struct.unpack_from(f"<{n_frames}I", mv, body + BODY.size)
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
    for c in scan(raw, st):
        for i in range(len(c.rtype)):
            yield int(c.rtype[i]), frames_of(raw, int(c.body[i]), int(c.n_frames[i]),
                                             int(c.first[i]))
