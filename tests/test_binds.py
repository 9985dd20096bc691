"""The bind guard reads endpoints as libzmq does: checked against libzmq's own binds, and
against real collector and forwarder processes (the source-address bypass, IPv6)."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
import sys
import time

import pytest
import zmq
from conftest import CollectorProc, env, finish, free_tcp, start_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.ingest import binds

TRICKY = [
    "tcp://127.0.0.1:0", "tcp://127.1:0", "tcp://2130706433:0", "tcp://0x7f.1:0",
    "tcp://0177.0.0.1:0", "tcp://localhost:0", "tcp://lo:0", "tcp://*:0", "tcp://0:0",
    "tcp://0.0.0.0:0", "tcp://:0", "tcp://[::1]:0", "tcp://::1:0", "tcp://[::1%lo]:0",
    "tcp://[::]:0", "tcp://[::ffff:127.0.0.1]:0", "tcp://[::ffff:0.0.0.0]:0",
    "tcp://127.0.0.1%lo:0", "tcp://127.0.0.1:0;0.0.0.0:0", "tcp://0.0.0.0:0;127.0.0.1:0",
    "tcp://lo:0;*:0", "tcp://[::1]:0;[::]:0", "tcp://127.0.0.1:0;127.0.0.1:0;0.0.0.0:0",
    "tcp://127.0.0.1 :0", "tcp://[127.0.0.1]:0", "tcp://127.255.255.254:0",
]
TRICKY += [f"tcp://{name}:0" for _, name in socket.if_nameindex()]  # this host's interfaces


def _where_libzmq_binds(endpoint: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Bind a real socket as the collector would (zmq.IPV6 where needed); the address it
    listens on, or None if libzmq refuses the endpoint."""
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.PULL)
    try:
        binds.bind_all(s, [endpoint])
    except binds.BindError:
        return None
    finally:
        last = s.getsockopt(zmq.LAST_ENDPOINT).decode()
        s.close(0)
    host = last[len("tcp://"):].rpartition(":")[0].strip("[]")
    return ipaddress.ip_address(host)


def _is_loopback(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(a, "ipv4_mapped", None)
    return (mapped or a).is_loopback


@pytest.mark.parametrize("endpoint", TRICKY)
def test_the_guard_resolves_where_libzmq_binds(endpoint):
    where = _where_libzmq_binds(endpoint)
    ipv6 = binds.needs_ipv6(endpoint)
    ep = binds.parse(endpoint)
    found = binds.resolve(ep, ipv6)
    if where is None:
        assert found is None or binds.exposure(endpoint, ipv6) is not None
        return
    assert found is not None, f"libzmq bound {where}, the guard cannot resolve it"
    if found == []:  # '*': every interface
        assert where.is_unspecified
    else:
        assert where == found[0]
    assert (binds.exposure(endpoint, ipv6) is None) == _is_loopback(where)


_hosts = st.sampled_from(["127.0.0.1", "127.1", "0", "0.0.0.0", "*", "lo", "localhost",
                          "[::1]", "::1", "[::]", "[::ffff:127.0.0.1]", "2130706433", "",
                          "eth0", "[::1%lo]", "0x7f000001", "127.0.0.1%lo", "1.2.3.4"])
_part = st.builds(lambda h, p: f"{h}:{p}", _hosts, st.sampled_from(["0", "*"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_part, min_size=1, max_size=3))
def test_whatever_the_guard_allows_listens_on_loopback_only(parts):
    endpoint = "tcp://" + ";".join(parts)
    ipv6 = binds.needs_ipv6(endpoint)
    if binds.exposure(endpoint, ipv6) is None:
        where = _where_libzmq_binds(endpoint)
        assert where is None or _is_loopback(where), f"{endpoint} allowed, binds {where}"


@pytest.mark.parametrize("endpoint", [
    "tcp://0.0.0.0:5603\x00;127.0.0.1:5602",  # pyzmq's C string ends at the NUL
    "tcp://127.0.0.1:5602\n", "ipc:///tmp/a\x1b[2J",
])
def test_an_endpoint_with_a_control_character_is_refused_even_when_insecure(endpoint):
    with pytest.raises(binds.BindError) as exc:
        binds.check_binds([endpoint], curve=False, insecure=True)
    assert "\n" not in str(exc.value) and "\x00" not in str(exc.value)


def _port() -> int:
    return int(free_tcp().rsplit(":", 1)[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _collect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", "collect", *args,
                           "--wandb-mode", "disabled", "--no-view"], env=env(),
                          capture_output=True, text=True, timeout=60)


def test_the_source_address_bypass_is_refused_by_a_real_collector(tmp_path):
    src, dst = _port(), _port()
    r = _collect("--bind", f"tcp://127.0.0.1:{src};0.0.0.0:{dst}",
                 "--record", str(tmp_path / "r.twrec"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "0.0.0.0" in lines[0] and "--curve-keys" in lines[0] and "--insecure" in lines[0]
    assert not _listening(dst) and not _listening(src)
    assert not (tmp_path / "r.twrec").exists()  # refused before the recording is touched


def test_with_insecure_the_bypass_endpoint_really_listens_everywhere(tmp_path):
    """What the guard refuses is real: libzmq listens on the part after the ';'."""
    dst = _port()
    col = CollectorProc(tmp_path, f"tcp://127.0.0.1:{_port()};0.0.0.0:{dst}", "--insecure")
    col.start()
    try:
        log = col.log.read_text()
        assert "NO authentication" in log and "every interface" not in log
        assert "0.0.0.0, which is not loopback" in log
        assert _listening(dst)
    finally:
        assert col.stop() == 0


@pytest.mark.parametrize("endpoint", ["tcp://*:{p}", "tcp://0:{p}", "tcp://eth0:{p}",
                                      "tcp://[::]:{p}", "tcp://lo:1;*:{p}", "tipc://x"])
def test_exposed_forms_are_refused_in_one_line(endpoint):
    r = _collect("--bind", endpoint.format(p=_port()))
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "refusing to bind" in r.stderr


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_ipv6_loopback_collects_or_is_refused_in_one_line(tmp_path):
    ep = f"tcp://[::1]:{_port()}"
    if not _ipv6_loopback():  # a host without IPv6: one line, no traceback
        r = _collect("--bind", ep)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        return
    col = CollectorProc(tmp_path, ep, "--once", "--quiet", "1").start()
    out = tmp_path / "t.json"
    finish([start_trainer(ep, "v6", 0, 1, out, epochs=2, steps=5)])
    assert col.wait(60) == 0, col.log.read_text()[-2000:]
    assert [r["epoch"] for r in col.records() if r["type"] == "epoch"] == [1, 2]
    stats = json.loads(out.read_text())["stats"]
    assert stats["sent"] > 10 and stats["dropped"] == 0


def test_a_bind_that_fails_is_one_line_not_a_traceback(tmp_path):
    port = _port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = _collect("--bind", f"tcp://127.0.0.1:{port}")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"trainwatch collect: cannot bind tcp://127.0.0.1:{port}: Address already in use"]


def test_forward_relays_from_ipv6_loopback_and_refuses_the_bypass(tmp_path, ipc):
    r = subprocess.run([sys.executable, "-m", "collector", "forward", "--bind",
                        f"tcp://[::1]:1;0.0.0.0:{_port()}", "--connect", ipc], env=env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "refusing to bind" in r.stderr
    if not _ipv6_loopback():
        return
    col = CollectorProc(tmp_path, ipc, "--once", "--quiet", "1").start()
    front = f"tcp://[::1]:{_port()}"
    fwd = subprocess.Popen([sys.executable, "-m", "collector", "forward", "--bind", front,
                            "--connect", ipc], env=env(), stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # the relay binds; the client's first-connect grace covers the rest
        assert fwd.poll() is None, fwd.stderr.read()
        out = tmp_path / "t.json"
        finish([start_trainer(front, "relayed", 0, 1, out, epochs=2, steps=5)])
        assert col.wait(60) == 0, col.log.read_text()[-2000:]
    finally:
        fwd.terminate()
        fwd.wait(30)
    assert [r["epoch"] for r in col.records() if r["type"] == "epoch"] == [1, 2]
    assert json.loads(out.read_text())["stats"]["dropped"] == 0
