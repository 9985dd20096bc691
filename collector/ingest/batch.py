"""A batch of messages as the pipeline takes them, from a socket or a recording: first
frames laid end to end in one buffer (what ``stepscan`` parses in one pass), with each
message's whole frames on demand for the per-message path."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from collector.ingest.runs import step_bytes
from collector.ingest.stepscan import COUNT, Steps
from collector.recording.reader import frames_of

__all__ = ["Batch", "record_frames", "step_bytes_of"]


class Batch(NamedTuple):
    """Messages in order: message ``i``'s first frame is ``buf[offs[i]:offs[i]+lens[i]]``,
    it has ``nfr[i]`` frames, and ``frames(i)`` gives them all (for the per-message path)."""

    buf: np.ndarray
    offs: np.ndarray
    lens: np.ndarray
    nfr: np.ndarray
    frames: Callable[[int], list]

    @classmethod
    def of(cls, messages: list[list]) -> Batch:
        """A batch of multipart messages as they came off a socket (frames: bytes or any
        buffer, e.g. zero-copy ``zmq.Frame``; the per-message path gets bytes)."""
        heads = [m[0] if m else b"" for m in messages]
        n = len(heads)
        lens = np.fromiter(map(len, heads), np.int64, n)
        offs = np.zeros(n, np.int64)
        np.cumsum(lens[:-1], out=offs[1:])
        return cls(np.frombuffer(b"".join(heads), np.uint8), offs, lens,
                   np.fromiter(map(len, messages), np.int64, n),
                   lambda i: [f if type(f) is bytes else bytes(f) for f in messages[i]])


def step_bytes_of(s: Steps, a: int, e: int) -> np.ndarray:
    """``step_bytes`` of fast steps ``a`` to ``e``, as a float64 vector (for bincount)."""
    return step_bytes(0, 0) + 8.0 * s.comp_at[a:e, COUNT] + 4.0 * np.maximum(s.pn_at[a:e, COUNT], 0)


def record_frames(raw: np.ndarray, body: np.ndarray, nfr: np.ndarray, first: np.ndarray
                  ) -> Callable[[int], list]:
    """``Batch.frames`` over a stretch of a recording read into ``raw``."""
    return lambda i: frames_of(raw, int(body[i]), int(nfr[i]), int(first[i]))
