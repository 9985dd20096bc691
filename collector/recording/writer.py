"""Appending to a recording (see ``format``); what ingest writes before it applies.

    with RecordWriter("run.twrec") as w:
        w.append(MESSAGE, frames)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from collector.recording.format import HEAD, MAGIC, ONE, pack_record
from collector.recording.scan import pack_messages

__all__ = ["NullRecorder", "RecordWriter", "Recorder"]

_log = logging.getLogger("trainwatch.recording")
_ONE_RECORD = HEAD.size + ONE.size  # the bytes of a one-frame record beside its frame


class RecordWriter:
    """Appends records; ``flush()`` hands them to the OS (enough to survive SIGKILL).

    Write errors (disk full, unwritable) never raise into ingest, and the accounting stays
    exact: once flushed, every appended record is either ``recorded`` (all its bytes
    reached the file) or ``unrecorded``, so ``appended == recorded + unrecorded``. A write
    cut short keeps the whole records it carried; the cut one is trimmed off the file (if
    trimming fails too, readers skip it at the next MARK). The log gets one line per change
    of state, with the counts: the first failure, a different failure, writing again.
    Later flushes keep trying, so a freed disk is used again at once. A nearly full disk
    takes small writes and refuses big ones: the failure ends (and is logged as ended)
    only after ``settle_s`` without one, or at ``close`` after a good flush, so a flapping
    disk costs two lines, not two per flush.
    """

    def __init__(self, path: str | Path, buffer_bytes: int = 1 << 20,
                 settle_s: float = 10.0) -> None:
        self.path = Path(path)
        self.appended = 0
        self.recorded = 0
        self.unrecorded = 0
        self.error: str | None = None
        self.failed_flushes = 0  # since the error began
        self.settle_s = settle_s
        self._failed_at = 0.0  # monotonic time of the last failed flush
        self._last_ok = True
        self._chunks: list[bytes | np.ndarray] = []
        self._sizes: list[int | np.ndarray] = []  # per chunk: its record's or records' sizes
        self._pending = 0  # records in _chunks
        self._buf_bytes = 0
        self._limit = buffer_bytes
        self._fd: int | None = None
        self._magic_ok = False
        self._state(self._ready())  # a bad path shows at once (and is retried on flushes)

    def append(self, rtype: int, frames: Sequence[bytes | memoryview]) -> None:
        rec = pack_record(rtype, frames)
        self._chunks.append(rec)
        self._sizes.append(len(rec))
        self._pending += 1
        self.appended += 1
        self._buf_bytes += len(rec)
        if self._buf_bytes >= self._limit:
            self.flush()

    def append_messages(self, buf: np.ndarray, offs: np.ndarray, lens: np.ndarray) -> None:
        """One-frame messages ``buf[offs[i]:offs[i]+lens[i]]``, packed in one compiled pass
        (byte for byte what ``append`` writes)."""
        packed = pack_messages(buf, offs, lens)
        self._chunks.append(packed)
        self._sizes.append(np.asarray(lens, np.int64) + _ONE_RECORD)
        self._pending += len(offs)
        self.appended += len(offs)
        self._buf_bytes += len(packed)
        if self._buf_bytes >= self._limit:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = memoryview(b"".join(self._chunks))
        ends = _record_ends(self._sizes)
        n = self._pending
        self._chunks.clear()
        self._sizes.clear()
        self._pending = 0
        self._buf_bytes = 0
        exc = self._ready()
        done = 0
        if exc is None:
            done, exc = self._write(data)
        whole = int(np.searchsorted(ends, done, side="right"))
        cut = done - (int(ends[whole - 1]) if whole else 0)
        if cut:
            self._trim(cut)
        self.recorded += whole
        self.unrecorded += n - whole
        self._state(exc)

    def _ready(self) -> OSError | None:
        """Open the file if it is not, and see that it starts with the magic (completing
        a magic that a full disk cut short). The error if not."""
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT
                                   | os.O_CLOEXEC, 0o644)
            if not self._magic_ok:
                size = os.fstat(self._fd).st_size
                if size < len(MAGIC):
                    have = os.pread(self._fd, size, 0)
                    if MAGIC.startswith(have):
                        _, exc = self._write(memoryview(MAGIC[len(have):]))
                        if exc is not None:
                            raise exc
                self._magic_ok = True
        except OSError as exc:
            return exc
        return None

    def _write(self, data: memoryview) -> tuple[int, OSError | None]:
        """os.write until all is written: the bytes that reached the file, and the error
        that stopped it (a full disk first writes what fits, then fails)."""
        done = 0
        while done < len(data):
            try:
                n = os.write(self._fd, data[done:])
            except OSError as exc:
                return done, exc
            if n <= 0:
                return done, OSError(28, os.strerror(28))  # ENOSPC, as the kernel would
            done += n
        return done, None

    def _trim(self, cut: int) -> None:
        """Drop the ``cut`` bytes of a record the disk had no room for."""
        try:
            os.ftruncate(self._fd, os.lseek(self._fd, 0, os.SEEK_END) - cut)
        except OSError as exc:
            _log.warning("cannot trim a cut record off %s (%s): readers skip it",
                         self.path, exc.strerror or exc)

    def _state(self, exc: OSError | None, closing: bool = False) -> None:
        """One log line per change of state, never one per flush."""
        now = time.monotonic()
        self._last_ok = exc is None
        if exc is None:
            if self.error is not None and (closing or now - self._failed_at >= self.settle_s):
                _log.warning("recording %s writes again after %d failed flushes (written %d, "
                             "unrecorded %d so far)", self.path, self.failed_flushes,
                             self.recorded, self.unrecorded)
                self.error = None
                self.failed_flushes = 0
            return
        counts = f"written {self.recorded}, unrecorded {self.unrecorded}"
        msg = f"cannot write the recording {self.path}: {exc.strerror or exc}"
        self._failed_at = now
        self.failed_flushes += 1
        if msg != self.error:
            _log.error("%s; ingest goes on, counting what is not recorded (%s so far)", msg,
                       counts)
            self.error = msg
            self.failed_flushes = 1

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError as exc:
                self._state(exc)
            self._fd = None
        if self._last_ok:
            self._state(None, closing=True)  # the end of a failure is never left unsaid

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _record_ends(sizes: list[int | np.ndarray]) -> np.ndarray:
    """Where each record ends in the joined chunks (single sizes come as ints: cheaper)."""
    parts: list[np.ndarray] = []
    singles: list[int] = []
    for x in sizes:
        if type(x) is int:
            singles.append(x)
            continue
        if singles:
            parts.append(np.array(singles, np.int64))
            singles = []
        parts.append(x)
    if singles:
        parts.append(np.array(singles, np.int64))
    return np.cumsum(np.concatenate(parts))


class NullRecorder:
    """A recorder that records nothing: replay, report and rebuild run without one, and
    callers never ask whether recording is on."""

    path: Path | None = None
    appended = 0
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
