"""The collector half of trainwatch: ingest, recording, statistics, rules and sinks.

Runs without torch (a login node has none). ``trainwatch collect`` serves the socket;
``Pipeline`` is the one path from frames to records, live and in replay alike.

    from collector import Pipeline, load_profile, replay
    pipe, stats = replay(["run.twrec"], load_profile(None))

Names are imported on first use, so ``import collector.report`` does not pull in numba.
"""

from importlib import import_module
from typing import Any

__all__ = ["Pipeline", "RecordWriter", "load_profile", "read_records", "replay"]

_WHERE = {"Pipeline": "pipeline", "replay": "pipeline", "load_profile": "profile",
          "RecordWriter": "recording", "read_records": "recording"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'collector' has no attribute {name!r}")
