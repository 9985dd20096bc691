"""A collector of the job's own, for a single-process script with no collector to talk to.

``TrainerClient(local_collector="trainwatch-out")`` starts ``trainwatch collect`` as a
child process on an ipc socket in that folder (recording, JSONL and the offline wandb run
land there too) and waits for it, bounded, at ``close()``. One line adds monitoring.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class LocalCollector:
    def __init__(self, folder: str | Path, run: str) -> None:
        self.folder = Path(folder).resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in run)
        self.endpoint = f"ipc://{self.folder / (safe + '.sock')}"
        self.recording = self.folder / f"{safe}.twrec"
        self.jsonl = self.folder / f"{safe}.jsonl"
        self.log = self.folder / f"{safe}.collector.log"
        args = [sys.executable, "-m", "collector", "collect", "--bind", self.endpoint,
                "--record", str(self.recording), "--jsonl", str(self.jsonl), "--once",
                "--quiet", "1", "--no-view", "--wandb-dir", str(self.folder)]
        with open(self.log, "ab") as fh:
            # Its own session: a Ctrl-C aimed at the training script does not kill it
            # before it has drained what the script sent.
            self.proc = subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env=dict(os.environ))

    def wait(self, timeout_s: float) -> bool:
        """Let the collector finish the run; True if it exited in time."""
        try:
            self.proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            return False
