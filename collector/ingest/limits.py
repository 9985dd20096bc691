"""What any sender may make the collector hold: named defaults with units, in one place.

The live collector records its limits in the recording (a ``limits`` control) so that a
replay, and a restarted collector's rebuild, accept and drop exactly what it did.

    limits = Limits(max_held_bytes=512 << 20)     # trainwatch collect --max-held-mb 512
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["RUN_BYTES", "STEP_BYTES", "STREAM_BYTES", "Limits"]

# What the collector holds for each thing, as the budget counts it (estimates from
# measured sizes: a run's state and its health with its rule history and data reference;
# a client instance's state; a step's columns before its payload).
RUN_BYTES = 256 << 10
STREAM_BYTES = 4 << 10
STEP_BYTES = 40  # + 8 per loss term, + 4 per parameter norm


@dataclass(frozen=True)
class Limits:
    """The collector's bounds; each is a ``trainwatch collect`` option."""

    max_world_size: int = 16384  # ranks a run may claim (--max-world-size)
    max_held_bytes: int = 2 << 30  # open epochs, validation samples, runs (--max-held-mb)
    max_runs: int = 1000  # runs held at once (--max-runs)
    max_streams_per_rank: int = 4  # client instances kept per rank; older ones are folded
    evict_after_s: float = 600.0  # a finished run's state is kept this long, then evicted

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"limits: {f.name} must be a positive number, got {v!r}")

    def control(self) -> dict[str, Any]:
        """The recording's ``limits`` control."""
        return {"op": "limits", **asdict(self)}

    @classmethod
    def from_control(cls, ctl: dict[str, Any]) -> Limits:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in ctl.items() if k in known})
