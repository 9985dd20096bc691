"""The collector half of trainwatch: ingest, recording, statistics, rules and sinks.

Runs without torch (a login node has none). ``trainwatch collect`` serves the socket;
``Pipeline`` is the one path from frames to records, live and in replay alike.

    from collector import Pipeline, load_profile, replay
    pipe, stats = replay(["run.twrec"], load_profile(None))

One sub-package per stage of the flow: ``ingest`` (socket, decode, state) ->
``recording`` (the durable log) -> ``analysis`` (kernels, rules) -> ``records`` (typed) ->
``sinks`` (JSONL, wandb, console) and ``report`` (HTML, live board). Names are imported on
first use, so ``import collector.report`` does not pull in numba.
"""

from importlib import import_module
from typing import Any

__all__ = ["Pipeline", "RecordWriter", "load_profile", "read_records", "replay"]

_WHERE = {"Pipeline": "ingest.pipeline", "replay": "ingest.pipeline",
          "load_profile": "analysis.profile_load", "RecordWriter": "recording.writer",
          "read_records": "recording.reader"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'collector' has no attribute {name!r}")
