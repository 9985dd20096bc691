"""Fuzzing the decoder and the whole pipeline in-process: junk never escapes ``feed``.

Streams of valid messages (several ranks, steps, data chunks, validation samples, epochs)
are interleaved with mutated copies (bit flips, truncations, field swaps, wrong types,
huge shapes) sent under another run. Every valid message must be accepted, every
mutation whose outcome is known must be rejected for its reason, nothing may raise, and
two fresh pipelines fed the same sequence must write identical records.

Bounded: fixed example counts, derandomized so a failure reproduces. For a longer random
search, run ``python tests/workers/fuzz_wire.py -max_total_time=600`` (atheris).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.analysis.profile_load import load_profile
from collector.ingest.batch import Batch
from collector.ingest.pipeline import Pipeline, replay
from collector.recording.writer import RecordWriter
from collector.sinks.jsonl import MemorySink
from trainer_client import wire

ROOT = Path(__file__).resolve().parent.parent
GOOD, MUTANT = "good", "mutant"
FLOATS = ("float16", "bfloat16", "float32", "float64")
TERMS = ["simple", "vel", "fk", "drift", "slide"]
CHANNELS = ["knee_angle_r", "grf_vz_r", "hip_angle_r"]
PROFILE = load_profile(None)
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

Msg = tuple[wire.Header, list[wire.Tensor]]


def _frames(m: Msg) -> list[bytes]:
    return [bytes(f) for f in wire.encode(*m)]


def _legacy_frames(m: Msg) -> list[bytes]:
    """The msgpack layout, for steps too (what recordings made before the binary one hold)."""
    return _pack(_raw(m), m[1])


def _tensor(draw: st.DrawFn, name: str, dtype: str, shape: tuple[int, ...]) -> wire.Tensor:
    n = wire.DTYPES[dtype] * math.prod(shape)
    return wire.Tensor(name, dtype, shape, draw(st.binary(min_size=n, max_size=n)))


# -- valid streams ---------------------------------------------------------------------------
class _RankStream:
    """One rank's messages, numbered as its client would number them."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.msgs: list[Msg] = []

    def add(self, kind: int, body: object, tensors: list[wire.Tensor], epoch: int,
            step: int = 0) -> None:
        seq = len(self.msgs)
        self.msgs.append((wire.Header(kind, GOOD, self.rank, self.world, 1000 + self.rank, seq,
                                      step, epoch, 1.7e9 + seq, 0, body), tensors))


numbers = st.floats(width=64) | st.integers(-(2 ** 63), 2 ** 64 - 1)


@st.composite
def valid_stream(draw: st.DrawFn) -> list[Msg]:
    """One run's messages from 1-3 ranks, each rank in order, the ranks interleaved."""
    world = draw(st.integers(1, 3))
    n_epochs = draw(st.integers(1, 3))
    n_ch = draw(st.integers(1, 3))
    names = draw(st.lists(st.sampled_from(TERMS), max_size=3, unique=True))
    width = draw(st.integers(0, 3))  # per-parameter gradient norms, 0: none
    per_rank: list[list[Msg]] = []
    for rank in range(world):
        out = _RankStream(rank, world)
        add = out.add
        add(wire.KIND_HELLO, {"host": f"h{rank}", "pid": rank, "env": {}}, [], 0)
        if rank == 0:
            add(wire.KIND_CONFIG, {"config": {"learning_rate": draw(numbers)},
                                   "num_params": draw(st.none() | st.integers(0, 10 ** 9))},
                [], 0)
            count = draw(st.integers(0, 2))
            for i in range(count):
                rows, dtype = draw(st.integers(0, 4)), draw(st.sampled_from(FLOATS))
                ts = [_tensor(draw, "chunk", dtype, (rows, n_ch))]
                if i == 0 and draw(st.booleans()):
                    ts += [_tensor(draw, k, "float64", (n_ch,)) for k in ("mean", "std")]
                add(wire.KIND_DATA, {"index": i, "count": count, "channels": CHANNELS[:n_ch]},
                    ts, 0)
        step = 0
        for epoch in range(1, n_epochs + 1):
            for _ in range(draw(st.integers(0, 4))):
                step += 1
                pn = [_tensor(draw, "param_norms", "float32", (width,))] if width else []
                body = [draw(numbers), draw(st.none() | numbers), names,
                        [draw(numbers) for _ in names]]
                add(wire.KIND_STEP, body, pn, epoch, step)
            if draw(st.booleans()):
                shape = (draw(st.integers(1, 3)), n_ch)
                add(wire.KIND_VALIDATION, {"epoch": epoch, "channels": CHANNELS[:n_ch]},
                    [_tensor(draw, "samples", draw(st.sampled_from(FLOATS)), shape)], epoch)
            body = {"weights": draw(st.none() | st.lists(numbers, min_size=5, max_size=5)),
                    "ema": draw(st.none() | st.lists(numbers, min_size=2, max_size=2)),
                    "param_names": [f"p{i}" for i in range(width)] or None}
            add(wire.KIND_EPOCH, body, [], epoch, step)
        if draw(st.booleans()):
            add(wire.KIND_BYE, {"stats": {"sent": len(out.msgs) + 1}}, [], n_epochs + 1, step)
        per_rank.append(out.msgs)
    order = draw(st.permutations([r for r, msgs in enumerate(per_rank) for _ in msgs]))
    cursors = [iter(msgs) for msgs in per_rank]
    return [next(cursors[r]) for r in order]


# -- mutations -------------------------------------------------------------------------------
def _raw(m: Msg) -> list:
    h, ts = m
    return [wire.VERSION, *h, [[t.name, t.dtype, list(t.shape)] for t in ts]]


def _pack(head: object, ts: list[wire.Tensor]) -> list[bytes]:
    return [msgpack.packb(head, use_bin_type=True), *(bytes(t.data) for t in ts)]


def _classify(frame: bytes) -> str:
    if frame[:1] == bytes((wire.STEP_MAGIC,)):  # a binary step's first byte, never msgpack's
        short = min(wire.STEP_LAYOUT.size, wire.STEP_LAYOUT_V1.size)
        return "bad_header" if len(frame) < short else ""
    try:
        h = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception:
        return "bad_msgpack"
    return "bad_header" if not (type(h) is list and len(h) == 13) else ""


# field index -> (values of a wrong type or range, the reason they earn)
WRONG = {
    0: (["1", 1.0, True, None, 2, 0], "bad_version"),
    1: (["step", 4.0, True, None, 0, 99, -1], "bad_kind"),
    2: ([7, b"mutant", "", None, "x" * 257, ["mutant"]], "bad_field"),
    3: (["0", -1, 1.0, True, 1], "bad_field"),
    4: ([0, "1", 1.0, (1 << 20) + 1, None], "bad_field"),
    5: ([-1, "1", 1.5, None], "bad_field"),
    6: ([-1, "1", 1.5, None], "bad_field"),
    7: ([-1, "1", 1.5, None], "bad_field"),
    8: ([-1, "1", 1.0, None], "bad_epoch"),
    9: ([1, math.nan, math.inf, "t", None], "bad_field"),
    10: ([-1, "1", 1.5, None], "bad_field"),
    12: (["x", {}, 5, None], "bad_tensors"),
}


@st.composite
def mutant(draw: st.DrawFn, base: Msg) -> tuple[list[bytes], str | None]:
    """A mutated copy of ``base`` under the MUTANT run: (frames, reason or None if unknown)."""
    h, ts = base
    m = (h._replace(run=MUTANT, rank=0, world_size=1), ts)
    raw = _raw(m)
    ops = ["bitflip", "truncate", "swap", "wrong_type", "wrong_type", "wrong_body", "random"]
    if ts:
        ops += ["cut_tensor", "drop_frame", "huge_shape", "many_dims", "bad_dtype", "bad_dtype"]
    if h.kind == wire.KIND_STEP:
        ops += ["bin_bitflip", "bin_truncate", "bin_extra_frame", "bin_field", "bin_field"]
    op = draw(st.sampled_from(ops + ["extra_frame"]))
    if op.startswith("bin_"):
        return draw(binary_step_mutant(_frames(m)[0], op))
    frames = _legacy_frames(m)
    if op == "bitflip":
        i = draw(st.integers(0, len(frames) - 1))
        if not frames[i]:
            return frames, None
        bit = draw(st.integers(0, 8 * len(frames[i]) - 1))
        f = bytearray(frames[i])
        f[bit // 8] ^= 1 << (bit % 8)
        frames[i] = bytes(f)
        return frames, None
    if op == "truncate":
        return [frames[0][:draw(st.integers(0, len(frames[0]) - 1))]], "bad_msgpack"
    if op == "swap":
        i, j = draw(st.integers(0, 12)), draw(st.integers(0, 12))
        raw[i], raw[j] = raw[j], raw[i]
        return _pack(raw, ts), None
    if op == "wrong_type":
        field = draw(st.sampled_from(sorted(WRONG)))
        values, reason = WRONG[field]
        raw[field] = draw(st.sampled_from(values))
        return _pack(raw, ts), reason
    if op == "wrong_body":
        raw[11] = draw(st.sampled_from([{}, "x", None])) if h.kind == wire.KIND_STEP \
            else draw(st.sampled_from([[], "x", None, 3]))
        return _pack(raw, ts), "bad_body"
    if op == "random":
        blob = draw(st.binary(max_size=64))
        return [blob], _classify(blob) or None
    if op == "extra_frame":
        return frames + [b"extra"], "bad_tensors"
    k = draw(st.integers(0, len(ts) - 1))
    if op == "cut_tensor":
        if not ts[k].data:
            return frames[:1 + k] + [b"\0"] + frames[2 + k:], "size_mismatch"
        return frames[:1 + k] + [frames[1 + k][:-1]] + frames[2 + k:], "size_mismatch"
    if op == "drop_frame":
        return frames[:-1], "bad_tensors"
    spec = raw[12][k]
    if op == "huge_shape":
        spec[2] = [1 << 40, 1 << 40] + spec[2]
        # an empty tensor stays empty however many dims it declares: then it is legal
        return _pack(raw, ts), "size_mismatch" if ts[k].data else None
    if op == "many_dims":
        spec[2] = [1] * (wire.MAX_DIMS + 1)
        return _pack(raw, ts), "bad_tensors"
    spec[1] = draw(st.sampled_from(["int8", "complex64", "float", "", "uint16"]))
    return _pack(raw, ts), "bad_tensors"


# fixed field of the binary step layout -> (values, the reason they earn)
BIN_WRONG = {1: ([0x00, 0x54], "bad_kind"), 2: ([0, 3], "bad_version"),
             8: ([1, 5], "bad_field"), 9: ([0, (1 << 20) + 1], "bad_field"),
             15: ([math.nan, -math.inf], "bad_field"), 11: ([1 << 63], "bad_field")}


@st.composite
def binary_step_mutant(draw: st.DrawFn, frame: bytes, op: str
                       ) -> tuple[list[bytes], str | None]:
    if op == "bin_bitflip":
        bit = draw(st.integers(0, 8 * len(frame) - 1))
        f = bytearray(frame)
        f[bit // 8] ^= 1 << (bit % 8)
        return [bytes(f)], None
    if op == "bin_truncate":
        cut = draw(st.integers(1, len(frame) - 1))
        return [frame[:cut]], "bad_header" if cut < wire.STEP_LAYOUT.size else "size_mismatch"
    if op == "bin_extra_frame":
        return [frame, b"extra"], "bad_header"
    field = draw(st.sampled_from(sorted(BIN_WRONG)))
    values, reason = BIN_WRONG[field]
    fields = list(wire.STEP_LAYOUT.unpack_from(frame))
    fields[field] = draw(st.sampled_from(values))
    f = bytearray(frame)
    wire.STEP_LAYOUT.pack_into(f, 0, *fields)
    return [bytes(f)], reason


@st.composite
def scenario(draw: st.DrawFn) -> list[tuple[list[bytes], str]]:
    """(frames, expectation): "accept", a reject reason, or "" (either, but never raise)."""
    good = draw(valid_stream())
    items: list[tuple[list[bytes], str]] = [(_frames(m), "accept") for m in good]
    for _ in range(draw(st.integers(4, 24))):
        at = draw(st.integers(0, len(items)))
        if draw(st.integers(0, 5)) == 0 and at > 0:
            # an exact copy of an earlier valid message: its seq is used already
            earlier = [f for f, e in items[:at] if e == "accept"]
            if earlier:
                items.insert(at, (draw(st.sampled_from(earlier)), "duplicate_seq"))
                continue
        frames, reason = draw(mutant(draw(st.sampled_from(good))))
        items.insert(at, (frames, reason or ""))
    return items


def _run(items: list[tuple[list[bytes], str]]) -> tuple[Pipeline, MemorySink]:
    sink = MemorySink()
    pipe = Pipeline(PROFILE, sink)
    for frames, expect in items:
        before, accepted = dict(pipe.rejected), pipe.accepted
        ok = pipe.feed(frames)
        delta = {k: n - before.get(k, 0) for k, n in pipe.rejected.items()
                 if n != before.get(k, 0)}
        if ok:
            assert pipe.accepted == accepted + 1 and not delta, (expect, delta)
        else:
            assert pipe.accepted == accepted and sum(delta.values()) == 1, delta
        if expect == "accept":
            assert ok, f"a valid message was rejected: {delta}"
        elif expect:
            assert not ok and delta == {expect: 1}, (expect, delta, frames[0][:80])
    pipe.finish()
    # the pipeline's catch-all counts a failure of the state as a reject: there must be none
    assert "internal_error" not in pipe.rejected, pipe.rejected
    return pipe, sink


def _run_batched(items: list[tuple[list[bytes], str]], cuts: list[int], record: Path
                 ) -> tuple[Pipeline, MemorySink]:
    """The same messages through ``feed_batch``, cut into batches at ``cuts``."""
    sink = MemorySink()
    pipe = Pipeline(PROFILE, sink, recorder=RecordWriter(record))
    bounds = sorted({0, len(items), *(c % (len(items) + 1) for c in cuts)})
    for a, b in zip(bounds, bounds[1:], strict=False):
        pipe.feed_batch(Batch.of([frames for frames, _ in items[a:b]]))
    pipe.finish()
    return pipe, sink


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")  # huge weights are data
@FUZZ
@given(scenario(), st.lists(st.integers(0, 400), max_size=5))
def test_pipeline_accepts_the_valid_rejects_the_rest_and_is_deterministic(items, cuts):
    a, sink_a = _run(items)
    with tempfile.TemporaryDirectory() as d:
        # one message at a time vs in batches (the bulk step path): the same records, counts,
        # rank tables and recording bytes; and its replay agrees again
        one = Path(d) / "one.twrec"
        b, sink_b = _run_batched(items, cuts, Path(d) / "batched.twrec")
        c, sink_c = _run_batched(items, [], one)
        assert (Path(d) / "batched.twrec").read_bytes() == one.read_bytes()
        d_pipe = replay([one], PROFILE, MemorySink())[0]
        sink_d = d_pipe.sink
    for other in (b, c):
        assert other.state.rank_table() == a.state.rank_table()
        assert (other.accepted, other.rejected) == (a.accepted, a.rejected)
    assert d_pipe.accepted == a.accepted
    assert d_pipe.state.rank_table() == a.state.rank_table()
    dumps = [[json.dumps(r, sort_keys=True) for r in s.json()]
             for s in (sink_a, sink_b, sink_c, sink_d)]
    assert dumps[1] == dumps[0] and dumps[2] == dumps[0] and dumps[3] == dumps[0]
    assert a.accepted >= sum(1 for _, e in items if e == "accept")
    assert a.accepted + sum(a.rejected.values()) == len(items)
    epochs = [r for r in sink_a.json() if r["type"] == "epoch" and r["run"] == GOOD]
    assert [r["epoch"] for r in epochs] == sorted({r["epoch"] for r in epochs})
    assert sum(1 for r in sink_a.json() if r["type"] == "summary" and r["run"] == GOOD) == 1


def test_after_a_runs_end_a_repeat_is_a_duplicate_and_anything_new_is_refused():
    def msg(kind: int, inst: int, seq: int, body, epoch: int = 0) -> list[bytes]:
        return _frames((wire.Header(kind, GOOD, 0, 1, inst, seq, seq, epoch, 1.0, 0, body),
                        []))

    pipe = Pipeline(PROFILE, MemorySink())
    hello = msg(wire.KIND_HELLO, 1, 0, {"host": "h", "pid": 1})
    for frames in (hello, msg(wire.KIND_EPOCH, 1, 1, {}, epoch=1), msg(wire.KIND_BYE, 1, 2, {})):
        assert pipe.feed(frames)
    assert pipe.state.runs[GOOD].finished
    assert not pipe.feed(hello) and pipe.rejected == {"duplicate_seq": 1}
    assert not pipe.feed(msg(wire.KIND_STEP, 1, 3, [0.5, 1.0, [], []]))
    assert not pipe.feed(msg(wire.KIND_HELLO, 2, 0, {"host": "h", "pid": 2}))
    assert pipe.rejected == {"duplicate_seq": 1, "run_finished": 2}


# -- the decoder alone ---------------------------------------------------------------------
anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=12)


@st.composite
def near_valid_header(draw: st.DrawFn) -> list[bytes]:
    """A valid message with some fields replaced by anything at all."""
    base = draw(valid_stream())
    h, ts = draw(st.sampled_from(base))
    raw = _raw((h, ts))
    for i in draw(st.lists(st.integers(0, 12), max_size=3)):
        raw[i] = draw(anything)
    return _pack(raw, ts) + draw(st.lists(st.binary(max_size=16), max_size=1))


def _check_decoded(frames: list[bytes]) -> None:
    try:
        m = wire.decode(frames)
    except wire.DecodeError as exc:
        assert exc.reason and isinstance(exc.reason, str)
        return
    # What the collector relies on after decode, whatever came in.
    assert type(m.kind) is int and m.kind in wire.KINDS
    assert type(m.run) is str and m.run
    assert all(type(v) is int for v in (m.rank, m.world_size, m.instance, m.seq, m.step,
                                        m.epoch, m.dropped))
    assert 0 <= m.rank < m.world_size and m.epoch >= 0 and math.isfinite(m.wall_time)
    for t in m.tensors.values():
        assert t.dtype in wire.DTYPES and len(t.data) == wire.DTYPES[t.dtype] * math.prod(
            t.shape)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_decode_of_random_bytes_raises_only_decode_errors(frames):
    _check_decoded(frames)


@FUZZ
@given(near_valid_header())
def test_decode_of_near_valid_messages_keeps_its_promises(frames):
    _check_decoded(frames)


# -- targeted: what the fuzzing above found ---------------------------------------------------
def _one(kind: int, body: object, tensors: list[wire.Tensor], seq: int = 1,
         epoch: int = 0) -> list[bytes]:
    return _frames((wire.Header(kind, "r", 0, 1, 7, seq, 0, epoch, 1.0, 0, body), tensors))


HELLO = _one(wire.KIND_HELLO, {}, [], seq=0)


@pytest.mark.parametrize("frames,reason", [
    # a float or bool kind/version compares equal to an int one
    ([msgpack.packb([1, 4.0, "r", 0, 1, 7, 1, 0, 0, 1.0, 0, [1.0, None, [], []], []])],
     "bad_kind"),
    ([msgpack.packb([1, True, "r", 0, 1, 7, 1, 0, 0, 1.0, 0, {}, []])], "bad_kind"),
    ([msgpack.packb([1.0, 1, "r", 0, 1, 7, 1, 0, 0, 1.0, 0, {}, []])], "bad_version"),
    # data chunks must be floating point, the constants float64
    (_one(wire.KIND_DATA, {"index": 0, "count": 1, "channels": ["a", "b"]},
          [wire.Tensor("chunk", "int32", (2, 2), bytes(16))]), "bad_tensors"),
    (_one(wire.KIND_DATA, {"index": 0, "count": 1, "channels": ["a", "b", "c"]},
          [wire.Tensor("chunk", "float32", (1, 3), bytes(12)),
           wire.Tensor("mean", "float32", (3,), bytes(12))]), "bad_tensors"),
    # the validation epoch in the body is compared with epoch numbers
    (_one(wire.KIND_VALIDATION, {"epoch": "one"},
          [wire.Tensor("samples", "float32", (2, 2), bytes(16))]), "bad_body"),
])
def test_wrong_kinds_versions_dtypes_and_epochs_are_rejected_by_the_decoder(frames, reason):
    pipe = Pipeline(PROFILE, MemorySink())
    assert pipe.feed(HELLO)
    assert not pipe.feed(frames)
    assert pipe.rejected == {reason: 1}
    assert pipe.feed(_one(wire.KIND_EPOCH, {}, [], seq=1, epoch=1))
    pipe.finish()


def test_chunks_and_samples_whose_channels_disagree_are_survived():
    pipe = Pipeline(PROFILE, MemorySink())
    f32 = "float32"
    msgs = [HELLO,
            _one(wire.KIND_DATA, {"index": 0, "count": 2, "channels": ["a", "b"]},
                 [wire.Tensor("chunk", f32, (2, 2), bytes(16))], seq=1),
            _one(wire.KIND_DATA, {"index": 1, "count": 2, "channels": ["a", "b", "c"]},
                 [wire.Tensor("chunk", f32, (2, 3), bytes(24))], seq=2),
            _one(wire.KIND_VALIDATION, {"epoch": 1}, [wire.Tensor("samples", f32, (2, 3),
                                                                  bytes(24))], seq=3),
            _one(wire.KIND_VALIDATION, {"epoch": 1}, [wire.Tensor("samples", f32, (2, 4),
                                                                  bytes(32))], seq=4),
            _one(wire.KIND_EPOCH, {}, [], seq=5, epoch=1)]
    for frames in msgs:
        assert pipe.feed(frames)
    pipe.finish()
    assert [r["epoch"] for r in pipe.sink.json() if r["type"] == "epoch"] == [1]


_HUGE_COUNT = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
sys.path.insert(0, sys.argv[1])
from collector.ingest.batch import Batch
from collector.ingest.pipeline import Pipeline, replay
from collector.analysis.profile_load import load_profile
from collector.recording.writer import RecordWriter
from trainer_client import wire
p = Pipeline(load_profile(None))
def msg(kind, seq, body, ts=()):
    return wire.encode(wire.Header(kind, "r", 0, 1, 7, seq, 0, 0, 1.0, 0, body), list(ts))
p.feed(msg(1, 0, {}))
t0 = time.perf_counter()
ok = p.feed(msg(3, 1, {"index": 0, "count": 1 << 40, "channels": ["a"]},
                [wire.Tensor("chunk", "float32", (2, 1), bytes(8))]))
print(ok, time.perf_counter() - t0, p.rejected)
"""


def test_a_huge_declared_chunk_count_costs_nothing():
    # Memory-capped subprocess: a count-sized allocation fails fast instead of swapping.
    r = subprocess.run([sys.executable, "-c", _HUGE_COUNT, str(ROOT)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-1500:]
    ok, seconds, rejected = r.stdout.split(" ", 2)
    assert ok == "True" and float(seconds) < 5.0, (r.stdout, r.stderr[-1500:])


# -- atheris: coverage-guided, bounded ----------------------------------------------------------
def test_atheris_fuzzes_the_decoder_for_ten_seconds(tmp_path):
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "workers" / "fuzz_wire.py"),
                        "-max_total_time=10", "-seed=1", "-rss_limit_mb=2048",
                        f"-artifact_prefix={tmp_path}/"],
                       capture_output=True, text=True, timeout=90, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr and time.monotonic() - t0 < 60
