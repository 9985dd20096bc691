"""Stop actions: when a finding of ``[actions] stop_on`` is raised, pick the step at which
every rank of the run stops.

    policy = StopPolicy(profile)           # a sink: it sees the records the pipeline emits
    for ctl in policy.due(pipeline.state, time.time()):   # at the server's tick
        pipeline.control(ctl)              # recorded, then a StopRecord for every sink

The stop step S lies ahead of every rank: the highest step any rank reported, carried on
at the run's recent rate over the time since that step was made (the collector may be
behind on its queue; wall times are the ranks' clocks, ``now`` the collector's), plus the
margin max(``stop_min_steps``, rate x ``stop_margin_s``): the time every rank has to hear
of it. A rank that hears of it only after its step S stops at once, so a margin too short
for the back-channel's latency lets DDP ranks leave at different steps: keep it well above
it. Live only: a replay has no policy and applies the recorded ``stop_run`` controls, so it
emits the same records.
"""

from __future__ import annotations

import math

from collector.analysis.profile import Profile
from collector.ingest.state import State
from collector.records import RAISED, EpochRecord, EventRecord, Record, RunRecord, StopRecord
from collector.sinks.base import NullSink

__all__ = ["StopPolicy"]


class StopPolicy:
    """Watches the records for ``stop_on`` findings; ``due`` turns them into controls."""

    def __init__(self, profile: Profile) -> None:
        self.stop_on = frozenset(profile.stop_on)
        self.margin_s = profile.stop_margin_s
        self.min_steps = profile.stop_min_steps
        self._wanted: dict[str, str] = {}  # run -> the first stop_on finding raised

    # -- the sink ------------------------------------------------------------------------
    def write(self, record: Record) -> None:
        run = record.run
        if isinstance(record, EpochRecord | EventRecord):
            for ev in record.events:
                if ev.kind == RAISED and ev.rule in self.stop_on:
                    self._wanted.setdefault(run, ev.rule)
        elif isinstance(record, StopRecord | RunRecord):  # decided, or a run id seen anew
            self._wanted.pop(run, None)

    def flush(self) -> None:
        pass

    def close(self, timeout_s: float = 10.0) -> None:
        pass

    # -- the decisions -------------------------------------------------------------------
    def due(self, state: State, now_wall: float) -> list[dict]:
        """``stop_run`` controls for the runs that asked for one since the last call; a run
        without a step yet waits; one that finished, or whose stop the state holds already
        (it keeps the first), is let go."""
        out = []
        for run, rule in list(self._wanted.items()):
            known = state.runs.get(run)
            if known is None or known.finished or known.stop is not None:
                del self._wanted[run]  # gone, ended, or its stop decided already
                continue
            progress = known.progress()
            if progress is None:
                continue  # no step yet
            seen, rate, wall = progress
            ahead = seen + rate * max(0.0, now_wall - wall)
            step = math.ceil(ahead + max(self.min_steps, rate * self.margin_s))
            out.append({"op": "stop_run", "run": run, "rule": rule, "step": int(step),
                        "seen": seen, "rate": float(rate)})
            del self._wanted[run]
        return out


class NoStops(NullSink):
    """The stop policy of a profile that stops nothing: reads no record, decides nothing."""

    def due(self, state: State, now_wall: float) -> list[dict]:
        return []


NO_STOPS = NoStops()
