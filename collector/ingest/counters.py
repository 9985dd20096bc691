"""Bookkeeping of the message streams: counts, sequence gaps, reported drops.

Shared by the live/replay state and by ``trainwatch inspect``, so both count alike. A
client instance (one process; a restarted rank is a new instance) numbers its messages
0, 1, 2, ..., and every header says how many lower-numbered messages it dropped. So per
instance ``seq_gaps`` (numbers never seen) equals ``reported_drops`` exactly when nothing
was lost between the client and the recording. A rank's figures add up its instances',
so two processes that claim one rank (a reused run id, a wrong RANK) keep true totals.
"""

from __future__ import annotations

from trainer_client import wire

__all__ = ["RATE_SPAN_S", "RankCounters", "StepClock", "StreamCounters"]

_KINDS = max(wire.KINDS) + 1
RATE_SPAN_S = 5.0  # a stream's step rate is measured over the last 5 to 10 s of its steps


class StepClock:
    """A stream's highest step and recent step rate, from its steps' wall times (the
    client's clock, as the messages carry it): what a stop decision reads
    (``RunState.progress``). The rate spans from a mark at least ``RATE_SPAN_S`` old (and
    under twice that, once the stream is that old) to the latest step."""

    __slots__ = ("step", "wall", "mark", "next_mark")

    def __init__(self) -> None:
        self.step = -1
        self.wall = 0.0
        self.mark: tuple[int, float] | None = None  # (step, wall) the rate counts from
        self.next_mark: tuple[int, float] | None = None

    def note(self, step: int, wall: float) -> None:
        """A step message (or the last of a bulk stretch) arrived."""
        if self.mark is None:
            self.mark = self.next_mark = (step, wall)
        elif wall - self.next_mark[1] >= RATE_SPAN_S:
            self.mark, self.next_mark = self.next_mark, (step, wall)
        self.step = max(self.step, step)
        self.wall = max(self.wall, wall)

    def rate(self) -> float:
        """Steps per second since the mark (0.0 until two steps are apart in time)."""
        if self.mark is None or self.wall <= self.mark[1]:
            return 0.0
        return max(0.0, (self.step - self.mark[0]) / (self.wall - self.mark[1]))


class StreamCounters:
    """One client instance's messages."""

    __slots__ = ("messages", "by_kind", "first_seq", "last_seq", "first_time", "last_time",
                 "unique", "dropped")

    def __init__(self) -> None:
        self.messages = 0
        self.by_kind = [0] * _KINDS
        self.first_seq: int | None = None
        self.last_seq = -1
        self.first_time: float | None = None
        self.last_time: float | None = None
        self.unique = 0  # distinct sequence numbers seen
        self.dropped = 0  # the instance's latest report of what it dropped

    def admit(self, seq: int) -> bool:
        """False for a sequence number this instance already used (duplicate or replay)."""
        return seq > self.last_seq

    def count(self, kind: int, seq: int, dropped: int, wall: float) -> None:
        """Count an admitted message (``admit`` said yes)."""
        self.messages += 1
        self.by_kind[kind] += 1
        self.unique += 1
        self.last_seq = seq
        if self.first_seq is None:
            self.first_seq = seq
            self.first_time = wall
        self.last_time = wall
        if dropped > self.dropped:
            self.dropped = dropped

    def count_many(self, kind: int, n: int, last_seq: int, max_dropped: int,
                   last_wall: float) -> None:
        """``count`` for ``n`` admitted messages of one kind at once (not the first ones)."""
        self.messages += n
        self.by_kind[kind] += n
        self.unique += n
        self.last_seq = last_seq
        self.last_time = last_wall
        if max_dropped > self.dropped:
            self.dropped = max_dropped

    @property
    def seq_gaps(self) -> int:
        return self.last_seq + 1 - self.unique


class RankCounters:
    """A rank's instances; one folded away (evicted) still counts in the totals."""

    __slots__ = ("streams", "latest", "_gone")

    def __init__(self) -> None:
        self.streams: dict[int, StreamCounters] = {}
        self.latest: int | None = None  # the instance seen first most recently
        self._gone = [0, [0] * _KINDS, 0, 0]  # messages, by_kind, gaps, drops of folded ones

    def stream(self, instance: int) -> StreamCounters:
        c = self.streams.get(instance)
        if c is None:
            c = self.streams[instance] = StreamCounters()
            self.latest = instance
        return c

    def fold(self, instance: int) -> None:
        """Forget an instance's counters, keeping them in the rank's totals."""
        c = self.streams.pop(instance)
        g = self._gone
        g[0] += c.messages
        g[1] = [a + b for a, b in zip(g[1], c.by_kind, strict=True)]
        g[2] += c.seq_gaps
        g[3] += c.dropped

    @property
    def messages(self) -> int:
        return self._gone[0] + sum(c.messages for c in self.streams.values())

    @property
    def seq_gaps(self) -> int:
        return self._gone[2] + sum(c.seq_gaps for c in self.streams.values())

    @property
    def reported_drops(self) -> int:
        return self._gone[3] + sum(c.dropped for c in self.streams.values())

    def as_dict(self) -> dict:
        by_kind = list(self._gone[1])
        for c in self.streams.values():
            by_kind = [a + b for a, b in zip(by_kind, c.by_kind, strict=True)]
        now = self.streams.get(self.latest) if self.latest is not None else None
        return {
            "messages": self.messages,
            "by_kind": {wire.KINDS[k]: n for k, n in enumerate(by_kind) if n},
            "seq_gaps": self.seq_gaps,
            "reported_drops": self.reported_drops,
            "instances": len(self.streams),
            "first_seq": None if now is None else now.first_seq,
            "last_seq": -1 if now is None else now.last_seq,
            "first_time": None if now is None else now.first_time,
            "last_time": None if now is None else now.last_time,
        }
