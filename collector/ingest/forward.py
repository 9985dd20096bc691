"""``trainwatch forward``: a per-node relay for when ranks cannot reach the login node.

The ranks of a node connect to it locally (ipc or loopback); it pushes everything on to
the collector with the node's CURVE keys. Messages pass through as they are (a zmq
proxy: no decoding, no copy), so gaps and drops still add up at the collector. The
back-channel is relayed the other way, beside it: an XSUB connected (with the same keys)
to the collector's PUB and an XPUB bound locally, so the ranks' subscriptions travel up
and their runs' verdicts come down.
"""

from __future__ import annotations

import threading

import zmq

from collector.ingest import binds


def _curve_client(sock: zmq.Socket, curve_keys: str | None) -> None:
    from trainer_client.curve import load_client_keys, use_client_keys

    use_client_keys(sock, load_client_keys(curve_keys))


def forward(bind: str, connect: str, curve_keys: str | None = None, hwm: int = 100_000,
            health: tuple[str, str] | None = None) -> None:
    """Relay until interrupted; an endpoint that cannot be bound or connected is a
    ``binds.BindError`` (one line), IPv6 ones (``tcp://[::1]:P``) included. ``health``:
    (where the ranks subscribe, the collector's back-channel), relayed too."""
    ctx = zmq.Context()
    front = ctx.socket(zmq.PULL)
    front.setsockopt(zmq.RCVHWM, hwm)
    back = ctx.socket(zmq.PUSH)
    socks = [front, back]
    try:
        binds.bind_all(front, [bind])
        back.setsockopt(zmq.SNDHWM, hwm)
        back.setsockopt(zmq.LINGER, 2000)
        _curve_client(back, curve_keys)
        binds.connect(back, connect)
        relay = _health_relay(ctx, health, curve_keys, socks) if health else None
    except binds.BindError:
        for s in socks:
            s.close(0)
        ctx.term()
        raise
    if relay is not None:
        relay.start()
    try:
        zmq.proxy(front, back)
    except (KeyboardInterrupt, zmq.ContextTerminated):
        pass
    finally:
        front.close(0)
        back.close()
        ctx.term()  # ends the back-channel's proxy, which closes its sockets
        if relay is not None:
            relay.join(5.0)


def _health_relay(ctx: zmq.Context, health: tuple[str, str], curve_keys: str | None,
                  socks: list[zmq.Socket]) -> threading.Thread:
    """The XPUB/XSUB pair, bound and connected here (errors are the caller's), proxied on
    a thread of its own that owns them from then on."""
    sub_bind, pub_connect = health
    xpub = ctx.socket(zmq.XPUB)
    xsub = ctx.socket(zmq.XSUB)
    socks += [xpub, xsub]
    for s in (xpub, xsub):
        s.setsockopt(zmq.LINGER, 0)
    binds.bind_all(xpub, [sub_bind])
    _curve_client(xsub, curve_keys)
    binds.connect(xsub, pub_connect)

    def run() -> None:
        try:
            zmq.proxy(xpub, xsub)
        except zmq.ContextTerminated:
            pass
        finally:
            xpub.close(0)
            xsub.close(0)

    return threading.Thread(target=run, name="trainwatch-health-relay", daemon=True)
