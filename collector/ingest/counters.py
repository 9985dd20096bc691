"""Per-rank bookkeeping of the message stream: counts, sequence gaps, reported drops.

Shared by the live/replay state and by ``trainwatch inspect``, so both count alike.
A rank's client numbers its messages 0, 1, 2, ... per instance (a restarted rank is a new
instance), and every header says how many lower-numbered messages it dropped. So
``seq_gaps`` (numbers never seen) equals ``reported_drops`` exactly when nothing was lost
between the client and the recording.
"""

from __future__ import annotations

from trainer_client import wire

__all__ = ["RankCounters"]


class RankCounters:
    __slots__ = ("messages", "by_kind", "first_seq", "last_seq", "first_time", "last_time",
                 "instance", "_unique", "_done_gaps", "_done_drops", "_dropped")

    def __init__(self) -> None:
        self.messages = 0
        self.by_kind = [0] * (max(wire.KINDS) + 1)
        self.first_seq: int | None = None
        self.last_seq = -1
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.instance: int | None = None
        self._unique = 0  # distinct seqs of the current instance
        self._dropped = 0  # the current instance's latest report
        self._done_gaps = 0  # totals of earlier instances
        self._done_drops = 0

    def admit(self, instance: int, seq: int) -> bool:
        """False for a sequence number this instance already used (duplicate or replay)."""
        if instance != self.instance:
            if self.instance is not None:
                self._done_gaps += self.last_seq + 1 - self._unique
                self._done_drops += self._dropped
            self.instance = instance
            self.last_seq = -1
            self._unique = 0
            self._dropped = 0
            return True
        return seq > self.last_seq

    def count(self, kind: int, seq: int, dropped: int, wall: float) -> None:
        """Count an admitted message (call ``admit`` first)."""
        self.messages += 1
        self.by_kind[kind] += 1
        self._unique += 1
        self.last_seq = seq
        if self.first_seq is None:
            self.first_seq = seq
            self.first_time = wall
        self.last_time = wall
        if dropped > self._dropped:
            self._dropped = dropped

    def count_many(self, kind: int, n: int, last_seq: int, max_dropped: int,
                   last_wall: float) -> None:
        """``count`` for ``n`` admitted messages of one kind at once (not the first ones)."""
        self.messages += n
        self.by_kind[kind] += n
        self._unique += n
        self.last_seq = last_seq
        self.last_time = last_wall
        if max_dropped > self._dropped:
            self._dropped = max_dropped

    @property
    def seq_gaps(self) -> int:
        return self._done_gaps + self.last_seq + 1 - self._unique

    @property
    def reported_drops(self) -> int:
        return self._done_drops + self._dropped

    def as_dict(self) -> dict:
        return {
            "messages": self.messages,
            "by_kind": {wire.KINDS[k]: n for k, n in enumerate(self.by_kind) if n},
            "seq_gaps": self.seq_gaps,
            "reported_drops": self.reported_drops,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_time": self.first_time,
            "last_time": self.last_time,
        }
