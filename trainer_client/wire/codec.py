"""Encoding and decoding whole messages: the msgpack header layout, and steps in binary."""

from __future__ import annotations

import msgpack

from trainer_client.wire.bodies import BODY_CHECKS, tensors_of
from trainer_client.wire.step import STEP_FIRST, decode_step, encode_step
from trainer_client.wire.types import (
    KIND_STEP,
    KINDS,
    MAX_RUN_LEN,
    MAX_WORLD,
    NO_TENSORS,
    U63,
    VERSION,
    DecodeError,
    Header,
    Message,
    Tensor,
    isfinite,
)


def encode(header: Header, tensors: list[Tensor]) -> list[bytes | memoryview]:
    """Frames for one message: the packed header, then each tensor's raw bytes.

    A step is one binary frame (see ``encode_step``).
    """
    if header.kind == KIND_STEP:
        return [encode_step(header, tensors)]
    specs = [[t.name, t.dtype, list(t.shape)] for t in tensors]
    head = msgpack.packb([VERSION, *header, specs], use_bin_type=True)
    return [head, *(t.data for t in tensors)]


_unpackb = msgpack.unpackb


def decode(frames: list[bytes] | list[memoryview]) -> Message:
    """Validate and decode one message's frames; raise DecodeError with a reason otherwise.

    This runs once per message live and in replay, so the common checks are inlined.
    """
    if not frames:
        raise DecodeError("empty")
    if frames[0][:1] == STEP_FIRST:
        return decode_step(frames[0], len(frames))
    try:
        h = _unpackb(frames[0], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on junk
        raise DecodeError("bad_msgpack", type(exc).__name__) from None
    if type(h) is not list or len(h) != 13:
        raise DecodeError("bad_header", "not a 13-field array")
    version, kind, run, rank, world, instance, seq, step, epoch, wall, dropped, body, specs = h
    if type(version) is not int or version != VERSION:  # 1.0 and True equal 1
        raise DecodeError("bad_version", repr(version)[:40])
    if type(run) is not str or not run or len(run) > MAX_RUN_LEN:
        raise DecodeError("bad_field", "run")
    if type(kind) is not int or kind not in KINDS:  # a list is unhashable, 4.0 equals 4
        raise DecodeError("bad_kind", repr(kind)[:40], run)
    if type(world) is not int or type(rank) is not int or not 0 <= rank < world <= MAX_WORLD:
        raise DecodeError("bad_field", "rank or world_size", run)
    if type(instance) is not int or type(seq) is not int or type(step) is not int \
            or type(dropped) is not int or not 0 <= (instance | seq | step | dropped) < U63:
        raise DecodeError("bad_field", "instance, seq, step or dropped", run)
    if type(epoch) is not int or not 0 <= epoch < U63:
        raise DecodeError("bad_epoch", repr(epoch)[:40], run)
    if type(wall) is not float or not isfinite(wall):
        raise DecodeError("bad_field", "wall_time", run)
    if specs or len(frames) != 1:
        tensors = tensors_of(specs, frames, run)
    elif type(specs) is list:
        tensors = NO_TENSORS
    else:
        raise DecodeError("bad_tensors", "specs", run)
    body = BODY_CHECKS[kind](body, tensors, run)
    return Message(kind, run, rank, world, instance, seq, step, epoch, wall, dropped, body,
                   tensors)
