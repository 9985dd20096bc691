"""A collector of the job's own, for a single-process script with no collector to talk to.

``TrainerClient(local_collector="trainwatch-out")`` starts ``trainwatch collect`` as a
child process on an ipc socket in that folder (recording, JSONL and the offline wandb run
land there too) and waits for it, bounded, at ``close()``, then removes the socket files.
Its back-channel is an ipc socket beside the first, so the collector's findings reach the
script's console. One line adds monitoring.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from .identity import _IPC_PATH_MAX


class LocalCollector:
    def __init__(self, folder: str | Path, run: str) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in run)
        self.socket = _socket_path(self.folder / (safe + ".sock"))
        self.health_socket = _socket_path(self.folder / (safe + ".health.sock"))
        self.endpoint = f"ipc://{self.socket}"
        self.health_endpoint = f"ipc://{self.health_socket}"
        self.recording = self.folder / f"{safe}.twrec"
        self.jsonl = self.folder / f"{safe}.jsonl"
        self.log = self.folder / f"{safe}.collector.log"
        args = [sys.executable, "-m", "collector", "collect", "--bind", self.endpoint,
                "--health-bind", self.health_endpoint, "--record", str(self.recording),
                "--jsonl", str(self.jsonl), "--once", "--quiet", "1", "--no-view",
                "--wandb-dir", str(self.folder)]
        with open(self.log, "ab") as fh:
            # Its own session: a Ctrl-C aimed at the training script does not kill it
            # before it has drained what the script sent.
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=dict(os.environ))

    def wait(self, timeout_s: float) -> bool:
        """Let the collector finish the run; True if it exited in time. The socket file
        goes either way."""
        try:
            self.proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            self.stop()
            return False
        finally:
            self._unlink_socket()

    def stop(self) -> None:
        """Terminate the collector (bounded) and remove its socket file."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10.0)
        self._unlink_socket()

    def _unlink_socket(self) -> None:
        # Only a socket: never a file someone put at that path.
        for path in (self.socket, self.health_socket):
            try:
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)
            except FileNotFoundError:
                pass


def _socket_path(path: Path) -> Path:
    """``path``, or one in /tmp when it is too long: a Unix socket path has 107 bytes."""
    if len(str(path).encode()) <= _IPC_PATH_MAX:
        return path
    tag = hashlib.sha1(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"trainwatch-{tag}.sock"
