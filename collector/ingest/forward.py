"""``trainwatch forward``: a per-node relay for when ranks cannot reach the login node.

The ranks of a node connect to it locally (ipc or loopback); it pushes everything on to
the collector with the node's CURVE keys. Messages pass through as they are (a zmq
proxy: no decoding, no copy), so gaps and drops still add up at the collector.
"""

from __future__ import annotations

import zmq

from collector.ingest import binds


def forward(bind: str, connect: str, curve_keys: str | None = None, hwm: int = 100_000
            ) -> None:
    """Relay until interrupted; an endpoint that cannot be bound or connected is a
    ``binds.BindError`` (one line), IPv6 ones (``tcp://[::1]:P``) included."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.PULL)
    front.setsockopt(zmq.RCVHWM, hwm)
    back = ctx.socket(zmq.PUSH)
    try:
        binds.bind_all(front, [bind])
    except binds.BindError:
        front.close(0)
        back.close(0)
        ctx.term()
        raise
    back.setsockopt(zmq.SNDHWM, hwm)
    back.setsockopt(zmq.LINGER, 2000)
    if curve_keys:
        from trainer_client.curve import client_keys

        keys = client_keys(curve_keys)
        back.curve_secretkey = keys["secret"]
        back.curve_publickey = keys["public"]
        back.curve_serverkey = keys["server"]
    try:
        binds.connect(back, connect)
    except binds.BindError:
        front.close(0)
        back.close(0)
        ctx.term()
        raise
    try:
        zmq.proxy(front, back)
    except (KeyboardInterrupt, zmq.ContextTerminated):
        pass
    finally:
        front.close(0)
        back.close()
        ctx.term()
