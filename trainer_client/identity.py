"""Who this process is in the job: endpoint, run id, rank and world size.

The one place the client reads its environment. The run id must be the same on every
rank of a job without the ranks talking to each other, so it comes from the launcher.
"""

from __future__ import annotations

import os
import re
import socket
import time

import zmq

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"
ENDPOINT_FORMS = "tcp://host:port (e.g. tcp://127.0.0.1:5555) or ipc://path (e.g. ipc:///tmp/tw.sock)"
_IPC_PATH_MAX = 107  # a Unix socket path: sun_path holds 108 bytes with the NUL
_TCP = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]*;]+):(\d{1,5})")


def resolve_endpoint(endpoint: str | None) -> str:
    """Argument, else TRAINWATCH_ENDPOINT, else the default; a malformed one is a ValueError
    that names where it came from (ZeroMQ would only fail later, on the sender thread)."""
    source = "endpoint"
    if not endpoint:
        endpoint, source = os.environ.get("TRAINWATCH_ENDPOINT"), "TRAINWATCH_ENDPOINT"
    if not endpoint:
        return DEFAULT_ENDPOINT
    check_endpoint(endpoint, source)
    return endpoint


def resolve_health_endpoint(health_endpoint: str | None, endpoint: str) -> str | None:
    """The back-channel's endpoint: argument, else TRAINWATCH_HEALTH_ENDPOINT, else the one
    beside ``endpoint`` (tcp port + 1, ipc path + ``.health``); "none" (or one that cannot
    be derived) is None: no back-channel. A malformed one is a ValueError."""
    from .wire.health import health_endpoint as beside

    source = "health_endpoint"
    if not health_endpoint:
        health_endpoint = os.environ.get("TRAINWATCH_HEALTH_ENDPOINT")
        source = "TRAINWATCH_HEALTH_ENDPOINT"
    if not health_endpoint:
        derived = beside(endpoint)
        return derived if derived is not None and not _endpoint_problem(derived) else None
    if health_endpoint == "none":
        return None
    check_endpoint(health_endpoint, source)
    return health_endpoint


def ipv6_host(endpoint: str) -> bool:
    """A tcp endpoint whose host is an IPv6 address: the host precedes the port's ':',
    after any source address (``src;host:port``), as libzmq reads it (a socket then needs
    ``zmq.IPV6``, else libzmq cannot even resolve ``tcp://[::1]:P``)."""
    if not endpoint.startswith("tcp://"):
        return False
    return ":" in endpoint[6:].rpartition(";")[2].rpartition(":")[0]


def dial_options(sock: zmq.Socket, endpoint: str) -> None:
    """What every client-side socket to ``endpoint`` takes before it connects: a quick
    reconnect that backs off to 2 s, and ``zmq.IPV6`` for an IPv6 host."""
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    if ipv6_host(endpoint):
        sock.setsockopt(zmq.IPV6, 1)


def check_endpoint(endpoint: str, source: str) -> None:
    """Raise ValueError unless ``endpoint`` is tcp://host:port or ipc://path."""
    why = _endpoint_problem(endpoint)
    if why:
        raise ValueError(f"trainwatch: {source}={endpoint!r} is not a collector endpoint "
                         f"({why}); expected {ENDPOINT_FORMS}")


def _endpoint_problem(ep: str) -> str | None:
    if not isinstance(ep, str):
        return f"a {type(ep).__name__}, not a string"
    if ep.startswith("ipc://"):
        path = ep[len("ipc://"):]
        if not path or any(c.isspace() for c in path):
            return "an empty path or one with spaces"
        if len(path.encode()) > _IPC_PATH_MAX:
            return f"the path is longer than a Unix socket's {_IPC_PATH_MAX} bytes"
        return None
    if ep.startswith("tcp://"):
        m = _TCP.fullmatch(ep)
        if m is None:
            return "tcp:// takes host:port, a numeric port, no wildcard or spaces"
        if not 1 <= int(m.group(2)) <= 65535:
            return "the port must be 1-65535"
        return None
    return "no tcp:// or ipc:// scheme"


def resolve_run(run: str | None) -> str:
    """Argument, else TRAINWATCH_RUN, else an id every rank of the job derives alike."""
    if run:
        return run
    env = os.environ
    if env.get("TRAINWATCH_RUN"):
        return env["TRAINWATCH_RUN"]
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return f"torchrun-{rdzv}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '0')}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"job-{env['MASTER_ADDR']}-{env['MASTER_PORT']}"
    # A single process: unique per launch.
    return f"{socket.gethostname()}-{os.getpid()}-{int(time.time())}"


def resolve_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Argument, else torch.distributed when initialised, else RANK/WORLD_SIZE, else 0/1."""
    if rank is None or world_size is None:
        r, w = None, None
        try:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                r, w = dist.get_rank(), dist.get_world_size()
        except ImportError:
            pass
        if r is None:
            r = int(os.environ.get("RANK", "0"))
            w = int(os.environ.get("WORLD_SIZE", "1"))
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not within world_size {world_size}")
    return rank, world_size


def wandb_env() -> dict[str, str]:
    """The WANDB_* variables of this process, forwarded so a sweep's run lands in its sweep."""
    return {k: v for k, v in os.environ.items() if k.startswith("WANDB_") and k != "WANDB_API_KEY"}
