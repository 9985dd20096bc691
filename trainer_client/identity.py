"""Who this process is in the job: endpoint, run id, rank and world size.

The one place the client reads its environment. The run id must be the same on every
rank of a job without the ranks talking to each other, so it comes from the launcher.
"""

from __future__ import annotations

import os
import socket
import time

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


def resolve_endpoint(endpoint: str | None) -> str:
    return endpoint or os.environ.get("TRAINWATCH_ENDPOINT") or DEFAULT_ENDPOINT


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
