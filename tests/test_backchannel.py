"""The back-channel on the network: CURVE keeps unauthorized peers from reading verdicts or
sending stops, the bind guard covers its endpoint, and ``trainwatch forward`` relays it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pytest
import zmq
import zmq.auth
from conftest import CollectorProc, env
from test_security import _keys
from test_stop_ddp import (
    DIAGNOSIS,
    EPOCHS,
    EXPLODE,
    STEPS,
    STOP_RULES,
    free_port,
    job,
    wait_ready,
)

from trainer_client import TrainerClient
from trainer_client.curve import client_keys
from trainer_client.wire import health as hw


def free_pair() -> int:
    """A loopback port P with P + 1 (its back-channel) free too."""
    for _ in range(50):
        p = free_port()
        if p < 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p + 1))
                    return p
                except OSError:
                    continue
    raise RuntimeError("no free pair of ports")


def _tcp_collector(tmp, port: int, *extra: str) -> CollectorProc:
    (tmp / "stop.toml").write_text(STOP_RULES)
    col = CollectorProc(tmp, f"tcp://127.0.0.1:{port}", "--once", "--quiet", "1",
                        "--stop-on", DIAGNOSIS, "--rules", str(tmp / "stop.toml"),
                        *extra).start()
    wait_ready(col)
    return col


def _sub(ctx: zmq.Context, endpoint: str, keys: dict | None) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    if keys:
        s.curve_secretkey, s.curve_publickey = keys["secret"], keys["public"]
        s.curve_serverkey = keys["server"]
    s.setsockopt(zmq.SUBSCRIBE, b"")  # everything the PUB would give it
    s.connect(endpoint)
    return s


def test_an_unauthorized_subscriber_reads_nothing(tmp_path):
    keys, other = _keys(tmp_path, "k"), _keys(tmp_path, "other")
    intruder = {**client_keys(other), "server": client_keys(keys)["server"]}
    port = free_pair()
    col = _tcp_collector(tmp_path, port, "--curve-keys", str(keys))
    ctx = zmq.Context()
    health = f"tcp://127.0.0.1:{port + 1}"
    subs = {"other keys": _sub(ctx, health, intruder), "no keys": _sub(ctx, health, None),
            "authorized": _sub(ctx, health, client_keys(keys))}
    got: dict[str, list] = {name: [] for name in subs}
    done: list = []

    def listen() -> None:
        while not done:
            for name, s in subs.items():
                while s.poll(0):
                    got[name].append(s.recv_multipart())
            time.sleep(0.02)

    t = threading.Thread(target=listen, daemon=True)
    t.start()
    try:
        ranks = job(tmp_path, col.endpoint, "curve-run", world=1, explode=EXPLODE,
                    curve_keys=keys)
        assert col.wait(120) == 0, col.log.read_text()[-3000:]
    finally:
        done.append(1)
        t.join(5)
        for s in subs.values():
            s.close(0)
        ctx.term()
    assert got["other keys"] == [] and got["no keys"] == []
    # the authorized one heard the run's verdicts and its stop: the others could have
    heard = [hw.decode(m, "curve-run") for m in got["authorized"]]
    assert any(isinstance(m, hw.Stop) and m.rule == DIAGNOSIS for m in heard)
    assert ranks[0]["stopped"] and ranks[0]["steps"] < EPOCHS * STEPS


@pytest.mark.parametrize("rogue", ["plaintext", "another server key", "the real server key"])
def test_a_rogue_publisher_cannot_make_a_client_stop(tmp_path, rogue):
    keys, other = _keys(tmp_path, "k"), _keys(tmp_path, "other")
    port = free_port()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    if rogue != "plaintext":  # a CURVE server with the collector's keys, or with its own
        public, secret = zmq.auth.load_certificate(
            (keys if rogue == "the real server key" else other) / "server.key_secret")
        pub.curve_secretkey, pub.curve_publickey, pub.curve_server = secret, public, True
    pub.bind(f"tcp://127.0.0.1:{port}")
    tw = TrainerClient(endpoint=f"ipc://{tmp_path}/none.sock", run="victim", rank=0,
                       world_size=1, curve_keys=str(keys),
                       health_endpoint=f"tcp://127.0.0.1:{port}")
    import torch

    stop = hw.Stop(1, 0, 1, DIAGNOSIS)
    stops = []
    deadline = time.monotonic() + (8.0 if rogue == "the real server key" else 4.0)
    while time.monotonic() < deadline:
        for m in (hw.State(1, 0, "critical", (), stop), stop):
            pub.send_multipart(hw.encode(m, "victim"))
        tw.log_step(torch.tensor(1.0))
        stops.append(tw.should_stop)
        if stops[-1]:
            break
        time.sleep(0.05)
    received = tw.stats["health"]["received"]
    tw.close(timeout=0.5)
    pub.close(0)
    ctx.term()
    if rogue == "the real server key":  # the control: these messages do stop a client
        assert stops[-1] and received > 0
    else:
        assert len(stops) > 20 and not any(stops) and received == 0
        assert tw.health.level == "unknown"


def _collect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", "collect", "--wandb-mode",
                           "disabled", "--no-view", *args], env=env(), capture_output=True,
                          text=True, timeout=60)


def test_the_bind_guard_covers_the_back_channel():
    port = free_pair()
    r = _collect("--bind", f"tcp://127.0.0.1:{port}", "--health-bind", f"tcp://0.0.0.0:{port + 1}")
    assert r.returncode == 2 and f"tcp://0.0.0.0:{port + 1}" in r.stderr
    assert "--curve-keys" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _collect("--bind", "tcp://127.0.0.1:65535")
    assert r.returncode == 2 and "--health-bind" in r.stderr


def test_a_derived_back_channel_in_use_is_a_warning_a_named_one_an_error(tmp_path):
    port = free_pair()
    taken = socket.socket()
    taken.bind(("127.0.0.1", port + 1))
    taken.listen()
    try:
        col = CollectorProc(tmp_path, f"tcp://127.0.0.1:{port}").start()
        assert col.stop() == 0
        assert "no back-channel" in col.log.read_text()
        r = _collect("--bind", f"tcp://127.0.0.1:{free_pair()}", "--health-bind",
                     f"tcp://127.0.0.1:{port + 1}")
        assert r.returncode == 2 and "cannot bind" in r.stderr
    finally:
        taken.close()


def test_forward_relays_the_back_channel_to_a_nodes_ranks(tmp_path):
    port = free_pair()
    col = _tcp_collector(tmp_path, port)
    node = f"ipc://{tmp_path}/node.sock"
    fwd = subprocess.Popen([sys.executable, "-m", "collector", "forward", "--bind", node,
                            "--connect", f"tcp://127.0.0.1:{port}"], env=env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        ranks = job(tmp_path, node, "relayed", explode=EXPLODE)
        assert col.wait(120) == 0, col.log.read_text()[-3000:]
    finally:
        fwd.send_signal(2)
        out, _ = fwd.communicate(timeout=30)
    stops = [r["step"] for r in col.records() if r["type"] == "stop"]
    assert len(stops) == 1, out.decode()[-2000:]
    assert [r["steps"] for r in ranks] == stops * 2 and all(r["stopped"] for r in ranks)
    assert json.loads((tmp_path / "relayed0.json").read_text())["stopped_by"] == DIAGNOSIS
