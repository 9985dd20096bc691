"""The bulk step path (``stepscan``, ``recordscan``, ``Pipeline.feed_batch``) against the
per-message path it stands in for: the same values, bytes, records and counts."""

from __future__ import annotations

import json
import math
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.analysis.profile_load import load_profile
from collector.ingest import stepscan
from collector.ingest.batch import Batch
from collector.ingest.pipeline import Pipeline, replay
from collector.recording import scan as recordscan
from collector.recording.format import MESSAGE, pack_record
from collector.recording.reader import read_records
from collector.recording.writer import RecordWriter
from collector.sinks.jsonl import MemorySink
from trainer_client import wire

PROFILE = load_profile(None)
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


@SETTINGS
@given(st.binary(max_size=300))
def test_crc32_is_zlibs(data):
    assert recordscan.crc32(data) == zlib.crc32(data)


@SETTINGS
@given(st.lists(st.binary(max_size=120), max_size=12))
def test_packed_records_are_byte_for_byte_the_writers_and_scan_back(frames):
    batch = Batch.of([[f] for f in frames])
    packed = recordscan.pack_messages(batch.buf, batch.offs, batch.lens).tobytes()
    assert packed == b"".join(pack_record(MESSAGE, [f]) for f in frames)
    cols = recordscan.scan_records(np.frombuffer(packed, np.uint8), 0)
    assert [bytes(packed[o:o + n]) for o, n in zip(cols[4], cols[5], strict=True)] == frames
    assert (cols[7], cols[8]) == (0, 0)  # nothing corrupted, nothing cut off


names_st = st.lists(st.text(max_size=6), max_size=4)
finite = st.floats(allow_nan=False, allow_infinity=False)


@st.composite
def step_frame(draw: st.DrawFn) -> bytes:
    names = draw(names_st)
    body = [draw(st.floats()), draw(st.none() | st.floats()), names,
            [draw(st.floats()) for _ in names], draw(st.none() | st.floats())]
    world = draw(st.integers(1, 1 << 20))
    h = wire.Header(wire.KIND_STEP, draw(st.text(min_size=1, max_size=8)),
                    draw(st.integers(0, world - 1)), world, draw(st.integers(0, 2 ** 63 - 1)),
                    draw(st.integers(0, 2 ** 63 - 1)), draw(st.integers(0, 2 ** 63 - 1)),
                    draw(st.integers(0, 2 ** 63 - 1)), draw(finite),
                    draw(st.integers(0, 2 ** 63 - 1)), body)
    width = draw(st.none() | st.integers(0, 4))
    ts = [] if width is None else [wire.Tensor("param_norms", "float32", (width,),
                                               draw(st.binary(min_size=4 * width,
                                                              max_size=4 * width)))]
    frame = bytearray(wire.encode(h, ts)[0])
    for _ in range(draw(st.integers(0, 2))):  # and sometimes a flipped bit or two
        bit = draw(st.integers(0, 8 * len(frame) - 1))
        frame[bit // 8] ^= 1 << (bit % 8)
    return bytes(frame)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(st.lists(step_frame(), min_size=1, max_size=6))
def test_what_the_bulk_parser_vouches_for_decodes_to_the_same_values(frames):
    b = Batch.of([[f] for f in frames])
    s = stepscan.parse_steps(b.buf, b.offs, b.lens, b.nfr)
    for i, f in enumerate(frames):
        try:
            m = wire.decode([f])
        except wire.DecodeError:
            # The parser leaves text to the pipeline: a run must equal a registered stream's
            # (decoded) run, and the names region must decode; one of the two fails here.
            if s.fast[i]:
                (ro, rn), (no, nn) = s.run_at[i], s.names_at[i]
                run_ok = _utf8(b.buf[ro:ro + rn].tobytes())
                try:
                    wire.step_names(b.buf[no:no + nn].tobytes(), int(s.comp_at[i, 1]))
                except wire.DecodeError:
                    continue
                assert not run_ok
            continue
        if not s.fast[i]:  # only a non-finite loss, norm or lr may be left to the slow path
            assert not (math.isfinite(m.body[0])
                        and (m.body[1] is None or math.isfinite(m.body[1]))
                        and (m.body[4] is None or math.isfinite(m.body[4])))
            continue
        assert s.ints[i].tolist() == [m.rank, m.world_size, m.instance, m.seq, m.step,
                                      m.epoch, m.dropped]
        gn = math.nan if m.body[1] is None else m.body[1]
        assert [m.wall_time, m.body[0]] == s.floats[i, :2].tolist()
        assert _same(gn, s.floats[i, 2])
        assert _same(math.nan if m.body[4] is None else m.body[4], s.floats[i, 3])
        o, n = s.comp_at[i]
        assert all(_same(x, y) for x, y in zip(s.comps[o:o + n], m.body[3], strict=True))
        assert int(s.key[i]) == stepscan.stream_key(m.run, m.rank, m.instance)
        pn = m.tensors.get("param_norms")
        o, n = s.pn_at[i]
        assert n == (-1 if pn is None else pn.shape[0])
        if pn is not None:
            assert b.buf[o:o + 4 * n].tobytes() == bytes(pn.data)


# -- the whole pipeline, realistic traffic ----------------------------------------------------
def _traffic(seed: int) -> list[list[bytes]]:
    """Two runs, several ranks, interleaved: hellos, steps with and without param norms,
    components that change names, NaN losses, a restarted rank, duplicates, junk, epochs,
    validation samples and goodbyes."""
    rng = random.Random(seed)
    out: list[tuple[float, list[bytes]]] = []

    def msg(run, rank, world, inst, seq, kind, body, step=0, epoch=0, ts=()):
        h = wire.Header(kind, run, rank, world, inst, seq, step, epoch, 1.7e9 + seq, seq // 50,
                        body)
        return [bytes(f) for f in wire.encode(h, list(ts))]

    for run, world in (("alpha", 3), ("beta", 2)):
        for rank in range(world):
            t, seq, step, inst = rng.random(), 0, 0, 100 + rank
            emit = []
            emit.append(msg(run, rank, world, inst, seq, wire.KIND_HELLO, {"host": "h"}))
            for epoch in range(1, 4):
                if run == "alpha" and rank == 1 and epoch == 3:  # the rank restarts
                    inst, seq = 999, 0
                    emit.append(msg(run, rank, world, inst, seq, wire.KIND_HELLO, {}))
                names = ["simple", "vel"] if epoch < 2 else ["simple", "vel", "fk"]
                for _ in range(rng.randint(20, 60)):
                    seq += 1 + (rng.random() < 0.05)  # some messages lost on the way
                    step += 1
                    loss = float("nan") if rng.random() < 0.02 else rng.random()
                    width = 3 if run == "alpha" else 0
                    ts = [wire.Tensor("param_norms", "float32", (width,),
                                      np.random.default_rng(seq).random(width, np.float32)
                                      .tobytes())] if width else []
                    emit.append(msg(run, rank, world, inst, seq, wire.KIND_STEP,
                                    [loss, rng.random(), names, [rng.random() for _ in names],
                                     1e-3 * rng.random() if run == "alpha" else None],
                                    step, epoch, ts))
                    if rng.random() < 0.03:
                        emit.append(emit[-1])  # a duplicate
                    if rng.random() < 0.02:
                        emit.append([b"\xc1S\x01junk"])
                seq += 1
                emit.append(msg(run, rank, world, inst, seq, wire.KIND_EPOCH, {}, step, epoch))
            seq += 1
            emit.append(msg(run, rank, world, inst, seq, wire.KIND_BYE, {}))
            out += [(t + i + rng.random() * 3, m) for i, m in enumerate(emit)]
    return [m for _, m in sorted(out, key=lambda x: x[0])]


def _pipe(tmp: Path, name: str) -> Pipeline:
    return Pipeline(PROFILE, MemorySink(), recorder=RecordWriter(tmp / f"{name}.twrec"))


def _dump(p: Pipeline) -> list[str]:
    return [json.dumps(r, sort_keys=True) for r in p.sink.json()]


@pytest.mark.parametrize("seed", [0, 1])
def test_batches_and_single_messages_reach_the_same_records_counts_and_bytes(tmp_path, seed):
    msgs = _traffic(seed)
    one = _pipe(tmp_path, "one")
    for m in msgs:
        one.feed(m)
    one.finish()
    whole = _pipe(tmp_path, "whole")
    whole.feed_batch(Batch.of(msgs))
    whole.finish()
    cut = _pipe(tmp_path, "cut")
    rng = random.Random(seed)
    a = 0
    while a < len(msgs):
        b = a + rng.choice([1, 2, 7, 64, 500])
        cut.feed_batch(Batch.of(msgs[a:b]))
        a = b
    cut.finish()
    # the bulk path did most of the work (this traffic is dense in junk, NaNs, duplicates)
    assert whole.bulk_accepted > 0.5 * whole.accepted
    assert one.bulk_accepted == 0
    assert one.rejected.get("duplicate_seq") and one.rejected.get("bad_header")
    for p in (whole, cut):
        assert (p.accepted, p.rejected) == (one.accepted, one.rejected)
        assert p.state.rank_table() == one.state.rank_table()
        assert _dump(p) == _dump(one)
        assert p.recorder.path.read_bytes() == one.recorder.path.read_bytes()
    again = replay([one.recorder.path], PROFILE, MemorySink())[0]
    assert _dump(again) == _dump(one) and again.bulk_accepted > 0
    epochs = [r for r in one.sink.json() if r["type"] == "epoch" and r["run"] == "alpha"]
    assert [r["epoch"] for r in epochs] == [1, 2, 3]


def test_a_replay_reads_recordings_with_msgpack_steps_too(tmp_path):
    # A recording made before the binary layout: steps in the msgpack header.
    import msgpack

    path = tmp_path / "old.twrec"
    with RecordWriter(path) as w:
        for seq, (kind, body) in enumerate([(wire.KIND_HELLO, {}),
                                            (wire.KIND_STEP, [0.5, 1.0, ["a"], [0.25]]),
                                            (wire.KIND_STEP, [0.4, 1.0, ["a"], [0.2]]),
                                            (wire.KIND_EPOCH, {}), (wire.KIND_BYE, {})]):
            epoch = 1 if kind == wire.KIND_EPOCH else 0
            w.append(MESSAGE, [msgpack.packb([wire.VERSION, kind, "old", 0, 1, 5, seq, seq,
                                              epoch, 1.0, 0, body, []])])
    p = replay([path], PROFILE, MemorySink())[0]
    assert p.accepted == 5 and not p.rejected and p.bulk_accepted == 0
    ep = [r for r in p.sink.json() if r["type"] == "epoch"]
    assert len(ep) == 1 and ep[0]["metrics"]["train/batch_loss_mean"] == pytest.approx(0.45)
    assert len(list(read_records(path))) == 5


@pytest.mark.parametrize("pattern", ["fresh_instances", "duplicates", "mixed"])
def test_the_bulk_path_is_linear_whatever_the_batch_holds(pattern):
    """Streams that keep cutting the bulk path short (a new instance every message, every
    other step a duplicate) must not make it re-read the rest of the batch each time: the
    rows its attempts read stay within a constant of the batch, and the records and counts
    equal the per-message path's."""
    n = 6000
    msgs = []
    for i in range(n):
        if pattern == "fresh_instances":
            inst, seq = i, 0
        elif pattern == "duplicates":
            inst, seq = 1, i // 2
        else:
            inst, seq = (i // 3, i % 3) if (i // 500) % 2 else (7, i)
        h = wire.Header(wire.KIND_STEP, "r", 0, 1, inst, seq, i, 0, 1.0, 0,
                        [0.5, 1.0, ["a"], [0.25]])
        msgs.append([bytes(f) for f in wire.encode(h, [])])

    class Counting(Pipeline):
        read = 0

        def _fast_run(self, b, s, a, e):
            Counting.read += e - a
            return super()._fast_run(b, s, a, e)

    bulk, one = Counting(PROFILE, MemorySink()), Pipeline(PROFILE, MemorySink())
    for a in range(0, n, 500):
        bulk.feed_batch(Batch.of(msgs[a:a + 500]))
    for m in msgs:
        one.feed(m)
    bulk.finish()
    one.finish()
    assert Counting.read <= 8 * n, Counting.read  # at most ~8 rows read per message
    assert (bulk.accepted, bulk.rejected) == (one.accepted, one.rejected)
    assert bulk.sink.json() == one.sink.json()
