"""What the wandb sink decides before its first wandb call: the wandb run id of a
trainwatch run, online or offline, the settings of a sidecar's runs, where an earlier
session's offline run is set aside, and how often alerts may go out."""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["BASE_SETTINGS", "AlertGate", "resolve_mode", "supersede_offline", "wandb_run_id"]

_log = logging.getLogger("trainwatch.wandb")

# wandb.Settings for a sidecar: no console capture, no code or git snapshot, and no
# system metrics or machine metadata (they would describe the collector's host, not the
# training job's).
BASE_SETTINGS: dict[str, Any] = {
    "silent": True, "quiet": True, "console": "off", "save_code": False,
    "disable_code": True, "disable_git": True, "disable_job_creation": True,
    "x_disable_stats": True, "x_disable_meta": True, "x_disable_machine_info": True,
    "x_save_requirements": False, "reinit": "create_new",
}

def wandb_run_id(run: str) -> str:
    """A wandb run id for a trainwatch run id: the same string when it is already safe.

    Characters outside ``[A-Za-z0-9_-]`` become ``-``; a changed or over-long id gets a
    hash of the original so that two runs never share a wandb id.
    """
    clean = re.sub(r"[^A-Za-z0-9_-]", "-", run).strip("-") or "run"
    if clean == run and len(run) <= 64:
        return run
    return f"{clean[:55]}-{hashlib.sha1(run.encode()).hexdigest()[:8]}"


def resolve_mode(mode: str | None) -> str:
    """``mode`` itself, or for None: "online" when an API key is configured, else "offline"."""
    if mode is not None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode must be offline, online or disabled, not {mode!r}")
        return mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        creds = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return "offline"
    return "online" if creds and creds[2] else "offline"


class AlertGate:
    """At most ``per_min`` alerts a minute, over every run of the sink."""

    def __init__(self, per_min: int) -> None:
        self.per_min = per_min
        self._sent: deque[float] = deque()

    def allow(self, now: float) -> bool:
        while self._sent and now - self._sent[0] >= 60.0:
            self._sent.popleft()
        if len(self._sent) >= self.per_min:
            return False
        self._sent.append(now)
        return True


def supersede_offline(root: Path | None, wid: str) -> None:
    """Set an earlier session's offline directories of run ``wid`` under ``root`` (or
    ``$WANDB_DIR``) aside, renamed: a restarted collector rebuilds the run from the
    recording into a fresh one, and wandb sync then reads one directory per run."""
    base_dir = root if root is not None else Path(os.environ.get("WANDB_DIR") or ".")
    for base in (base_dir, base_dir / "wandb"):
        for d in base.glob(f"offline-run-*-{wid}"):
            d.rename(d.with_name(f"superseded-{d.name}"))
            _log.info("wandb: %s set aside; the run is rebuilt from the recording", d)
