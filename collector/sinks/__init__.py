"""Where the collector's records go: JSONL, wandb, the console (see ``base``)."""

from collector.sinks.base import FanOut, NullSink, Sink

__all__ = ["FanOut", "NullSink", "Sink"]
