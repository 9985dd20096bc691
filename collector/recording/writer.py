"""Appending to a recording (see ``format``); what ingest writes before it applies.

    with RecordWriter("run.twrec") as w:
        w.append(MESSAGE, frames)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from collector.recording.format import MAGIC, pack_record
from collector.recording.scan import pack_messages

__all__ = ["NullRecorder", "RecordWriter", "Recorder"]

_log = logging.getLogger("trainwatch.recording")


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

    def append_messages(self, buf: np.ndarray, offs: np.ndarray, lens: np.ndarray) -> None:
        """One-frame messages ``buf[offs[i]:offs[i]+lens[i]]``, packed in one compiled pass
        (byte for byte what ``append`` writes)."""
        packed = pack_messages(buf, offs, lens)
        self._buf.append(packed)
        self._pending += len(offs)
        self._buf_bytes += len(packed)
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


class NullRecorder:
    """A recorder that records nothing: replay, report and rebuild run without one, and
    callers never ask whether recording is on."""

    path: Path | None = None
    recorded = 0
    unrecorded = 0
    error: str | None = None

    def append(self, rtype: int, frames: Sequence[bytes | memoryview]) -> None:
        pass

    def append_messages(self, buf: np.ndarray, offs: np.ndarray, lens: np.ndarray) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


Recorder = RecordWriter | NullRecorder
