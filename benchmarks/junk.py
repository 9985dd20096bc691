"""Malformed and hostile messages, each labelled with what the collector must do with it.

    script = junk_script("junk", per_kind=20, seed=0)
    for item in script:
        push.send_multipart(item.frames)
    expected_rejects(script)    # {"bad_msgpack": 31, "size_mismatch": 40, ...}
    charged_to_run(script)      # what the run's summary/rejected must say
    expected_gaps(script)       # sequence numbers the junk used up

The script is one run (world size 1): a valid start (hello, config, steps, epoch 1), then
``per_kind`` messages of each kind of junk, then steps with NaN/Inf losses (data, not
junk: accepted, and the rules report them), epoch 2 and a goodbye. A reject is charged to
the run when the run's name was readable before the message failed. Every junk message
with a header takes a fresh sequence number, so each one is judged on its own (one that
slipped through cannot turn the rest into duplicates); the valid messages' numbers skip
them, and those gaps are the junk's, not losses.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, NamedTuple

import msgpack

from trainer_client import wire

__all__ = ["ACCEPT", "Item", "charged_to_run", "expected_gaps", "expected_rejects",
           "junk_script"]

ACCEPT = "accept"
INSTANCE = 424242
CHANNELS = ["knee_angle_r", "grf_vz_r", "hip_angle_r", "ankle_angle_r",
            "knee_angle_l", "grf_vz_l", "hip_angle_l", "ankle_angle_l"]
_STEP_BODY = [0.5, 1.0, ["simple", "vel"], [0.3, 0.2]]


class Item(NamedTuple):
    kind: str  # which kind of junk (or "valid")
    frames: list[bytes]
    expect: str  # ACCEPT or the reject reason the collector must count
    charged: bool  # the reject is charged to the run (summary/rejected)
    seq: int | None = None  # a valid message's sequence number


def expected_rejects(script: list[Item]) -> dict[str, int]:
    return dict(Counter(i.expect for i in script if i.expect != ACCEPT))


def charged_to_run(script: list[Item]) -> int:
    return sum(1 for i in script if i.expect != ACCEPT and i.charged)


def expected_gaps(script: list[Item]) -> int:
    """Sequence numbers below the last valid message's that no valid message used."""
    seqs = [i.seq for i in script if i.seq is not None]
    return max(seqs) + 1 - len(seqs) if seqs else 0


class _Builder:
    """Messages of one run; every message, valid or not, takes the next sequence number."""

    def __init__(self, run: str, rng: random.Random) -> None:
        self.run = run
        self.rng = rng
        self.seq = -1  # the last number handed out
        self.step = 0
        self.epoch = 1
        self.items: list[Item] = []

    def header(self, kind: int, body: Any, specs: list | None = None, **kw: Any) -> list:
        """The 13 header fields (index = wire position) with a fresh seq; ``f<i>=`` overrides."""
        self.seq += 1
        fields = [wire.VERSION, kind, self.run, 0, 1, INSTANCE, self.seq, self.step,
                  self.epoch, 1.7e9 + self.seq, 0, body, specs or []]
        for i, v in kw.items():
            fields[int(i[1:])] = v
        return fields

    def frames(self, kind: int, body: Any, tensors: list[wire.Tensor] = (), **kw: Any
               ) -> list[bytes]:
        specs = [[t.name, t.dtype, list(t.shape)] for t in tensors]
        h = self.header(kind, body, specs, **kw)
        return [msgpack.packb(h, use_bin_type=True), *(bytes(t.data) for t in tensors)]

    def valid(self, kind: int, body: Any, tensors: list[wire.Tensor] = (),
              epoch: int | None = None) -> list[bytes]:
        if kind == wire.KIND_STEP:
            self.step += 1
        self.seq += 1
        h = wire.Header(kind, self.run, 0, 1, INSTANCE, self.seq, self.step,
                        self.epoch if epoch is None else epoch, 1.7e9 + self.seq, 0, body)
        frames = [bytes(f) for f in wire.encode(h, list(tensors))]
        self.items.append(Item("valid", frames, ACCEPT, False, self.seq))
        return frames

    def bad(self, kind: str, frames: list[bytes], expect: str, charged: bool) -> None:
        self.items.append(Item(kind, frames, expect, charged))


def _samples(shape: tuple[int, ...], dtype: str = "float32", short: int = 0) -> wire.Tensor:
    n = wire.DTYPES[dtype]
    for d in shape:
        n *= d
    return wire.Tensor("samples", dtype, shape, bytes(max(0, n - short)))


def _random_frames(b: _Builder) -> None:
    head = bytes(b.rng.getrandbits(8) for _ in range(b.rng.randint(0, 300)))
    extra = [bytes(b.rng.getrandbits(8) for _ in range(b.rng.randint(0, 64)))
             for _ in range(b.rng.randint(0, 2))]
    try:
        h = msgpack.unpackb(head, raw=False, strict_map_key=True)
    except Exception:
        reason = "bad_msgpack"
    else:
        if isinstance(h, list) and len(h) == 13:
            return  # a random valid-looking header: not junk we can label, skip it
        reason = "bad_header"
    b.bad("random bytes", [head, *extra], reason, False)


def _truncated(b: _Builder) -> None:
    full = b.frames(wire.KIND_STEP, _STEP_BODY)[0]
    b.bad("truncated msgpack", [full[:b.rng.randrange(len(full))]], "bad_msgpack", False)


def _wrong_types() -> list[tuple[dict, str, bool]]:
    """(field overrides, reason, charged): one wrong type per field."""
    s = wire.KIND_STEP
    return [
        ({"f0": "1"}, "bad_version", False), ({"f0": 1.0}, "bad_version", False),
        ({"f0": True}, "bad_version", False),
        ({"f1": "step"}, "bad_kind", True), ({"f1": float(s)}, "bad_kind", True),
        ({"f1": True}, "bad_kind", True), ({"f1": None}, "bad_kind", True),
        ({"f2": 42}, "bad_field", False), ({"f2": b"\x00run"}, "bad_field", False),
        ({"f2": ""}, "bad_field", False), ({"f2": "r" * 300}, "bad_field", False),
        ({"f3": "0"}, "bad_field", True), ({"f3": 1}, "bad_field", True),
        ({"f3": -1}, "bad_field", True), ({"f4": 0}, "bad_field", True),
        ({"f4": (1 << 20) + 1, "f3": 0}, "bad_field", True), ({"f4": True}, "bad_field", True),
        ({"f5": -1}, "bad_field", True), ({"f6": "7"}, "bad_field", True),
        ({"f7": 1.5}, "bad_field", True), ({"f10": None}, "bad_field", True),
        ({"f10": -3}, "bad_field", True),
        ({"f8": "1"}, "bad_epoch", True), ({"f8": 1.0}, "bad_epoch", True),
        ({"f9": 17}, "bad_field", True), ({"f9": float("nan")}, "bad_field", True),
        ({"f9": float("inf")}, "bad_field", True), ({"f9": "now"}, "bad_field", True),
        ({"f11": {"loss": 1.0}}, "bad_body", True), ({"f11": [1.0]}, "bad_body", True),
        ({"f11": ["x", None, [], []]}, "bad_body", True),
        ({"f11": [1.0, "1", [], []]}, "bad_body", True),
        ({"f11": [1.0, None, [1], [1.0]]}, "bad_body", True),
        ({"f11": [1.0, None, ["a"], ["x"]]}, "bad_body", True),
        ({"f11": [1.0, None, ["a", "b"], [1.0]]}, "bad_body", True),
        ({"f12": {}}, "bad_tensors", True), ({"f12": "x"}, "bad_tensors", True),
    ]


def _wrong_type(b: _Builder, variant: int) -> None:
    cases = _wrong_types()
    if variant < len(cases):
        over, reason, charged = cases[variant]
        b.bad("wrong types", b.frames(wire.KIND_STEP, _STEP_BODY, **over), reason, charged)
        return
    # Other shapes of wrong: the header itself, and the bodies of the other kinds.
    h = b.header(wire.KIND_STEP, _STEP_BODY)
    others = [
        ([msgpack.packb({str(i): v for i, v in enumerate(h)})], "bad_header", False),
        ([msgpack.packb(h[:12])], "bad_header", False),
        ([msgpack.packb("a header")], "bad_header", False),
        (b.frames(wire.KIND_HELLO, {"env": {"WANDB_PROJECT": 3}}), "bad_body", True),
        (b.frames(wire.KIND_CONFIG, {"config": [1, 2]}), "bad_body", True),
        (b.frames(wire.KIND_EPOCH, {"weights": [1.0, 2.0]}), "bad_body", True),
        (b.frames(wire.KIND_EPOCH, {"param_names": [1, 2]}), "bad_body", True),
        (b.frames(wire.KIND_BYE, ["bye"]), "bad_body", True),
        (b.frames(wire.KIND_VALIDATION, {"epoch": "one"}, [_samples((4, 2))]), "bad_body", True),
        (b.frames(wire.KIND_DATA, {"index": 3, "count": 2, "channels": ["a"]},
                  [wire.Tensor("chunk", "float32", (2, 1), bytes(8))]), "bad_body", True),
    ]
    frames, reason, charged = others[(variant - len(cases)) % len(others)]
    b.bad("wrong types", frames, reason, charged)


def _kind_or_version(b: _Builder, variant: int) -> None:
    kinds = [0, 8, 99, 255, -1, 1 << 40]
    versions = [0, 2, 99, -1, 1 << 40]
    if variant % 2 == 0:
        k = kinds[(variant // 2) % len(kinds)]
        b.bad("unknown kinds/versions", b.frames(k, _STEP_BODY), "bad_kind", True)
    else:
        v = versions[(variant // 2) % len(versions)]
        b.bad("unknown kinds/versions", b.frames(wire.KIND_STEP, _STEP_BODY, f0=v),
              "bad_version", False)


def _mismatch(b: _Builder, variant: int) -> None:
    v, s = wire.KIND_VALIDATION, wire.KIND_STEP
    val = {"epoch": 2, "channels": CHANNELS}
    d = wire.KIND_DATA
    chunk3 = wire.Tensor("chunk", "float32", (4, 3), bytes(48))
    f64 = wire.Tensor("mean", "float64", (3,), bytes(24))
    cases = [
        (b.frames(v, val, [_samples((64, 128, 8), short=1)]), "size_mismatch"),
        (b.frames(v, val, [_samples((64, 128, 8), short=-4)]), "size_mismatch"),
        (b.frames(v, val, [_samples((64, 128, 8))])[:1] + [bytes(64 * 128 * 8 * 2)],
         "size_mismatch"),  # declared float32, sent as float16
        (b.frames(v, val, [wire.Tensor("samples", "int8", (4, 8), bytes(32))]), "bad_tensors"),
        (b.frames(v, val, [wire.Tensor("samples", "complex64", (4, 8), bytes(256))]),
         "bad_tensors"),
        (b.frames(v, val, [wire.Tensor("samples", "int32", (4, 8), bytes(128))]), "bad_body"),
        (b.frames(v, {"epoch": 2, "channels": CHANNELS[:3]}, [_samples((64, 128, 8))]),
         "size_mismatch"),
        (b.frames(v, val, [_samples((4, 8)), _samples((4, 8))]), "bad_tensors"),  # same name
        (b.frames(v, val, [_samples((4, 8))])[:1], "bad_tensors"),  # a frame missing
        (b.frames(v, val, [_samples((4, 8))]) + [b"extra"], "bad_tensors"),
        (b.frames(s, _STEP_BODY, [wire.Tensor("param_norms", "float64", (3,), bytes(24))]),
         "bad_tensors"),
        (b.frames(s, _STEP_BODY, [wire.Tensor("param_norms", "float32", (3, 2), bytes(24))]),
         "bad_tensors"),
        (b.frames(d, {"index": 0, "count": 1, "channels": ["a", "b"]}, [chunk3]),
         "size_mismatch"),
        (b.frames(d, {"index": 0, "count": 1, "channels": ["a", "b", "c"]},
                  [wire.Tensor("chunk", "int32", (4, 3), bytes(48))]), "bad_tensors"),
        (b.frames(d, {"index": 0, "count": 1, "channels": ["a", "b", "c"]},
                  [chunk3, f64._replace(shape=(2,), data=bytes(16))]), "size_mismatch"),
        (b.frames(d, {"index": 0, "count": 1, "channels": ["a", "b", "c"]},
                  [chunk3, f64._replace(dtype="float32", data=bytes(12))]), "bad_tensors"),
    ]
    frames, reason = cases[variant % len(cases)]
    b.bad("shape/dtype/size mismatches", frames, reason, True)


def _huge(b: _Builder, variant: int) -> None:
    cases = [
        ((1 << 40, 1 << 40, 8), 64, "size_mismatch"),
        (((1 << 63) - 1,), 4, "size_mismatch"),
        (((1 << 64) - 1, (1 << 64) - 1), 4, "size_mismatch"),
        ((2,) * (wire.MAX_DIMS + 1), 4 << (wire.MAX_DIMS + 1), "bad_tensors"),
        ((-64, 128, 8), 4, "bad_tensors"),
        ((64, 1.5, 8), 4, "bad_tensors"),
    ]
    shape, nbytes, reason = cases[variant % len(cases)]
    head = b.header(wire.KIND_VALIDATION, {"epoch": 2})
    head[12] = [["samples", "float32", list(shape)]]
    b.bad("huge declared shapes", [msgpack.packb(head), bytes(nbytes)], reason, True)


def _epochs(b: _Builder, variant: int) -> None:
    if variant % 3 == 0:
        b.bad("negative/out-of-order epochs", b.frames(wire.KIND_EPOCH, {}, f8=-1 - variant),
              "bad_epoch", True)
    else:
        # epoch 1 was closed already (and 0 precedes it): the state refuses both
        b.bad("negative/out-of-order epochs", b.frames(wire.KIND_EPOCH, {}, f8=variant % 2),
              "epoch_out_of_order", True)


def _duplicates(b: _Builder, variant: int, accepted: list[list[bytes]]) -> None:
    b.bad("duplicate sequence numbers", accepted[variant % len(accepted)], "duplicate_seq",
          True)


def junk_script(run: str, per_kind: int = 20, seed: int = 0) -> list[Item]:
    """The whole scripted conversation; see the module docstring."""
    b = _Builder(run, random.Random(seed))
    accepted = [b.valid(wire.KIND_HELLO, {"host": "junk", "pid": 1, "env": {}}),
                b.valid(wire.KIND_CONFIG, {"config": {"learning_rate": 1e-3}, "num_params": 10})]
    for _ in range(5):
        accepted.append(b.valid(wire.KIND_STEP, _STEP_BODY))
    accepted.append(b.valid(wire.KIND_EPOCH, {}, epoch=1))
    b.epoch = 2
    for i in range(per_kind):
        while True:  # random bytes that happen to be a labelled header are skipped
            n = len(b.items)
            _random_frames(b)
            if len(b.items) > n:
                break
        _truncated(b)
        _kind_or_version(b, i)
        _epochs(b, i)
        _duplicates(b, i, accepted)
    for i in range(max(per_kind, len(_wrong_types()) + 10)):
        _wrong_type(b, i)
    for i in range(max(per_kind, 16)):
        _mismatch(b, i)
    for i in range(max(per_kind, 6)):
        _huge(b, i)
    # NaN/Inf are data: accepted, and the nonfinite rule must fire for epoch 2.
    for loss, gn in ((float("nan"), 1.0), (float("inf"), 1.0), (1.0, float("-inf")),
                     (float("nan"), float("nan"))):
        b.valid(wire.KIND_STEP, [loss, gn, ["simple", "vel"], [loss, 0.1]])
        b.items[-1] = b.items[-1]._replace(kind="NaN/Inf losses (data)")
    b.valid(wire.KIND_EPOCH, {}, epoch=2)
    b.valid(wire.KIND_BYE, {"stats": {"sent": b.seq + 1}})
    return b.items
