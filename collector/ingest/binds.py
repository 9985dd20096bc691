"""Bind endpoints read the way libzmq reads them, and the guard on exposed ones.

    binds = ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "ipc:///tmp/tw.sock"]
    check_binds(binds, curve=False, insecure=False)  # BindError (one line) if exposed
    bind_all(sock, binds)            # zmq.IPV6 where needed; BindError on a failed bind

libzmq 4.3 (``socket_base.cpp`` parse_uri, ``tcp_address.cpp`` resolve,
``ip_resolver.cpp``) reads ``tcp://[source;]host:port`` like this, and so does ``resolve``:

- the transport is what precedes the first ``://``, compared exactly (``TCP://`` is no tcp);
- the part after the *last* ``;`` is what a bind listens on; what comes before it is a
  source address, which only a connect uses (so ``tcp://127.0.0.1:1;0.0.0.0:2`` listens
  on every interface, port 2);
- the port follows the last ``:``; brackets around the host are dropped, then a ``%zone``;
- ``*`` is every interface; then a network interface's name (``lo``, ``eth0``) is tried,
  meaning that interface's first address of the socket's family; then ``getaddrinfo``
  (numeric forms such as ``127.1``, ``0`` = 0.0.0.0 or ``2130706433``, then host names);
- the socket's ``zmq.IPV6`` option decides the family: without it an IPv6 host does not
  resolve at all; with it IPv4 hosts resolve as ``::ffff:a.b.c.d``.

pyzmq passes the endpoint as a C string, so a NUL ends it there: an endpoint with any
control character is refused outright (``tcp://0.0.0.0:1\\0;127.0.0.1:2`` would otherwise
read as loopback here and bind every interface there).

Without CURVE keys or ``--insecure``, the guard allows what is plainly local: ipc, inproc,
and tcp whose listening address, resolved as above under the socket's family, is
loopback: a loopback address in any numeric form, a loopback interface's name, or
``localhost`` (looked up; every answer must be loopback). Any other host name is refused
without a lookup: what DNS says today is not plainly local.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import NamedTuple

import zmq

from collector.text import printable

__all__ = ["BindError", "Endpoint", "bind_all", "check_binds", "connect", "exposure",
           "needs_ipv6", "parse", "resolve"]

_log = logging.getLogger("trainwatch.collector")

LOCAL_TRANSPORTS = ("ipc", "inproc")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class BindError(ValueError):
    """An endpoint that will not be bound; the message is one line for the user."""


class Endpoint(NamedTuple):
    """An endpoint split as libzmq splits it (tcp fields are None for other transports)."""

    text: str
    transport: str
    address: str  # everything after "://"
    source: str | None  # tcp: the part before the last ';'
    host: str | None  # tcp: brackets and %zone removed
    port: str | None


def parse(endpoint: str) -> Endpoint:
    """Split ``endpoint``; BindError if libzmq could not read it at all."""
    if not endpoint.isprintable():
        raise BindError(f"endpoint {printable(endpoint)} holds a control character")
    transport, sep, address = endpoint.partition("://")
    if not sep or not transport or not address:
        raise BindError(f"{endpoint!r} is no endpoint: expected transport://address, e.g. "
                        "tcp://127.0.0.1:5555 or ipc:///tmp/trainwatch.sock")
    if transport != "tcp":
        return Endpoint(endpoint, transport, address, None, None, None)
    source, semi, listen = address.rpartition(";")
    host, colon, port = listen.rpartition(":")
    if not colon:
        raise BindError(f"{endpoint} has no port (tcp://host:port)")
    if len(host) >= 2 and host[0] == "[" and host[-1] == "]":
        host = host[1:-1]
    if "%" in host:  # an IPv6 zone (interface) follows the last '%'
        host, _, zone = host.rpartition("%")
        if not zone:
            raise BindError(f"{endpoint} has an empty zone after '%'")
    return Endpoint(endpoint, transport, address, source if semi else None, host, port)


def _interface_address(name: str, ipv6: bool) -> IPAddress | None:
    """The address libzmq binds for an interface name: its first of the family, or None
    when no interface has that name (or it has no such address): then it is no name."""
    try:
        import psutil

        addrs = psutil.net_if_addrs().get(name)
    except (ImportError, OSError):
        return None
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    for a in addrs or ():
        if a.family == family:
            return ipaddress.ip_address(a.address.partition("%")[0])
    return None


def _getaddrinfo(host: str, ipv6: bool, numeric: bool) -> list[IPAddress]:
    flags = socket.AI_PASSIVE | (socket.AI_NUMERICHOST if numeric else 0)
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    if ipv6:
        flags |= socket.AI_V4MAPPED
    try:  # as bytes: no IDNA rewriting of the name on its way to libc, as in libzmq
        infos = socket.getaddrinfo(host.encode(), None, family, socket.SOCK_STREAM, 0, flags)
    except (OSError, UnicodeError):
        return []
    return [ipaddress.ip_address(i[4][0].partition("%")[0]) for i in infos]


def resolve(ep: Endpoint, ipv6: bool, names: bool = True) -> list[IPAddress] | None:
    """Where a tcp bind of ``ep`` listens: [] for every interface (``*``), the candidate
    addresses (libzmq takes the first), or None if it does not resolve. ``names``: look
    host names up too (libzmq does, DNS included); else only addresses and interfaces."""
    host = ep.host or ""
    if host == "*":
        return []
    nic = _interface_address(host, ipv6)
    if nic is not None:
        return [nic]
    found = _getaddrinfo(host, ipv6, numeric=True)
    if not found and names:
        found = _getaddrinfo(host, ipv6, numeric=False)
    return found or None


def _loopback(a: IPAddress) -> bool:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return a.ipv4_mapped.is_loopback
    return a.is_loopback


def needs_ipv6(endpoint: str) -> bool:
    """Whether a tcp endpoint resolves only with ``zmq.IPV6`` set (e.g. ``tcp://[::1]:P``)."""
    try:
        ep = parse(endpoint)
    except BindError:
        return False
    if ep.transport != "tcp" or ep.host == "*":
        return False
    # Addresses and interfaces only: a name with only IPv6 addresses is not worth a DNS
    # query per endpoint (libzmq then says "No such device"; bind its address instead).
    return resolve(ep, False, names=False) is None and resolve(ep, True, names=False) \
        is not None


def _ipv6(binds: list[str]) -> bool:
    """One socket, one family: zmq.IPV6 is set if any endpoint needs it."""
    return any(needs_ipv6(b) for b in binds)


def exposure(endpoint: str, ipv6: bool) -> str | None:
    """None if a bind of ``endpoint`` is plainly local, else why it is not (a few words)."""
    ep = parse(endpoint)
    if ep.transport in LOCAL_TRANSPORTS:
        return None
    if ep.transport != "tcp":
        return f"transport {printable(ep.transport)!r} is not ipc, inproc or tcp on loopback"
    # A host name other than localhost is not plainly loopback, whatever DNS says today.
    where = resolve(ep, ipv6, names=(ep.host or "").lower() == "localhost")
    if where is None:
        return (f"its host {printable(ep.host)!r} is no loopback address, loopback "
                "interface or localhost")
    if not where:
        return "it listens on every interface"
    outside = [str(a) for a in where if not _loopback(a)]
    if outside:
        return f"it listens on {outside[0]}, which is not loopback"
    return None


def check_binds(binds: list[str], curve: bool, insecure: bool, warn: bool = True) -> None:
    """Refuse a bind that is not plainly local without CURVE unless the user said
    --insecure (BindError, one line); with --insecure, warn (unless ``warn`` is False)."""
    ipv6 = _ipv6(binds)
    exposed = [(b, why) for b in binds if (why := exposure(b, ipv6)) is not None]
    if exposed and not curve:
        shown = "; ".join(f"{b} ({why})" for b, why in exposed)
        if not insecure:
            raise BindError(
                f"refusing to bind {shown} without authentication: pass --curve-keys DIR "
                "(made by 'trainwatch keys generate DIR'), or --insecure to accept anyone "
                "who can reach that address")
        if warn:
            _log.warning("binding %s with NO authentication (--insecure)", shown)


def bind_all(sock: zmq.Socket, binds: list[str]) -> None:
    """Bind ``sock`` to every endpoint, with ``zmq.IPV6`` set where one needs it; a
    failure (address in use, no such device) is a BindError naming the endpoint."""
    if _ipv6(binds):
        sock.setsockopt(zmq.IPV6, 1)
    for b in binds:
        try:
            sock.bind(b)
        except zmq.ZMQError as exc:
            raise BindError(f"cannot bind {printable(b)}: {zmq.strerror(exc.errno)}") from None


def connect(sock: zmq.Socket, endpoint: str) -> None:
    """Connect ``sock`` (``zmq.IPV6`` where needed); BindError on a bad endpoint."""
    if needs_ipv6(endpoint):
        sock.setsockopt(zmq.IPV6, 1)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise BindError(f"cannot connect to {printable(endpoint)}: {zmq.strerror(exc.errno)}") \
                         from None
