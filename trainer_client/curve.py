"""Loading the client's CURVE keys from a folder made by ``trainwatch keys generate``.

Layout: ``server.key`` (the collector's public key), ``client.key`` and
``client.key_secret`` (this client's pair). Certificates are zmq.auth's text format.
"""

from __future__ import annotations

from pathlib import Path

import zmq
import zmq.auth


def client_keys(folder: str | Path) -> dict[str, bytes]:
    """The keys a PUSH socket needs: {"public", "secret", "server"}; clear errors if absent."""
    d = Path(folder)
    try:
        public, secret = zmq.auth.load_certificate(d / "client.key_secret")
        server, _ = zmq.auth.load_certificate(d / "server.key")
    except (OSError, ValueError) as exc:
        raise ValueError(f"trainwatch: cannot load CURVE client keys from {d}: {exc}") from None
    if secret is None:
        raise ValueError(f"trainwatch: {d / 'client.key_secret'} holds no secret key")
    return {"public": public, "secret": secret, "server": server}


def load_client_keys(folder: str | Path | None) -> dict[str, bytes] | None:
    """``client_keys(folder)``, or None for no folder (no CURVE)."""
    return client_keys(folder) if folder else None


def use_client_keys(sock: zmq.Socket, keys: dict[str, bytes] | None) -> None:
    """Make ``sock`` a CURVE client of the collector with ``keys`` (``client_keys``): only
    a peer holding the collector's secret key gets through. None: no CURVE."""
    if keys:
        sock.curve_secretkey = keys["secret"]
        sock.curve_publickey = keys["public"]
        sock.curve_serverkey = keys["server"]
