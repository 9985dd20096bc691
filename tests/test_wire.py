"""The wire format: round trips, and every malformed message rejected with a reason."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_client import wire


def _header(kind=wire.KIND_STEP, body=None, **kw):
    base = dict(kind=kind, run="r", rank=0, world_size=2, instance=7, seq=3, step=4, epoch=1,
                wall_time=1.5, dropped=0, body=[0.5, 1.0, ["a"], [0.25]] if body is None
                else body)
    base.update(kw)
    return wire.Header(**base)


def test_step_round_trip_with_raw_tensor():
    pn = np.arange(5, dtype=np.float32)
    frames = wire.encode(_header(), [wire.Tensor("param_norms", "float32", (5,), pn.tobytes())])
    m = wire.decode([bytes(f) for f in frames])
    assert (m.kind, m.run, m.rank, m.world_size, m.seq, m.step, m.epoch) == (
        wire.KIND_STEP, "r", 0, 2, 3, 4, 1)
    assert m.body == [0.5, 1.0, ["a"], [0.25], None]
    assert np.array_equal(np.frombuffer(m.tensors["param_norms"].data, np.float32), pn)


def test_header_is_a_positional_array_not_a_map():
    head = msgpack.unpackb(wire.encode(_header(wire.KIND_EPOCH, {}), [])[0])
    assert isinstance(head, list) and head[0] == wire.VERSION


def test_a_step_is_one_binary_frame_and_reads_like_the_msgpack_layout():
    pn = wire.Tensor("param_norms", "float32", (3,), np.arange(3, dtype=np.float32).tobytes())
    h = _header(body=[0.5, None, ["simple", "vélo"], [0.25, float("inf")]])
    frames = wire.encode(h, [pn])
    assert len(frames) == 1 and frames[0][0] == wire.STEP_MAGIC
    binary = wire.decode(frames)
    legacy = wire.decode(_frames(h, [["param_norms", "float32", [3]]], [pn.data]))
    assert binary[:11] == legacy[:11]
    assert binary.body == [0.5, None, ["simple", "vélo"], [0.25, float("inf")], None]
    assert bytes(binary.tensors["param_norms"].data) == pn.data
    no_pn = wire.decode(wire.encode(h, []))
    assert no_pn.tensors == {} and no_pn.body[1] is None


def test_a_step_carries_the_learning_rate_and_version_1_steps_still_read():
    h = _header(body=[0.5, 1.0, ["a"], [0.25], 3e-4])
    assert wire.decode(wire.encode(h, [])).body == [0.5, 1.0, ["a"], [0.25], 3e-4]
    assert wire.decode(_frames(h)).body[4] == 3e-4  # msgpack steps may carry it too
    # A version-1 frame (before lr): the fixed part without lr, read by the same decoder.
    v2 = wire.encode(_header(), [])[0]
    fields = list(wire.STEP_LAYOUT.unpack_from(v2))
    fields[2], fields[3] = 1, fields[3] & ~wire.STEP_HAS_LR
    v1 = wire.STEP_LAYOUT_V1.pack(*fields[:-1]) + v2[wire.STEP_LAYOUT.size:]
    assert wire.decode([v1]).body == [0.5, 1.0, ["a"], [0.25], None]
    fields[3] |= wire.STEP_HAS_LR  # version 1 had no lr flag
    v1 = wire.STEP_LAYOUT_V1.pack(*fields[:-1]) + v2[wire.STEP_LAYOUT.size:]
    assert _bad([v1]) == "size_mismatch"


def _step_frame(**kw):
    return bytearray(wire.encode(_header(**kw), [])[0])


def _patch(frame, field, value):
    """``frame`` with one fixed field of the binary step layout replaced."""
    fields = list(wire.STEP_LAYOUT.unpack_from(frame))
    fields[field] = value
    wire.STEP_LAYOUT.pack_into(frame, 0, *fields)
    return bytes(frame)


@pytest.mark.parametrize("field,value,reason", [
    (1, 0x54, "bad_kind"),
    (2, 9, "bad_version"),
    (3, 8, "size_mismatch"),  # an unknown flag
    (5, 3, "size_mismatch"),  # more components than the frame holds
    (4, 0, "bad_field"),  # an empty run... and so the lengths no longer add up either
    (8, 2, "bad_field"),  # rank == world
    (9, (1 << 20) + 1, "bad_field"),  # world too large
    (11, 1 << 63, "bad_field"),  # a seq that does not fit int64
    (15, float("nan"), "bad_field"),  # wall time
])
def test_malformed_binary_steps_are_rejected_with_reasons(field, value, reason):
    frame = _patch(_step_frame(), field, value)
    got = _bad([frame])
    assert got == reason or (field == 4 and got == "size_mismatch")


def test_a_names_region_must_hold_exactly_as_many_names_as_values():
    good = bytes(_step_frame(body=[0.5, 1.0, ["a", "b"], [0.1, 0.2]]))
    assert wire.decode([good]).body[2] == ["a", "b"]  # now the decoder has seen this region
    # the same region under n_comp = 1, one value less: the sizes still add up
    fields = list(wire.STEP_LAYOUT.unpack_from(good))
    fields[5] = 1
    forged = bytearray(good[:wire.STEP_LAYOUT.size + 8] + good[wire.STEP_LAYOUT.size + 16:])
    wire.STEP_LAYOUT.pack_into(forged, 0, *fields)
    assert _bad([bytes(forged)]) == "size_mismatch"


def test_binary_step_framing_errors():
    frame = bytes(_step_frame())
    assert _bad([frame[:40]]) == "bad_header"  # shorter than the fixed part
    assert _bad([frame, b"extra"]) == "bad_header"  # a step is one frame
    assert _bad([frame[:-1]]) == "size_mismatch"
    bad_utf8 = bytes(_step_frame(run="r\u00e9"))
    assert _bad([bad_utf8.replace("é".encode(), b"\xff\xfe")]) == "bad_field"
    # NaN and Inf losses are data, not junk: the rules report them
    assert np.isnan(wire.decode([bytes(_step_frame(body=[float("nan"), None, [], []]))]).body[0])


def test_wire_imports_without_torch():
    code = ("import sys; import trainer_client.wire, collector.ingest.pipeline; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def _bad(frames):
    with pytest.raises(wire.DecodeError) as e:
        wire.decode(frames)
    return e.value.reason


def _frames(h, specs=None, extra=()):
    head = [wire.VERSION, *h, [] if specs is None else specs]
    return [msgpack.packb(head), *extra]


@pytest.mark.parametrize("mutate,reason", [
    (lambda h: h._replace(run=""), "bad_field"),
    (lambda h: h._replace(rank=2), "bad_field"),
    (lambda h: h._replace(world_size=0), "bad_field"),
    (lambda h: h._replace(seq=-1), "bad_field"),
    (lambda h: h._replace(epoch=-3), "bad_epoch"),
    (lambda h: h._replace(wall_time=float("nan")), "bad_field"),
    (lambda h: h._replace(kind=99), "bad_kind"),
    (lambda h: h._replace(body=[0.5, 1.0, ["a", "b"], [0.25]]), "bad_body"),
    (lambda h: h._replace(body=["x", 1.0, [], []]), "bad_body"),
    (lambda h: h._replace(kind=wire.KIND_EPOCH, body={"weights": [1, 2]}), "bad_body"),
    (lambda h: h._replace(kind=wire.KIND_CONFIG, body={"config": 3}), "bad_body"),
])
def test_malformed_headers_are_rejected_with_reasons(mutate, reason):
    assert _bad(_frames(mutate(_header()))) == reason


def test_junk_and_version_and_size_mismatches():
    assert _bad([]) == "empty"
    assert _bad([b"\x91\xc1garbage"]) == "bad_msgpack"
    assert _bad([msgpack.packb({"a": 1})]) == "bad_header"
    assert _bad([msgpack.packb([2, *_header(), []])]) == "bad_version"
    # declared 4 float32 = 16 bytes, frame has 12
    assert _bad(_frames(_header(), [["param_norms", "float32", [4]]], [b"\0" * 12])) == \
        "size_mismatch"
    # a huge declared shape cannot allocate anything: it simply does not match
    assert _bad(_frames(_header(), [["param_norms", "float32", [1 << 40, 1 << 40]]],
                        [b"\0" * 8])) == "size_mismatch"
    # ... and an empty one whose other dims no array could have is refused, not reshaped
    assert _bad(_frames(_header(kind=wire.KIND_VALIDATION, body={}),
                        [["samples", "float32", [1 << 40, 1 << 40, 0, 1]]], [b""])) == \
        "bad_tensors"
    assert _bad(_frames(_header(), [["x", "complex64", [1]]], [b"\0" * 8])) == "bad_tensors"
    assert _bad(_frames(_header(), [], [b"extra"])) == "bad_tensors"
    # an ext type (msgpack's timestamp) is never turned into an object we trust
    assert _bad([msgpack.packb([wire.VERSION, *_header()._replace(wall_time=msgpack.Timestamp(1)),
                                []], datetime=False)]) == "bad_field"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_anything_but_decode_error(data):
    try:
        wire.decode([data])
    except wire.DecodeError:
        pass


_INT64 = st.integers(-(2**63), 2**63 - 1)  # what msgpack can pack


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), _INT64, st.floats(), st.text(max_size=5),
                          st.binary(max_size=5), st.lists(_INT64, max_size=3)),
                min_size=13, max_size=13))
def test_random_headers_of_the_right_length_are_validated(fields):
    try:
        wire.decode([msgpack.packb(fields)])
    except wire.DecodeError:
        pass
