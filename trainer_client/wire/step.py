"""The binary step layout: one fixed-width frame per step, parsed in bulk by the collector."""

from __future__ import annotations

import struct

from trainer_client.wire.types import (
    KIND_STEP,
    MAX_RUN_LEN,
    MAX_WORLD,
    NO_TENSORS,
    U63,
    DecodeError,
    Header,
    Message,
    Tensor,
    isfinite,
)

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
STEP_FIRST = bytes((STEP_MAGIC,))
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


def decode_step(frame: bytes | memoryview, n_frames: int) -> Message:
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
    if (instance | seq | step | epoch | dropped) >= U63:
        raise DecodeError("bad_field", "instance, seq, step, epoch or dropped", run)
    if not isfinite(wall):
        raise DecodeError("bad_field", "wall_time", run)
    names = step_names(bytes(mv[r0 + run_len:]), n_comp, run)
    values = list(struct.unpack_from(f"<{n_comp}d", frame, off))
    tensors = NO_TENSORS
    if flags & STEP_HAS_PN:
        p0 = off + 8 * n_comp
        tensors = {"param_norms": Tensor("param_norms", "float32", (n_pn,),
                                         mv[p0:p0 + 4 * n_pn])}
    body = [loss, gn if flags & STEP_HAS_GN else None, names, values, lr]
    return Message(KIND_STEP, run, rank, world, instance, seq, step, epoch, wall, dropped,
                   body, tensors)
