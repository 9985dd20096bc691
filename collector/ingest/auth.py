"""CURVE keys: generating a key folder and serving with only authorized clients.

    trainwatch keys generate DIR

writes ``DIR/server.key`` + ``server.key_secret`` (the collector), ``DIR/client.key`` +
``client.key_secret`` (the ranks), and ``DIR/authorized/client.key`` (the public keys the
collector accepts; add more clients' ``.key`` files there). Copy the folder to the
collector without ``client.key_secret`` and to the ranks without ``server.key_secret``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator


def generate(folder: str | Path) -> Path:
    d = Path(folder)
    (d / "authorized").mkdir(parents=True, exist_ok=True)
    for name in ("server", "client"):
        if (d / f"{name}.key_secret").exists():
            raise FileExistsError(f"{d / (name + '.key_secret')} exists; not overwriting keys")
    for name in ("server", "client"):
        zmq.auth.create_certificates(str(d), name)
        os.chmod(d / f"{name}.key_secret", 0o600)
    shutil.copy(d / "client.key", d / "authorized" / "client.key")
    return d


def server_keys(folder: str | Path) -> tuple[bytes, bytes]:
    d = Path(folder)
    try:
        public, secret = zmq.auth.load_certificate(d / "server.key_secret")
    except (OSError, ValueError) as exc:
        raise SystemExit(f"trainwatch: cannot load the server keys from {d}: {exc}") from None
    if secret is None or not (d / "authorized").is_dir():
        raise SystemExit(f"trainwatch: {d} needs server.key_secret and an authorized/ folder")
    return public, secret


def start_authenticator(ctx: zmq.Context, sock: zmq.Socket, folder: str | Path
                        ) -> ThreadAuthenticator:
    """Make ``sock`` a CURVE server that accepts only keys in ``folder/authorized``; the
    authenticator serves every socket of ``ctx`` made one with ``curve_server``."""
    public, secret = server_keys(folder)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(Path(folder) / "authorized"))
    curve_server(sock, folder)
    return auth


def curve_server(sock: zmq.Socket, folder: str | Path) -> None:
    """Give ``sock`` the collector's keys as a CURVE server (e.g. the back-channel's PUB
    beside the PULL): the context's authenticator then admits only authorized clients."""
    public, secret = server_keys(folder)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True
