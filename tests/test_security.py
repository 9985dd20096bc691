"""CURVE on the network: only authorized clients get in; exposed binds need a decision."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import CollectorProc, env, finish, free_tcp, start_trainer


def _port() -> int:
    return int(free_tcp().rsplit(":", 1)[1])


def _keys(tmp, name):
    d = tmp / name
    r = subprocess.run([sys.executable, "-m", "collector", "keys", "generate", str(d)],
                       env=env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return d


def test_keys_generate_writes_pairs_and_authorized(tmp_path):
    d = _keys(tmp_path, "k")
    names = {p.name for p in d.iterdir()}
    assert {"server.key", "server.key_secret", "client.key", "client.key_secret",
            "authorized"} <= names
    assert [p.name for p in (d / "authorized").iterdir()] == ["client.key"]
    assert (d / "client.key_secret").stat().st_mode & 0o077 == 0
    r = subprocess.run([sys.executable, "-m", "collector", "keys", "generate", str(d)],
                       env=env(), capture_output=True, text=True)
    assert r.returncode != 0 and "not overwriting" in r.stderr


def test_only_authorized_clients_get_in(tmp_path):
    keys = _keys(tmp_path, "k")
    other = _keys(tmp_path, "other")  # a key pair the collector never authorized
    ep = free_tcp()
    col = CollectorProc(tmp_path, ep, "--curve-keys", str(keys), "--once", "--quiet", "2")
    col.start()
    # The intruder's server key is right but its client key is not authorized.
    intruder_dir = tmp_path / "intruder"
    intruder_dir.mkdir()
    for f in ("client.key", "client.key_secret"):
        (intruder_dir / f).write_bytes((other / f).read_bytes())
    (intruder_dir / "server.key").write_bytes((keys / "server.key").read_bytes())
    procs = [
        start_trainer(ep, "intruder", 0, 1, tmp_path / "i.json", epochs=1, steps=5,
                      curve_keys=intruder_dir, close_timeout=1),
        start_trainer(ep, "plaintext", 0, 1, tmp_path / "p.json", epochs=1, steps=5,
                      close_timeout=1),
        start_trainer(ep, "member", 0, 1, tmp_path / "m.json", epochs=2, steps=5,
                      curve_keys=keys),
    ]
    finish(procs)
    assert col.wait(120) == 0, col.log.read_text()[-2000:]
    runs = {r["run"] for r in col.records()}
    assert runs == {"member"}
    member = json.loads((tmp_path / "m.json").read_text())
    assert member["stats"]["dropped"] == 0
    for name in ("i", "p"):
        assert json.loads((tmp_path / f"{name}.json").read_text())["stats"]["sent"] == 0


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1"])
def test_exposed_bind_without_keys_is_refused(tmp_path, host):
    port = _port()
    r = subprocess.run([sys.executable, "-m", "collector", "collect", "--bind",
                        f"tcp://{host}:{port}", "--wandb-mode", "disabled", "--no-view"],
                       env=env(), capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "--curve-keys" in r.stderr and "--insecure" in r.stderr


def test_insecure_bind_is_allowed_with_a_warning(tmp_path):
    port = _port()
    col = CollectorProc(tmp_path, f"tcp://0.0.0.0:{port}", "--insecure").start()
    try:
        assert "NO authentication" in col.log.read_text()
    finally:
        assert col.stop() == 0
