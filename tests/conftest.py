"""Shared test plumbing: real collector processes and real trainer processes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import child_env, free_tcp  # noqa: F401 - re-exported for tests

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "trainer.py"

# A suite started in the background of a shell without job control inherits SIGINT
# ignored, and so would every process it starts: the tests that Ctrl-C a trainer or a
# collector would then see it go on. A handler here makes each child start with the default.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def env() -> dict[str, str]:
    """The environment for child processes (shared with the benchmarks' harness)."""
    return child_env()


class CollectorProc:
    """A real ``trainwatch collect`` process; ``ready()`` waits for its socket."""

    def __init__(self, tmp: Path, endpoint: str, *extra: str, name: str = "c") -> None:
        self.tmp = tmp
        self.endpoint = endpoint
        self.record = tmp / f"{name}.twrec"
        self.jsonl = tmp / f"{name}.jsonl"
        self.log = tmp / f"{name}.log"
        self.args = [sys.executable, "-m", "collector", "collect", "--bind", endpoint,
                     "--record", str(self.record), "--jsonl", str(self.jsonl),
                     "--wandb-mode", "disabled", "--no-view", *extra]
        self.proc: subprocess.Popen | None = None

    def start(self) -> CollectorProc:
        self._fh = open(self.log, "a")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, stdout=self._fh, stderr=subprocess.STDOUT,
                                     env=env(), cwd=self.tmp)
        self.ready()
        return self

    def ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "collecting on" in self.log.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError("collector did not start")

    def wait(self, timeout: float = 60.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._fh.close()

    def stop(self, sig: int = 15, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]


def start_trainer(endpoint: str, run: str, rank: int, world: int, out: Path,
                  **opts: object) -> subprocess.Popen:
    """A real training process (tests/workers/trainer.py); it writes its stats to ``out``."""
    args = [sys.executable, str(WORKER), "--endpoint", endpoint, "--run", run,
            "--rank", str(rank), "--world", str(world), "--out", str(out)]
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False and v is not None:
            args += [flag, str(v)]
    return subprocess.Popen(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(procs: list[subprocess.Popen], timeout: float = 120.0) -> None:
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out.decode()[-3000:]


def replayed_jsonl(record: Path, tmp: Path) -> bytes:
    """The JSONL ``trainwatch replay`` writes for ``record`` (run in ``tmp``); a replay
    that fails fails the test with its own error."""
    out = tmp / "replayed.jsonl"
    r = subprocess.run([sys.executable, "-m", "collector", "replay", str(record), "--jsonl",
                        str(out)], env=env(), cwd=tmp, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


def by_epoch(recs: list[dict], run: str | None = None) -> dict[int, dict]:
    """Each epoch's metrics as the records' JSON says them, an amendment's over the
    original (of ``run``, or of every run)."""
    out: dict[int, dict] = {}
    for r in recs:
        if r["type"] == "epoch" and (run is None or r["run"] == run):
            out.setdefault(r["epoch"], {}).update(r["metrics"])
    return out


def rank_list(ranks: dict) -> list[int]:
    """An epoch record's ``ranks`` / ``missing`` (a count and ranges) as a list of ranks."""
    out = [r for lo, hi in ranks["ranges"] for r in range(lo, hi + 1)]
    assert len(out) == ranks["count"]
    return out


@pytest.fixture
def ipc(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/tw.sock"
