"""The client tells the user when monitoring is off: a malformed endpoint is a clear error,
a dead sender thread is said once and every later message is counted, a missing or lost
collector is said on the trainer's console, ``close`` does not wait for a collector that
never came, and ``stats`` says what was handed to the socket, not what was delivered.

Real ZeroMQ sockets, a real collector process, a real sender thread.
"""

from __future__ import annotations

import ctypes
import json
import logging
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from client_support import kill_leftovers, warnings_with
from conftest import CollectorProc, env, free_tcp

from collector.recording.format import MESSAGE
from collector.recording.reader import read_records
from trainer_client import TrainerClient, wire
from trainer_client.sender import CONNECT_WARN_S


@pytest.fixture
def started():
    procs: list = []
    yield procs
    kill_leftovers(procs)


def _until(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def _senders() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "trainwatch-sender"}


def _recorded(path) -> list[wire.Message]:
    return [wire.decode(f) for t, f in read_records(path) if t == MESSAGE]


@pytest.mark.parametrize("bad", ["localhost:5555", "tcp://localhost", "tcp://*:5555",
                                 "tcp://login01:0", "tcp://login01:5555x", "ipc://",
                                 "udp://login01:5555", "ipc:///" + "d" * 120 + "/tw.sock"])
def test_a_malformed_endpoint_is_a_clear_error_naming_where_it_came_from(bad, monkeypatch):
    before = _senders()
    monkeypatch.setenv("TRAINWATCH_ENDPOINT", bad)
    with pytest.raises(ValueError) as env_err:
        TrainerClient(run="bad", rank=0, world_size=1)
    monkeypatch.delenv("TRAINWATCH_ENDPOINT")
    with pytest.raises(ValueError) as arg_err:
        TrainerClient(endpoint=bad, run="bad", rank=0, world_size=1)
    for err, source in ((env_err, "TRAINWATCH_ENDPOINT="), (arg_err, "endpoint=")):
        msg = str(err.value)
        assert source + repr(bad) in msg
        assert "tcp://host:port" in msg and "ipc://path" in msg
    assert _senders() == before  # refused before any thread or socket was made


def test_well_formed_endpoints_are_taken(tmp_path):
    for ep in (free_tcp(), f"ipc://{tmp_path}/ok.sock", "tcp://[::1]:1"):
        tw = TrainerClient(endpoint=ep, run="ok", rank=0, world_size=1)
        assert tw.endpoint == ep and tw.stats["sender"] == "running"
        tw.close(timeout=0.5)
        assert tw.stats["sender"] == "closed"


class _SlowHandler(logging.Handler):
    """A console that takes its time over each record."""

    def __init__(self, delay_s: float) -> None:
        super().__init__(logging.WARNING)
        self.delay_s = delay_s
        self.seen = 0

    def emit(self, record: logging.LogRecord) -> None:
        time.sleep(self.delay_s)
        self.seen += 1


def test_a_dead_sender_thread_is_said_once_and_every_later_message_counted(tmp_path, caplog,
                                                                         started):
    ep = f"ipc://{tmp_path}/c.sock"
    col = CollectorProc(tmp_path, ep, "--once", "--quiet", "1").start()
    started.append(col)
    before = _senders()
    tw = TrainerClient(endpoint=ep, run="dies", rank=0, world_size=1)
    (thread,) = _senders() - before
    loss = torch.tensor(0.5)
    tw.log_step(loss)
    assert _until(lambda: tw.stats["handed_to_socket"] == 2, 30)  # hello + the step
    # A slow console (a handler of the client's logger, run before the record reaches
    # caplog) widens the moment between the thread's death and its warning: the state must
    # not say "dead" before the warning is out.
    slow = _SlowHandler(0.5)
    client_log = logging.getLogger("trainwatch.client")
    client_log.addHandler(slow)
    try:
        with caplog.at_level("WARNING", logger="trainwatch.client"):
            # The thread really dies, of an exception raised in it (as any bug there would).
            hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident),
                                                             ctypes.py_object(RuntimeError))
            assert hit == 1
            assert _until(lambda: tw.stats["sender"] == "dead", 30)
            for _ in range(10):
                tw.log_step(loss, {"a": 0.25})
            tw.log_epoch(1)
            t0 = time.monotonic()
            tw.close(timeout=30)
            closed_in = time.monotonic() - t0
    finally:
        client_log.removeHandler(slow)
    assert slow.seen == 1
    s = tw.stats
    assert closed_in < 5  # nothing to wait for: far below the 30 s timeout
    assert s["dropped_by_reason"]["sender_dead"] == 10 + 1 + 1  # steps, epoch, bye
    assert s["dropped"] == 12 and s["handed_to_socket"] == 2 and s["queued"] == 0
    assert len(warnings_with(caplog, "sender thread stopped")) == 1
    assert "sender_dead" in warnings_with(caplog, "sender thread stopped")[0]
    col.stop(signal.SIGTERM)
    assert [m.kind for m in _recorded(col.record)] == [wire.KIND_HELLO, wire.KIND_STEP]


def test_no_collector_is_said_once_and_close_returns_at_once(caplog):
    ep = free_tcp()  # nothing listens there
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        t0 = time.monotonic()
        tw = TrainerClient(endpoint=ep, run="alone", rank=0, world_size=1)
        for i in range(20):
            tw.log_step(torch.tensor(float(i)))
        time.sleep(1.0)
        assert not warnings_with(caplog, "no collector")  # 1 s: well before CONNECT_WARN_S
        assert _until(lambda: warnings_with(caplog, "no collector"), 30)
        warned_after = time.monotonic() - t0
        time.sleep(0.5)
        t1 = time.monotonic()
        tw.close(timeout=30)
        closed_in = time.monotonic() - t1
    (msg,) = warnings_with(caplog, "no collector")
    assert ep in msg and "monitoring is off" in msg
    assert CONNECT_WARN_S - 1 < warned_after < 30
    assert closed_in < 5  # at once, not the 30 s timeout
    s = tw.stats
    assert s["handed_to_socket"] == 0 and not s["connected"]
    assert s["dropped"] == s["dropped_by_reason"]["no_peer"] == 1 + 20 + 1  # hello, steps, bye


def test_a_lost_and_regained_collector_is_said_and_held_messages_arrive(tmp_path, caplog,
                                                                        started):
    ep = f"ipc://{tmp_path}/c.sock"
    first = CollectorProc(tmp_path, ep, name="first").start()
    started.append(first)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        tw = TrainerClient(endpoint=ep, run="flaky", rank=0, world_size=1)
        assert _until(lambda: tw.stats["connected"], 30)
        for i in range(5):
            tw.log_step(torch.tensor(float(i)))
        assert _until(lambda: tw.stats["handed_to_socket"] == 6 and not tw.stats["queued"], 30)
        time.sleep(0.5)  # let the collector write them
        first.stop(signal.SIGKILL)
        assert _until(lambda: warnings_with(caplog, "lost the collector"), 30)
        assert not tw.stats["connected"]
        for i in range(5, 15):  # logged while no collector is there: held, not dropped
            tw.log_step(torch.tensor(float(i)))
        time.sleep(0.3)
        assert tw.stats["queued"] == 10 and tw.stats["dropped"] == 0
        second = CollectorProc(tmp_path, ep, "--once", name="second").start()
        started.append(second)
        assert _until(lambda: warnings_with(caplog, "is back after"), 30)
        tw.close(timeout=30)
    assert second.wait(60) == 0, second.log.read_text()[-2000:]
    assert len(warnings_with(caplog, "lost the collector")) == 1
    assert len(warnings_with(caplog, "is back after")) == 1
    assert not warnings_with(caplog, "no collector")
    s = tw.stats
    assert s["dropped"] == 0 and s["handed_to_socket"] == 1 + 15 + 1
    got = [m.body[0] for m in _recorded(second.record) if m.kind == wire.KIND_STEP]
    assert got == [float(i) for i in range(5, 15)]


def test_stats_and_bye_say_handed_to_socket_and_losses_match_the_collector(tmp_path, started):
    """A burst made before the collector exists: the queue holds 5, the rest are dropped
    and counted; the collector's gaps equal the drops the client reported, exactly."""
    ep = f"ipc://{tmp_path}/c.sock"
    script = f"""
import json, sys, time, torch
from trainer_client import TrainerClient
tw = TrainerClient(endpoint={ep!r}, run="burst", rank=0, world_size=1, max_queue=5)
for i in range(40):
    tw.log_step(torch.tensor(float(i)))
print("logged", flush=True)
sys.stdin.readline()  # the collector is up now: the socket reconnects within ~2 s
deadline = time.monotonic() + 30
while not tw.stats["connected"] and time.monotonic() < deadline:
    time.sleep(0.02)
tw.close(timeout=30)
json.dump(tw.stats, open({str(tmp_path / "stats.json")!r}, "w"))
"""
    trainer = subprocess.Popen([sys.executable, "-c", script], env=env(), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert trainer.stdout.readline().strip() == "logged"
    col = CollectorProc(tmp_path, ep, "--once", "--quiet", "1").start()
    started.append(col)
    trainer.communicate("go\n", timeout=60)
    assert trainer.returncode == 0
    assert col.wait(60) == 0
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["dropped"] == stats["dropped_by_reason"]["queue_full"] == 1 + 40 + 1 - 5 - 1
    msgs = _recorded(col.record)
    assert stats["handed_to_socket"] == len(msgs) == 5 + 1  # the held five, then the bye
    bye = msgs[-1]
    assert bye.kind == wire.KIND_BYE
    assert bye.body["stats"]["handed_to_socket"] == len(msgs)
    assert bye.body["stats"]["queue_full"] == stats["dropped"]
    r = subprocess.run([sys.executable, "-m", "collector", "inspect", str(col.record), "--json"],
                       env=env(), capture_output=True, text=True, timeout=120, check=True)
    c = json.loads(r.stdout)["runs"]["burst"]["ranks"]["0"]
    assert c["messages"] == stats["handed_to_socket"]
    assert c["seq_gaps"] == c["reported_drops"] == stats["dropped"]


def test_a_refused_curve_key_is_named_in_the_warning(tmp_path, caplog, started):
    keys, other = tmp_path / "keys", tmp_path / "other"
    for d in (keys, other):
        subprocess.run([sys.executable, "-m", "collector", "keys", "generate", str(d)],
                       env=env(), check=True, capture_output=True, timeout=120)
    intruder = tmp_path / "intruder"  # the right server key, a client key never authorized
    intruder.mkdir()
    for f in ("client.key", "client.key_secret"):
        (intruder / f).write_bytes((other / f).read_bytes())
    (intruder / "server.key").write_bytes((keys / "server.key").read_bytes())
    ep = free_tcp()
    col = CollectorProc(tmp_path, ep, "--curve-keys", str(keys)).start()
    started.append(col)
    with caplog.at_level("WARNING", logger="trainwatch.client"):
        tw = TrainerClient(endpoint=ep, run="intruder", rank=0, world_size=1,
                           curve_keys=str(intruder))
        tw.log_step(torch.tensor(1.0))
        assert _until(lambda: warnings_with(caplog, "no collector"), 30)
        tw.close(timeout=30)
    (msg,) = warnings_with(caplog, "no collector")
    assert "CURVE handshake was refused" in msg
    assert tw.stats["handed_to_socket"] == 0 and tw.stats["dropped"] == 3
