"""The wire format: the one module the trainer client and the collector share.

A message is a ZeroMQ multipart message: frame 0 is a msgpack *array* (positional, not a
map: a map header costs several microseconds more to unpack, and replay speed rides on
this), the other frames are raw tensor bytes described by the header. Nothing is ever
pickled or evaluated; every field is type-checked and every tensor's declared size is held
against its frame's real size.

Header layout (index: field)::

    0 version   1 kind      2 run       3 rank      4 world_size  5 instance
    6 seq       7 step      8 epoch     9 wall_time 10 dropped    11 body
    12 tensors: [[name, dtype, [dims...]], ...]  (one per extra frame, in order)

Step messages, the hot kind, have their own single-frame binary layout (``STEP_LAYOUT``):
fixed-width little-endian fields, so the collector parses thousands at once in compiled
code instead of unpacking one header at a time. Its first byte is 0xC1, which msgpack
never uses, so the two layouts cannot be confused. A step in the msgpack layout (a
recording made before the binary one) is still read.

``instance`` is random per client object, so a restarted rank starts a new sequence.
``dropped`` counts this client's messages with a lower ``seq`` that never left it, so the
collector can tell transport loss from reported loss exactly.

Importable without torch or numpy: the collector runs on a login node without torch.

    >>> frames = encode(Header(KIND_STEP, "run1", 0, 1, 7, 0, 0, 1, 0.0, 0,
    ...                        [0.5, 1.2, [], [], None]), [])
    >>> decode(frames).body[0]
    0.5
"""

from __future__ import annotations

import math
import struct
from typing import Any, NamedTuple

import msgpack

__all__ = [
    "DTYPES",
    "EMA_FIELDS",
    "FLOAT_DTYPES",
    "STEP_BODY",
    "STEP_FIELDS",
    "STEP_LAYOUT",
    "WEIGHT_FIELDS",
    "KINDS",
    "VERSION",
    "DecodeError",
    "Header",
    "Message",
    "Tensor",
    "decode",
    "encode",
    "encode_step",
    "step_names",
]

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
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
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


def encode(header: Header, tensors: list[Tensor]) -> list[bytes | memoryview]:
    """Frames for one message: the packed header, then each tensor's raw bytes.

    A step is one binary frame (see ``encode_step``).
    """
    if header.kind == KIND_STEP:
        return [encode_step(header, tensors)]
    specs = [[t.name, t.dtype, list(t.shape)] for t in tensors]
    head = msgpack.packb([VERSION, *header, specs], use_bin_type=True)
    return [head, *(t.data for t in tensors)]


# -- the binary step layout ------------------------------------------------------------------
# magic tag version flags | run_len n_comp | names_len n_pnorm rank world |
# instance seq step epoch dropped | wall loss grad_norm lr, then
# n_comp float64 values, n_pnorm float32 parameter norms, the run (utf-8), and the names:
# n_comp times (u16 length, utf-8). flags: 1 = grad_norm present, 2 = param_norms present,
# 4 = lr present. Version 1 (no lr field) is still read, by the per-message path.
STEP_FIELDS = ("magic", "tag", "version", "flags", "run_len", "n_comp", "names_len", "n_pn",
               "rank", "world", "instance", "seq", "step", "epoch", "dropped", "wall", "loss",
               "grad_norm", "lr")
STEP_LAYOUT = struct.Struct("<BBBBHHIIII5Q4d")
STEP_LAYOUT_V1 = struct.Struct("<BBBBHHIIII5Q3d")
STEP_MAGIC = 0xC1  # never a msgpack first byte
STEP_TAG = 0x53
STEP_VERSION = 2
STEP_HAS_GN = 1
STEP_HAS_PN = 2
STEP_HAS_LR = 4
STEP_FLAGS = STEP_HAS_GN | STEP_HAS_PN | STEP_HAS_LR
# A step's body, decoded: [loss, grad_norm | None, names, values, lr | None].
STEP_BODY = ("loss", "grad_norm", "names", "values", "lr")
_STEP_FIRST = bytes((STEP_MAGIC,))
_U63 = 1 << 63
_NAME_LEN = struct.Struct("<H")


def encode_step(header: Header, tensors: list[Tensor]) -> bytes:
    """A step message as one binary frame. ``header.body`` = [loss, grad_norm, names, values]
    or the same and ``lr`` (``STEP_BODY``); grad_norm and lr may be None."""
    loss, gn, names, values, *rest = header.body
    lr = rest[0] if rest else None
    if len(names) != len(values):
        raise ValueError("step: one value per component name")
    pn = b""
    if tensors:
        t = tensors[0]
        if len(tensors) != 1 or t.name != "param_norms" or t.dtype != "float32" \
                or len(t.shape) != 1:
            raise ValueError("a step carries only 1-D float32 param_norms")
        pn = bytes(t.data)
    run = header.run.encode()
    name_blob = _names_blob(names)
    flags = (STEP_HAS_GN if gn is not None else 0) | (STEP_HAS_PN if tensors else 0) \
        | (STEP_HAS_LR if lr is not None else 0)
    head = _step_struct(len(values)).pack(
        STEP_MAGIC, STEP_TAG, STEP_VERSION, flags, len(run), len(values), len(name_blob),
        len(pn) // 4, header.rank, header.world_size, header.instance, header.seq,
        header.step, header.epoch, header.dropped, header.wall_time, loss,
        0.0 if gn is None else gn, 0.0 if lr is None else lr, *values)
    return b"".join((head, pn, run, name_blob))


# The sender packs the same names and the same number of values step after step.
_NAME_BLOBS: dict[tuple, bytes] = {}
_STEP_STRUCTS: dict[int, struct.Struct] = {}


def _names_blob(names: list) -> bytes:
    key = tuple(names)
    blob = _NAME_BLOBS.get(key)
    if blob is None:
        if len(_NAME_BLOBS) > 64:
            _NAME_BLOBS.clear()
        enc = [str(n).encode() for n in names]
        blob = _NAME_BLOBS[key] = b"".join(_NAME_LEN.pack(len(e)) + e for e in enc)
    return blob


def _step_struct(n_values: int) -> struct.Struct:
    st = _STEP_STRUCTS.get(n_values)
    if st is None:
        st = _STEP_STRUCTS[n_values] = struct.Struct(f"{STEP_LAYOUT.format}{n_values}d")
    return st


_last_names: list = [b"", []]  # a run's steps repeat their names: decode them once


def step_names(raw: bytes, n_comp: int, run: str | None = None) -> list[str]:
    """A binary step's names region: ``n_comp`` times (u16 length, utf-8)."""
    if raw == _last_names[0] and n_comp == len(_last_names[1]):  # k entries decode to k names
        return _last_names[1]
    names, p = [], 0
    try:
        for _ in range(n_comp):
            (ln,) = _NAME_LEN.unpack_from(raw, p)
            if p + 2 + ln > len(raw):
                raise DecodeError("size_mismatch", "binary step names", run)
            names.append(str(raw[p + 2:p + 2 + ln], "utf-8"))
            p += 2 + ln
    except (struct.error, UnicodeDecodeError):
        raise DecodeError("bad_body", "step components", run) from None
    if p != len(raw):
        raise DecodeError("size_mismatch", "binary step names", run)
    _last_names[0], _last_names[1] = raw, names
    return names


def _decode_step(frame: bytes | memoryview, n_frames: int) -> Message:
    """The binary step layout, checked field by field (the collector's bulk parser accepts
    a subset of what this accepts, and reads the same values)."""
    size = len(frame)
    version = frame[2] if size > 2 else 0
    layout = STEP_LAYOUT_V1 if version == 1 else STEP_LAYOUT
    if n_frames != 1 or size < layout.size:
        raise DecodeError("bad_header", "binary step: one frame of at least the fixed size")
    fields = layout.unpack_from(frame, 0)
    (_, tag, version, flags, run_len, n_comp, names_len, n_pn, rank, world, instance, seq,
     step, epoch, dropped, wall, loss, gn) = fields[:18]
    lr = fields[18] if version != 1 and flags & STEP_HAS_LR else None
    if tag != STEP_TAG:
        raise DecodeError("bad_kind", f"binary tag {tag}")
    if version not in (1, STEP_VERSION):
        raise DecodeError("bad_version", f"binary step {version}")
    off = layout.size
    known = STEP_FLAGS if version != 1 else STEP_HAS_GN | STEP_HAS_PN
    if flags & ~known or (n_pn and not flags & STEP_HAS_PN) \
            or off + 8 * n_comp + 4 * n_pn + run_len + names_len != size:
        raise DecodeError("size_mismatch", "binary step lengths")
    mv = memoryview(frame)
    r0 = off + 8 * n_comp + 4 * n_pn
    try:
        run = str(mv[r0:r0 + run_len], "utf-8")
    except UnicodeDecodeError:
        raise DecodeError("bad_field", "run") from None
    if not run or run_len > MAX_RUN_LEN:
        raise DecodeError("bad_field", "run")
    if not rank < world <= MAX_WORLD:
        raise DecodeError("bad_field", "rank or world_size", run)
    if (instance | seq | step | epoch | dropped) >= _U63:
        raise DecodeError("bad_field", "instance, seq, step, epoch or dropped", run)
    if not _isfinite(wall):
        raise DecodeError("bad_field", "wall_time", run)
    names = step_names(bytes(mv[r0 + run_len:]), n_comp, run)
    values = list(struct.unpack_from(f"<{n_comp}d", frame, off))
    tensors = _NO_TENSORS
    if flags & STEP_HAS_PN:
        p0 = off + 8 * n_comp
        tensors = {"param_norms": Tensor("param_norms", "float32", (n_pn,),
                                         mv[p0:p0 + 4 * n_pn])}
    body = [loss, gn if flags & STEP_HAS_GN else None, names, values, lr]
    return Message(KIND_STEP, run, rank, world, instance, seq, step, epoch, wall, dropped,
                   body, tensors)


_unpackb = msgpack.unpackb


def decode(frames: list[bytes] | list[memoryview]) -> Message:
    """Validate and decode one message's frames; raise DecodeError with a reason otherwise.

    This runs once per message live and in replay, so the common checks are inlined.
    """
    if not frames:
        raise DecodeError("empty")
    if frames[0][:1] == _STEP_FIRST:
        return _decode_step(frames[0], len(frames))
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
            or type(dropped) is not int or not 0 <= (instance | seq | step | dropped) < _U63:
        raise DecodeError("bad_field", "instance, seq, step or dropped", run)
    if type(epoch) is not int or not 0 <= epoch < _U63:
        raise DecodeError("bad_epoch", repr(epoch)[:40], run)
    if type(wall) is not float or not _isfinite(wall):
        raise DecodeError("bad_field", "wall_time", run)
    if specs or len(frames) != 1:
        tensors = _tensors(specs, frames, run)
    elif type(specs) is list:
        tensors = _NO_TENSORS
    else:
        raise DecodeError("bad_tensors", "specs", run)
    body = _BODY_CHECKS[kind](body, tensors, run)
    return Message(kind, run, rank, world, instance, seq, step, epoch, wall, dropped, body,
                   tensors)


_isfinite = math.isfinite
_NO_TENSORS: dict[str, Tensor] = {}
_NUM_TYPES = frozenset((int, float))
_MAX_EXTENT = 1 << 62


def _tensors(specs: Any, frames: list, run: str) -> dict[str, Tensor]:
    if type(specs) is not list or len(specs) != len(frames) - 1:
        raise DecodeError("bad_tensors", "spec count != frame count", run)
    out: dict[str, Tensor] = {}
    for spec, data in zip(specs, frames[1:], strict=True):
        if type(spec) is not list or len(spec) != 3:
            raise DecodeError("bad_tensors", "spec shape", run)
        name, dtype, shape = spec
        if type(name) is not str or name in out or dtype not in DTYPES:
            raise DecodeError("bad_tensors", "name or dtype", run)
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise DecodeError("bad_tensors", "shape", run)
        n, extent = DTYPES[dtype], 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise DecodeError("bad_tensors", "shape", run)
            n *= d  # Python ints: a huge declared shape cannot overflow, it just mismatches
            extent *= d or 1
        if n != len(data):
            raise DecodeError("size_mismatch", f"{name}: declared {n} bytes, frame {len(data)}",
                              run)
        if extent > _MAX_EXTENT:  # empty, yet no array can have that shape
            raise DecodeError("bad_tensors", f"{name}: shape beyond any array", run)
        out[name] = Tensor(name, dtype, tuple(shape), data)
    return out


def _str_list(v: Any) -> bool:
    return type(v) is list and all(type(s) is str for s in v)


def _map(body: Any, run: str) -> dict:
    if type(body) is not dict:
        raise DecodeError("bad_body", "expected a map", run)
    return body


def _check_hello(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    env = body.get("env", {})
    if type(env) is not dict or not all(type(v) is str for v in env.values()):
        raise DecodeError("bad_body", "hello env", run)
    return body


def _check_config(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    if type(body.get("config")) is not dict:
        raise DecodeError("bad_body", "config", run)
    if body.get("num_params") is not None and type(body["num_params"]) is not int:
        raise DecodeError("bad_body", "num_params", run)
    return body


def _check_data(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    index, count, channels = body.get("index"), body.get("count"), body.get("channels")
    if not (type(index) is int and type(count) is int and 0 <= index < count):
        raise DecodeError("bad_body", "data chunk index", run)
    if not _str_list(channels) or "chunk" not in tensors:
        raise DecodeError("bad_body", "data channels or chunk", run)
    if tensors["chunk"].dtype not in FLOAT_DTYPES:
        raise DecodeError("bad_tensors", "data chunk dtype", run)
    shape = tensors["chunk"].shape
    if not shape or shape[-1] != len(channels):
        raise DecodeError("size_mismatch", "data chunk's last dim != channels", run)
    # Optional (chunk 0): how many rows the data had, how many of them were sent.
    rows_total, rows_sent = body.get("rows_total"), body.get("rows_sent")
    if (rows_total is not None or rows_sent is not None) and not (
            type(rows_total) is int and type(rows_sent) is int
            and 0 <= rows_sent <= rows_total < _U63):
        raise DecodeError("bad_body", "data rows_total/rows_sent", run)
    for const in ("mean", "std"):
        t = tensors.get(const)
        if t is not None and t.dtype != "float64":
            raise DecodeError("bad_tensors", f"data {const} must be float64", run)
        if t is not None and t.shape != (len(channels),):
            raise DecodeError("size_mismatch", f"data {const} shape", run)
    return body


# Step messages repeat the same component names: the last validated list is remembered.
_known_names: list = [[]]


def _check_step(body: Any, tensors: dict, run: str) -> list:
    """A msgpack step (recordings older than the binary layout): 4 fields, or 5 with lr."""
    if type(body) is not list or len(body) not in (4, 5):
        raise DecodeError("bad_body", "step", run)
    loss, grad_norm, names, values, *rest = body
    lr = rest[0] if rest else None
    if (type(loss) is not float and type(loss) is not int) or not (
            grad_norm is None or type(grad_norm) is float or type(grad_norm) is int) or not (
            lr is None or type(lr) is float or type(lr) is int):
        raise DecodeError("bad_body", "step loss, grad_norm or lr", run)
    if names != _known_names[0]:
        if not _str_list(names):
            raise DecodeError("bad_body", "step components", run)
        _known_names[0] = names
    if type(values) is not list or len(values) != len(names) or (
            values and not _NUM_TYPES.issuperset(map(type, values))):
        raise DecodeError("bad_body", "step component values", run)
    if tensors:
        pn = tensors.get("param_norms")
        if pn is None or len(tensors) != 1 or len(pn.shape) != 1 or pn.dtype != "float32":
            raise DecodeError("bad_tensors", "a step carries only 1-D float32 param_norms",
                              run)
    return body if rest else [*body, None]


def _check_epoch(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    for key, n in (("weights", len(WEIGHT_FIELDS)), ("ema", len(EMA_FIELDS))):
        v = body.get(key)
        if v is not None and not (type(v) is list and len(v) == n
                                  and _NUM_TYPES.issuperset(map(type, v))):
            raise DecodeError("bad_body", f"epoch {key}", run)
    names = body.get("param_names")
    if names is not None and not _str_list(names):
        raise DecodeError("bad_body", "epoch param_names", run)
    return body


def _check_validation(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    channels = body.get("channels")
    samples = tensors.get("samples")
    if samples is None or not samples.shape or samples.dtype not in FLOAT_DTYPES:
        raise DecodeError("bad_body", "validation samples", run)
    if "epoch" in body and (type(body["epoch"]) is not int or body["epoch"] < 0):
        raise DecodeError("bad_body", "validation epoch", run)
    if channels is not None and (not _str_list(channels) or len(channels) != samples.shape[-1]):
        raise DecodeError("size_mismatch", "validation channels != last dim", run)
    return body


def _check_bye(body: Any, tensors: dict, run: str) -> dict:
    return _map(body, run)


_BODY_CHECKS = {
    KIND_HELLO: _check_hello,
    KIND_CONFIG: _check_config,
    KIND_DATA: _check_data,
    KIND_STEP: _check_step,
    KIND_EPOCH: _check_epoch,
    KIND_VALIDATION: _check_validation,
    KIND_BYE: _check_bye,
}
