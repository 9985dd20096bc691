"""The wire's vocabulary: kinds, dtypes, layouts of summaries, limits, the message types."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

VERSION = 1

KIND_HELLO = 1
KIND_CONFIG = 2
KIND_DATA = 3
KIND_STEP = 4
KIND_EPOCH = 5
KIND_VALIDATION = 6
KIND_BYE = 7
KINDS = {
    KIND_HELLO: "hello",
    KIND_CONFIG: "config",
    KIND_DATA: "data",
    KIND_STEP: "step",
    KIND_EPOCH: "epoch",
    KIND_VALIDATION: "validation",
    KIND_BYE: "bye",
}

# dtype name -> bytes per element. bfloat16/float16 travel as they are; the collector widens.
DTYPES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8, "int32": 4}
# The dtypes samples and data may have (torch's names without "torch.").
FLOAT_DTYPES = tuple(d for d in DTYPES if "float" in d)
# An epoch's weight summary (float64, summed on the device over every parameter element)
# and its EMA summary (element count, sum of |w_ema - w|), in this order.
WEIGHT_FIELDS = ("count", "sum_abs", "sum", "sum_sq", "max_abs")
EMA_FIELDS = ("count", "sum_abs_diff")
MAX_DIMS = 8
MAX_RUN_LEN = 256
MAX_WORLD = 1 << 20


class DecodeError(ValueError):
    """A message that is not a valid trainwatch message; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "", run: str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.run = run


class Header(NamedTuple):
    kind: int
    run: str
    rank: int
    world_size: int
    instance: int
    seq: int
    step: int
    epoch: int
    wall_time: float
    dropped: int
    body: Any


class Tensor(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


class Message(NamedTuple):
    """A decoded, validated message. ``tensors`` maps name -> Tensor."""

    kind: int
    run: str
    rank: int
    world_size: int
    instance: int
    seq: int
    step: int
    epoch: int
    wall_time: float
    dropped: int
    body: Any
    tensors: dict[str, Tensor]


U63 = 1 << 63  # fields are unsigned 64-bit on the wire, int64 in the collector
isfinite = math.isfinite
NO_TENSORS: dict[str, Tensor] = {}
