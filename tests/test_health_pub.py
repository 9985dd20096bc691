"""The back-channel's parts over real sockets, fed what the real pipeline emits: the shared
layout (``trainer_client.wire.health``), the collector's publisher and stop policy, and the
rank's ``Feedback`` converging on what it missed."""

from __future__ import annotations

import time

import msgpack
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st
from support.wire_runs import run_messages

from collector.analysis.profile_load import load_profile, with_stop_on
from collector.ingest.pipeline import Pipeline
from collector.ingest.stops import StopPolicy
from collector.recording.writer import RecordWriter
from collector.records import StopRecord
from collector.sinks.base import FanOut
from collector.sinks.health_pub import HealthPublisher
from collector.sinks.jsonl import MemorySink
from trainer_client.feedback import Feedback
from trainer_client.wire import health as hw

DIAG = "diagnosis/gradient_explosion"
RUN = "pub-run"


# -- the layout ------------------------------------------------------------------------
def test_every_kind_round_trips():
    f = hw.Finding(3, 2, "exploding_gradients", hw.RAISED, "critical", "norm 1e4", "clip")
    stop = hw.Stop(4, 2, 99, DIAG)
    state = hw.State(4, 2, "critical", (f,), stop)
    for msg in (f, stop, state, state._replace(stop=None, raised=(), level="healthy")):
        assert hw.decode(hw.encode(msg, RUN), RUN) == msg


def test_no_topic_is_a_prefix_of_another_and_another_runs_message_is_refused():
    runs = ["a", "ab", "a\0", "a\0b", "é", "e\u0301", ""]
    for x in runs:
        for y in runs:
            if x != y:
                assert not hw.topic(y).startswith(hw.topic(x)), (x, y)
    frames = hw.encode(hw.Stop(1, 0, 5, DIAG), "a\0b")
    with pytest.raises(hw.BadHealthMessage):
        hw.decode(frames, "a")
    with pytest.raises(hw.BadHealthMessage):  # the right topic, another run in the body
        hw.decode([hw.topic("a"), frames[1]], "a")


@pytest.mark.parametrize("body", [
    [1, 3, RUN, 1, 0, True, DIAG],  # a bool is no step
    [1, 3, RUN, 1, 0, -5, DIAG],
    [1, 3, RUN, 1, 0, 5, ""],
    [2, 3, RUN, 1, 0, 5, DIAG],  # another version
    [1, 9, RUN, 1, 0, 5, DIAG],
    [1, 2, RUN, 1, 0, "r", "maybe", "warning", "m", ""],
    [1, 1, RUN, 1, 0, "fine", [], None],  # no such level
    [1, 1, RUN, 1, 0, "healthy", [[1, 0, "r", "warning", "m"]], None],
    [1, 1, RUN, 1, 0, "healthy", [], [1, 0, 5]],
    [1, 1, RUN, 1.0, 0, "healthy", [], None],
    {"v": 1},
])
def test_malformed_messages_are_refused(body):
    with pytest.raises(hw.BadHealthMessage):
        hw.decode([hw.topic(RUN), msgpack.packb(body)], RUN)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.binary(max_size=40), max_size=3))
def test_decode_never_raises_anything_else(raw, extra):
    for frames in ([hw.topic(RUN), raw], [raw], [hw.topic(RUN), raw, *extra]):
        try:
            hw.decode(frames, RUN)
        except hw.BadHealthMessage:
            pass


@pytest.mark.parametrize(("data", "health"), [
    ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556"),
    ("tcp://[::1]:7000", "tcp://[::1]:7001"),
    ("tcp://*:5555", "tcp://*:5556"),
    ("ipc:///tmp/tw.sock", "ipc:///tmp/tw.sock.health"),
    ("tcp://127.0.0.1:65535", None),
    ("tcp://127.0.0.1:*", None),
])
def test_the_health_endpoint_follows_from_the_data_endpoint(data, health):
    assert hw.health_endpoint(data) == health


# -- the collector's side ----------------------------------------------------------------
class Live:
    """A pipeline wired as ``trainwatch collect`` wires it, its PUB on inproc, and the
    server's tick (the policy's decisions, the flush, the republishing) after each message."""

    def __init__(self, tmp, stop_on=(DIAG,)) -> None:
        self.profile = with_stop_on(load_profile(None), list(stop_on))
        self.mem, self.pub, self.policy = MemorySink(), HealthPublisher(republish_s=0.0), \
            StopPolicy(self.profile)
        self.pipe = Pipeline(self.profile, FanOut([self.mem, self.pub, self.policy]),
                             recorder=RecordWriter(tmp / "live.twrec"))
        self.ctx = zmq.Context()
        sock = self.ctx.socket(zmq.PUB)
        sock.bind("inproc://health")
        self.pub.attach(sock)
        self.socks = [sock]

    def subscriber(self, run: str = RUN) -> zmq.Socket:
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, hw.topic(run))
        sub.connect("inproc://health")
        self.socks.append(sub)
        return sub

    def feed(self, frames, wall: float) -> None:
        self.pipe.feed(frames)
        for ctl in self.policy.due(self.pipe.state, wall):
            self.pipe.control(ctl)
        self.pipe.flush()

    def close(self) -> None:
        self.pipe.finish()
        for sock in self.socks:
            sock.close(0)
        self.ctx.term()


def _drain(sub: zmq.Socket, run: str = RUN) -> list:
    out = []
    while sub.poll(50):
        out.append(hw.decode(sub.recv_multipart(), run))
    return out


def test_findings_and_the_stop_go_out_in_order_and_a_late_rank_converges(tmp_path):
    live = Live(tmp_path)
    early, other = live.subscriber(), live.subscriber("another-run")
    msgs = run_messages(RUN, 6, explode=(3, 4, 5, 6), samples=None, bye=False)  # live
    for i, frames in enumerate(msgs):
        live.feed(frames, 1.7e9 + i)
    got = _drain(early)
    stops = [r for r in live.mem.records if isinstance(r, StopRecord)]
    assert len(stops) == 1 and stops[0].rule == DIAG and stops[0].step > stops[0].seen
    findings = [m for m in got if isinstance(m, hw.Finding | hw.Stop)]
    assert [m.seq for m in findings] == list(range(1, len(findings) + 1))
    assert (DIAG, hw.RAISED) in [(m.rule, getattr(m, "kind", None)) for m in findings]
    assert [m.step for m in findings if isinstance(m, hw.Stop)] == [stops[0].step]
    last = [m for m in got if isinstance(m, hw.State)][-1]
    assert last.level == "critical" and last.stop.step == stops[0].step
    assert last.seq == findings[-1].seq and DIAG in {f.rule for f in last.raised}
    assert _drain(other) == []  # subscribed to another run: nothing
    # a rank that subscribes now hears only the republished state, and converges on it
    late, fb = live.subscriber(), Feedback(RUN, console=False)
    time.sleep(0.05)
    live.pub.tick(time.monotonic())
    for m in _drain(late):
        fb.take(hw.encode(m, RUN))
    assert fb.health.level == "critical" and fb.stop.step == stops[0].step
    assert {f.rule for f in fb.health.findings} == {f.rule for f in last.raised}
    assert [f.rule for f in fb.pending] == [f.rule for f in last.raised]  # made up, in order
    live.close()


def test_the_stop_is_decided_once_and_a_replay_or_restart_makes_no_other(tmp_path):
    live = Live(tmp_path)
    for i, frames in enumerate(run_messages(RUN, 6, explode=(2, 3, 4, 5, 6), samples=None)):
        live.feed(frames, 1.7e9 + i)
    live.close()
    assert [type(r).__name__ for r in live.mem.records].count("StopRecord") == 1
    replayed, policy = MemorySink(), StopPolicy(live.profile)
    pipe = Pipeline(live.profile, FanOut([replayed, policy]))
    pipe.feed_recording(tmp_path / "live.twrec")
    assert policy.due(pipe.state, 2e9) == []  # the recorded decision, not a new one
    pipe.finish()
    assert replayed.json() == live.mem.json()


def test_a_run_that_finishes_before_the_tick_is_not_stopped(tmp_path):
    live = Live(tmp_path)
    for frames in run_messages(RUN, 4, explode=(2, 3, 4), samples=None):
        live.pipe.feed(frames)  # no tick until the run is over
    assert live.policy.due(live.pipe.state, 2e9) == []
    live.close()
    assert not [r for r in live.mem.records if isinstance(r, StopRecord)]


def test_feedback_drops_repeats_and_stale_states():
    fb = Feedback(RUN, console=False)
    f1 = hw.Finding(1, 1, "r", hw.RAISED, "warning", "m", "")
    f2 = hw.Finding(2, 2, "r", hw.CLEARED, "info", "r cleared", "")
    for m in (f1, f1, hw.State(1, 1, "warning", (f1,), None), f2, f1,
              hw.State(1, 1, "warning", (f1,), None)):
        fb.take(hw.encode(m, RUN))
    assert [f.seq for f in fb.pending] == [1, 2] and fb.health.level == "healthy"
    assert fb.health.epoch == 2 and fb.health.findings == ()
    fb.take([b"junk"])
    assert fb.stats["bad"] == 1
