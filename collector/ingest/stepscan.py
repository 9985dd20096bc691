"""Bulk parsing of binary step frames: the ingest and replay fast path, in numba.

A batch is many messages laid end to end in one byte buffer (``buf``; message ``i`` is
``buf[offs[i]:offs[i] + lens[i]]``, its first frame; ``nfr[i]`` frames in all). One call
reads every step frame's fields into columns. A message is marked ``fast`` only if it is
a well-formed binary step that ``wire.decode`` would accept with the same values *and*
that needs nothing but appending (finite loss and gradient norm: a non-finite one raises
an event on its own). Everything else goes through the per-message path, which decides
and explains.

Streams (one client instance of one rank of one run) are told apart by a 64-bit FNV-1a
key of (run, rank, instance); the collector checks the run's bytes against the stream it
registered from a decoded message before trusting a key.
"""

from __future__ import annotations

import re
import struct
from typing import NamedTuple

import numpy as np
from numba import njit

from trainer_client import wire

__all__ = ["Groups", "Steps", "admit", "gather_pnorms", "group_rows", "parse_steps",
           "stream_key", "warm_up"]

def _field_offsets(layout: struct.Struct) -> list[int]:
    """Each field's byte offset in a little-endian struct without padding."""
    codes = "".join(c * int(n or 1) for n, c in re.findall(r"(\d*)([a-zA-Z])", layout.format))
    return [struct.calcsize("<" + codes[:k]) for k in range(len(codes))]


# Where the binary step's fields sit (``wire.STEP_LAYOUT``), named for the parser.
_AT = dict(zip(wire.STEP_FIELDS, _field_offsets(wire.STEP_LAYOUT), strict=True))
_TAG, _VERSION, _FLAGS = _AT["tag"], _AT["version"], _AT["flags"]
_RUN_LEN, _N_COMP, _NAMES_LEN, _N_PN = _AT["run_len"], _AT["n_comp"], _AT["names_len"], _AT["n_pn"]
_RANK, _WORLD, _U64S = _AT["rank"], _AT["world"], _AT["instance"]  # 5 u64s from instance on
_WALL, _LOSS, _GN, _LR = _AT["wall"], _AT["loss"], _AT["grad_norm"], _AT["lr"]
_FIXED = wire.STEP_LAYOUT.size
_MAGIC, _TAG_BYTE, _VERSION_BYTE = wire.STEP_MAGIC, wire.STEP_TAG, wire.STEP_VERSION
_HAS_GN, _HAS_PN, _HAS_LR = wire.STEP_HAS_GN, wire.STEP_HAS_PN, wire.STEP_HAS_LR
_UNKNOWN_FLAGS = 0xFF & ~wire.STEP_FLAGS

# Columns of ``Steps.ints`` (the five u64s from ``instance`` on are read in order), of
# ``Steps.floats``, and of the (offset, count) pairs in ``*_at``.
RANK, WORLD, INSTANCE, SEQ, STEP, EPOCH, DROPPED = range(7)
WALL, LOSS, GRAD_NORM, LR = range(4)
AT, COUNT = 0, 1
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


class Steps(NamedTuple):
    """Columns for a batch; rows of messages that are not ``fast`` hold nothing useful."""

    fast: np.ndarray  # bool
    ints: np.ndarray  # (n, 7) int64: RANK, WORLD, INSTANCE, SEQ, STEP, EPOCH, DROPPED
    floats: np.ndarray  # (n, 4) float64: WALL, LOSS, GRAD_NORM, LR (NaN when absent)
    key: np.ndarray  # uint64 stream key
    names_key: np.ndarray  # uint64 key of the names region
    names_at: np.ndarray  # (n, 2) int64: offset, length of the names region in buf
    run_at: np.ndarray  # (n, 2) int64: offset, length of the run in buf
    comp_at: np.ndarray  # (n, 2) int64: offset of the values in ``comps``, count
    comps: np.ndarray  # float64, every fast message's component values in order
    pn_at: np.ndarray  # (n, 2) int64: offset (in buf), count of float32 param norms (-1: none)


@njit(cache=True, inline="always")
def _u(buf: np.ndarray, o: int, n: int) -> int:
    """A little-endian unsigned field as int64 (callers check the top bit of 8-byte ones)."""
    v = np.int64(0)
    for k in range(n):
        v |= np.int64(buf[o + k]) << np.int64(8 * k)
    return v


@njit(cache=True, inline="always")
def _f(buf: np.ndarray, o: int, scratch: np.ndarray, as_f64: np.ndarray) -> float:
    """A float64 at any (unaligned) offset: copy its bytes under a float64 view."""
    for k in range(8):
        scratch[k] = buf[o + k]
    return as_f64[0]


@njit(cache=True, inline="always")
def _fnv(h: np.uint64, buf: np.ndarray, o: int, n: int) -> np.uint64:
    for k in range(n):
        h = (h ^ np.uint64(buf[o + k])) * _FNV_PRIME
    return h


@njit(cache=True, inline="always")
def _fnv_int(h: np.uint64, v: np.uint64) -> np.uint64:
    for k in range(8):
        h = (h ^ ((v >> np.uint64(8 * k)) & np.uint64(0xFF))) * _FNV_PRIME
    return h


@njit(cache=True)
def _key(run: np.ndarray, o: int, n: int, rank: int, instance: int) -> np.uint64:
    return _fnv_int(_fnv_int(_fnv(_FNV_OFFSET, run, o, n), np.uint64(rank)),
                    np.uint64(instance))


def stream_key(run: str, rank: int, instance: int) -> int:
    """The key ``parse_steps`` gives a (run, rank, instance) stream."""
    raw = np.frombuffer(run.encode(), np.uint8)
    return int(_key(raw, 0, len(raw), rank, instance))


@njit(cache=True)
def _parse(buf, offs, lens, nfr, max_world, max_run):  # noqa: ANN001, ANN202 - numba
    n = len(offs)
    fast = np.zeros(n, np.bool_)
    ints = np.zeros((n, 7), np.int64)
    floats = np.zeros((n, 4), np.float64)
    key = np.zeros(n, np.uint64)
    names_key = np.zeros(n, np.uint64)
    names_at = np.zeros((n, 2), np.int64)
    run_at = np.zeros((n, 2), np.int64)
    comp_at = np.zeros((n, 2), np.int64)
    pn_at = np.zeros((n, 2), np.int64)
    total = 0
    for i in range(n):
        if nfr[i] == 1 and lens[i] >= _FIXED and buf[offs[i]] == _MAGIC:
            total += min(_u(buf, offs[i] + _N_COMP, 2), (lens[i] - _FIXED) // 8)  # <= size
    comps = np.empty(total, np.float64)
    scratch = np.empty(8, np.uint8)
    as_f64 = scratch.view(np.float64)
    c = 0
    for i in range(n):
        o, size = offs[i], lens[i]
        if nfr[i] != 1 or size < _FIXED or buf[o] != _MAGIC or buf[o + _TAG] != _TAG_BYTE \
                or buf[o + _VERSION] != _VERSION_BYTE:
            continue
        flags = buf[o + _FLAGS]
        run_len = _u(buf, o + _RUN_LEN, 2)
        n_comp = _u(buf, o + _N_COMP, 2)
        names_len = _u(buf, o + _NAMES_LEN, 4)
        n_pn = _u(buf, o + _N_PN, 4)
        rank = _u(buf, o + _RANK, 4)
        world = _u(buf, o + _WORLD, 4)
        if flags & _UNKNOWN_FLAGS or (n_pn > 0 and not flags & _HAS_PN):
            continue
        if _FIXED + 8 * n_comp + 4 * n_pn + run_len + names_len != size:
            continue
        if run_len == 0 or run_len > max_run or not rank < world <= max_world:
            continue
        bad = False
        for k in range(5):  # instance, seq, step, epoch, dropped
            if buf[o + _U64S + 8 * k + 7] & 0x80:  # >= 2**63
                bad = True
            ints[i, INSTANCE + k] = _u(buf, o + _U64S + 8 * k, 8)
        wall = _f(buf, o + _WALL, scratch, as_f64)
        loss = _f(buf, o + _LOSS, scratch, as_f64)
        gn = _f(buf, o + _GN, scratch, as_f64) if flags & _HAS_GN else np.nan
        lr = _f(buf, o + _LR, scratch, as_f64) if flags & _HAS_LR else np.nan
        if bad or not np.isfinite(wall) or not np.isfinite(loss) \
                or (flags & _HAS_GN and not np.isfinite(gn)) \
                or (flags & _HAS_LR and not np.isfinite(lr)):
            continue
        # The names region must be exactly n_comp (u16 length, bytes) entries.
        r0 = o + _FIXED + 8 * n_comp + 4 * n_pn
        p = r0 + run_len
        end = o + size
        for _ in range(n_comp):
            if p + 2 > end:
                bad = True
                break
            p += 2 + _u(buf, p, 2)
        if bad or p != end:
            continue
        fast[i] = True
        ints[i, RANK] = rank
        ints[i, WORLD] = world
        floats[i, WALL] = wall
        floats[i, LOSS] = loss
        floats[i, GRAD_NORM] = gn
        floats[i, LR] = lr
        run_at[i, AT] = r0
        run_at[i, COUNT] = run_len
        names_at[i, AT] = r0 + run_len
        names_at[i, COUNT] = names_len
        key[i] = _key(buf, r0, run_len, rank, ints[i, INSTANCE])
        names_key[i] = _fnv_int(_fnv(_FNV_OFFSET, buf, r0 + run_len, names_len),
                                np.uint64(n_comp))
        comp_at[i, AT] = c
        comp_at[i, COUNT] = n_comp
        for k in range(n_comp):
            comps[c] = _f(buf, o + _FIXED + 8 * k, scratch, as_f64)
            c += 1
        pn_at[i, AT] = o + _FIXED + 8 * n_comp
        pn_at[i, COUNT] = n_pn if flags & _HAS_PN else -1
    return fast, ints, floats, key, names_key, names_at, run_at, comp_at, comps[:c], pn_at


def parse_steps(buf: np.ndarray, offs: np.ndarray, lens: np.ndarray, nfr: np.ndarray,
                max_world: int = wire.MAX_WORLD) -> Steps:
    """Read every binary step frame of a batch (see the module's docstring); a step that
    claims more than ``max_world`` ranks is left to the per-message path (which refuses)."""
    return Steps(*_parse(buf, offs, lens, nfr, min(max_world, wire.MAX_WORLD),
                         wire.MAX_RUN_LEN))


@njit(cache=True)
def admit(stream: np.ndarray, seq: np.ndarray, last_seq: np.ndarray) -> int:
    """Sequence numbers must rise per stream: the count of leading messages that do.

    ``last_seq`` (per stream) is advanced over exactly those messages.
    """
    for i in range(len(stream)):
        s = stream[i]
        if seq[i] <= last_seq[s]:
            return i
        last_seq[s] = seq[i]
    return len(stream)


class Groups(NamedTuple):
    """A stretch of admitted fast steps, regrouped stream by stream (arrival order kept).

    Stream ``j`` owns positions ``bounds[j]:bounds[j+1]`` of ``rows``/``step``/``loss``/
    ``grad_norm``, values ``comps[comp_bounds[j]:comp_bounds[j+1]]``, and the positions
    ``changes[change_bounds[j]:change_bounds[j+1]]`` where its names start or change.
    """

    rows: np.ndarray  # absolute message indices
    bounds: np.ndarray
    step: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    lr: np.ndarray
    comps: np.ndarray
    comp_bounds: np.ndarray
    changes: np.ndarray
    change_bounds: np.ndarray
    last_seq: np.ndarray  # per stream
    max_dropped: np.ndarray
    max_world: np.ndarray
    last_wall: np.ndarray
    pn_rows: np.ndarray  # per stream: how many of its steps carry param norms


@njit(cache=True)
def _group(sidx, nidx, n_streams, a, ints, floats, comps, comp_at, pn_at):  # noqa: ANN001, ANN202
    m = len(sidx)
    bounds = np.zeros(n_streams + 1, np.int64)
    total = 0
    for i in range(m):
        bounds[sidx[i] + 1] += 1
        total += comp_at[a + i, COUNT]
    for j in range(n_streams):
        bounds[j + 1] += bounds[j]
    fill = bounds[:-1].copy()
    rows = np.empty(m, np.int64)
    for i in range(m):  # a counting sort: stable, so each stream keeps its order
        rows[fill[sidx[i]]] = a + i
        fill[sidx[i]] += 1
    step = np.empty(m, np.int64)
    loss = np.empty(m, np.float64)
    gn = np.empty(m, np.float64)
    lr = np.empty(m, np.float64)
    out = np.empty(total, np.float64)
    comp_bounds = np.zeros(n_streams + 1, np.int64)
    changes = np.empty(m, np.int64)
    change_bounds = np.zeros(n_streams + 1, np.int64)
    last_seq = np.full(n_streams, -1, np.int64)
    max_dropped = np.zeros(n_streams, np.int64)
    max_world = np.zeros(n_streams, np.int64)
    last_wall = np.zeros(n_streams, np.float64)
    pn_rows = np.zeros(n_streams, np.int64)
    c = nch = 0
    for j in range(n_streams):
        comp_bounds[j] = c
        change_bounds[j] = nch
        prev = -1
        for p in range(bounds[j], bounds[j + 1]):
            r = rows[p]
            step[p] = ints[r, STEP]
            loss[p] = floats[r, LOSS]
            gn[p] = floats[r, GRAD_NORM]
            lr[p] = floats[r, LR]
            for k in range(comp_at[r, COUNT]):
                out[c] = comps[comp_at[r, AT] + k]
                c += 1
            if nidx[r - a] != prev:
                prev = nidx[r - a]
                changes[nch] = p
                nch += 1
            last_seq[j] = ints[r, SEQ]
            max_dropped[j] = max(max_dropped[j], ints[r, DROPPED])
            max_world[j] = max(max_world[j], ints[r, WORLD])
            last_wall[j] = floats[r, WALL]
            if pn_at[r, COUNT] >= 0:
                pn_rows[j] += 1
    comp_bounds[n_streams] = c
    change_bounds[n_streams] = nch
    return (rows, bounds, step, loss, gn, lr, out, comp_bounds, changes[:nch], change_bounds,
            last_seq, max_dropped, max_world, last_wall, pn_rows)


def group_rows(s: Steps, a: int, sidx: np.ndarray, nidx: np.ndarray, n_streams: int
               ) -> Groups:
    """Regroup fast steps ``a, a+1, ...`` (stream ``sidx``, names ``nidx`` each) by stream."""
    return Groups(*_group(sidx, nidx, n_streams, a, s.ints, s.floats, s.comps, s.comp_at,
                          s.pn_at))


@njit(cache=True)
def gather_pnorms(buf: np.ndarray, at: np.ndarray, rows: np.ndarray, width: int) -> np.ndarray:
    """The rows' float32 param norms as a (len(rows), width) matrix (all of that width)."""
    out = np.empty((len(rows), width), np.float32)
    raw = out.reshape(-1).view(np.uint8)
    for j in range(len(rows)):
        o = at[rows[j], AT]
        for k in range(4 * width):
            raw[4 * width * j + k] = buf[o + k]
    return out


def warm_up() -> None:
    """Compile (or load) the kernels for the types ingest uses."""
    from trainer_client import wire as w

    h = w.Header(w.KIND_STEP, "w", 0, 1, 1, 1, 1, 0, 0.0, 0, [0.5, 1.0, ["a"], [0.1]])
    frame = w.encode_step(h, [w.Tensor("param_norms", "float32", (1,), b"\0\0\0\0")])
    buf = np.frombuffer(frame, np.uint8)
    z = np.zeros(1, np.int64)
    s = parse_steps(buf, z, np.array([len(frame)], np.int64), np.ones(1, np.int64))
    rows = np.zeros(1, np.int64)
    admit(z, s.ints[:, 3], np.full(1, -1, np.int64))
    group_rows(s, 0, z, z, 1)
    gather_pnorms(buf, s.pn_at, rows, 1)
    stream_key("w", 0, 1)
