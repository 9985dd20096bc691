"""Real processes for the soak and the reliability checks: a collector, ranks, samplers.

    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once").start()
    rss = RssSampler(col.pid).start()
    ranks = [start_rank(col.endpoint, "soak", r, 4, tmp / f"rank{r}.json", steps=500)
             for r in range(4)]
    wait_all(ranks, timeout_s=120)
    col.wait(60)
    info = inspect(col.record)          # what `trainwatch inspect --json` says

Everything runs on this machine over ipc:// or loopback TCP, and every wait is bounded:
a process that outlives its limit is killed (only the processes started here).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
RANK_WORKER = ROOT / "benchmarks" / "rank_worker.py"


def child_env() -> dict[str, str]:
    """This environment with the repository importable and no inherited trainwatch identity."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    e["WANDB_SILENT"] = "true"
    for k in ("TRAINWATCH_ENDPOINT", "TRAINWATCH_RUN", "TRAINWATCH_CURVE_KEYS", "RANK",
              "WORLD_SIZE", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def free_tcp() -> str:
    """A loopback TCP endpoint on a port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class CollectorProc:
    """A real ``python -m collector collect`` process.

    Its log (stderr) goes to ``<name>.log``; its stdout (the plain status view, when
    ``view`` is set) to ``<name>.out``.
    """

    def __init__(self, tmp: Path, endpoint: str, *extra: str, name: str = "c",
                 record: str | Path | None = None, view: bool = False,
                 file_size_limit: int | None = None) -> None:
        self.tmp = Path(tmp)
        self.file_size_limit = file_size_limit  # RLIMIT_FSIZE: writes past it fail (EFBIG)
        self.endpoint = endpoint
        self.record = Path(record) if record is not None else self.tmp / f"{name}.twrec"
        self.jsonl = self.tmp / f"{name}.jsonl"
        self.log = self.tmp / f"{name}.log"
        self.out = self.tmp / f"{name}.out"
        self.args = [sys.executable, "-m", "collector", "collect", "--bind", endpoint,
                     "--record", str(self.record), "--jsonl", str(self.jsonl),
                     "--wandb-mode", "disabled", *([] if view else ["--no-view"]), *extra]
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout_s: float = 60.0) -> CollectorProc:
        with open(self.log, "ab") as err, open(self.out, "ab") as out:
            limit = self.file_size_limit
            self.proc = subprocess.Popen(
                self.args, stdout=out, stderr=err, env=child_env(), cwd=self.tmp,
                preexec_fn=None if limit is None else lambda: resource.setrlimit(
                    resource.RLIMIT_FSIZE, (limit, limit)))
        self.ready(timeout_s)
        return self

    def ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "collecting on" in self.log_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited: {self.log_text()[-3000:]}")
            time.sleep(0.05)
        self.kill()
        raise TimeoutError("collector did not start")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout_s: float) -> int | None:
        """The exit status, or None after killing a collector that outlived ``timeout_s``."""
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.alive():
            self.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.proc.wait(10)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def out_text(self) -> str:
        return self.out.read_text(errors="replace") if self.out.exists() else ""

    def records(self) -> list[dict]:
        """The JSONL records so far (a line still being written is left out)."""
        if not self.jsonl.exists():
            return []
        whole = self.jsonl.read_text().rpartition("\n")[0]
        return [json.loads(line) for line in whole.splitlines() if line]


@contextlib.contextmanager
def small_disk(where: Path, size_bytes: int) -> Iterator[Path | None]:
    """A real filesystem of ``size_bytes`` (a tmpfs) mounted at ``where``, or None where
    mounting is not allowed (no root); unmounted on the way out."""
    where.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs",
                            str(where)], capture_output=True, timeout=30)
    except OSError:  # no mount(8)
        r = None
    if r is None or r.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(disk: Path, leave: int) -> Path:
    """A file taking all but ``leave`` bytes of the filesystem at ``disk``."""
    filler = disk / "filler"
    st = os.statvfs(disk)
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


class DiskFillRun(NamedTuple):
    """What ``disk_fill_run`` saw: the collector, its recording, the ranks' outputs and
    exit codes, whether the disk filled while the ranks still trained, and how."""

    col: CollectorProc
    rec: Path
    outs: dict[int, Path]
    codes: list[int | None]
    col_code: int | None
    full_mid_run: bool
    mode: str  # "tmpfs" (a real full filesystem) or "file size limit" (no mount allowed)


def disk_fill_run(tmp: Path, disk: Path | None, leave: int = 120_000) -> DiskFillRun:
    """Two real ranks training into a real collector whose recording's disk fills mid-run
    (``disk``: a ``small_disk`` mount, filled up to ``leave`` bytes, freed again once the
    collector said it cannot write) or, without a mount, whose file size limit is reached."""
    if disk is not None:
        filler, rec, limit, mode = fill(disk, leave), disk / "run.twrec", None, "tmpfs"
    else:
        filler, rec, limit, mode = None, tmp / "run.twrec", leave, "file size limit"
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1", record=rec,
                        file_size_limit=limit).start()
    outs = {r: tmp / f"rank{r}.json" for r in range(2)}
    procs = [start_rank(col.endpoint, "fills", r, 2, outs[r], steps=240, steps_per_epoch=20,
                        val_every=1, val_shape="16,32,8", step_sleep=0.02, duration_s=120)
             for r in range(2)]
    try:
        deadline = time.monotonic() + 90
        while "cannot write the recording" not in col.log_text() \
                and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.05)
        full_mid_run = procs[0].poll() is None
        if filler is not None:
            filler.unlink()  # room again, the ranks still training
        codes = wait_all(procs, 150)
        col_code = col.wait(60)
    finally:
        reap(procs)
    return DiskFillRun(col, rec, outs, codes, col_code, full_mid_run, mode)


def rss_kb(pid: int) -> int | None:
    """VmRSS of a live process in KiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a live process so far; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a process's VmRSS and CPU time every ``every_s`` seconds on a daemon thread."""

    def __init__(self, pid: int, every_s: float = 1.0) -> None:
        self.pid = pid
        self.every_s = every_s
        self.samples: list[tuple[float, int, float]] = []  # (wall time, RSS KiB, CPU s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            kb, cpu = rss_kb(self.pid), cpu_s(self.pid)
            if kb is None or cpu is None:
                return
            self.samples.append((time.time(), kb, cpu))
            self._stop.wait(self.every_s)

    def stop(self) -> list[tuple[float, int, float]]:
        self._stop.set()
        self._thread.join(5)
        return self.samples


def rss_trend(samples_kb: list[int], tolerance: float = 0.2) -> dict[str, Any]:
    """Is memory flat? Last-quarter mean vs second-quarter mean (the first is warm-up)."""
    n = len(samples_kb)
    if n < 8:
        return {"flat": None, "reason": f"only {n} samples"}
    q = n // 4
    q2 = sum(samples_kb[q:2 * q]) / q
    q4 = sum(samples_kb[n - q:]) / q
    growth = (q4 - q2) / q2
    return {"flat": growth <= tolerance, "q2_mean_mb": q2 / 1024, "q4_mean_mb": q4 / 1024,
            "growth_pct": 100 * growth, "tolerance_pct": 100 * tolerance}


def start_rank(endpoint: str, run: str, rank: int, world: int, out: Path,
               log: Path | None = None, **opts: Any) -> subprocess.Popen:
    """A real training rank (benchmarks/rank_worker.py); options are its flags."""
    args = [sys.executable, str(RANK_WORKER), "--endpoint", endpoint, "--run", run,
            "--rank", str(rank), "--world", str(world), "--out", str(out)]
    for k, v in opts.items():
        if v is not None and v is not False:
            args += ["--" + k.replace("_", "-"), str(v)]
    sink = open(log or Path(out).with_suffix(".log"), "ab")  # noqa: SIM115 - the child owns it
    try:
        return subprocess.Popen(args, env=child_env(), stdout=sink, stderr=subprocess.STDOUT)
    finally:
        sink.close()


def wait_all(procs: list[subprocess.Popen], timeout_s: float) -> list[int | None]:
    """Exit statuses; a process still running at the deadline is killed (status None)."""
    deadline = time.monotonic() + timeout_s
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
            codes.append(None)
    return codes


def reap(procs: list[subprocess.Popen]) -> None:
    """Kill whichever of these processes (started here) still run."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(10)


def inspect(recording: Path) -> dict:
    """``trainwatch inspect --json`` of a recording."""
    r = subprocess.run([sys.executable, "-m", "collector", "inspect", str(recording), "--json"],
                       env=child_env(), capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"trainwatch inspect failed: {last}")
    return json.loads(r.stdout)


def percentiles(values: list[float]) -> dict[str, float]:
    """p50 / p99 / max / mean (nearest rank) of a list of seconds."""
    if not values:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "max": math.nan, "mean": math.nan}
    v = sorted(values)
    n = len(v)

    def rank(p: float) -> float:
        return v[min(n - 1, max(0, math.ceil(p * n) - 1))]

    return {"n": n, "p50": rank(0.50), "p99": rank(0.99), "max": v[-1], "mean": sum(v) / n}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def losses_per_rank(info: dict, run: str, outs: dict[int, dict | None]) -> dict[int, dict]:
    """Per rank: what the recording holds against what the client says it sent and dropped.

    ``lost_beyond_reported`` = messages the client sent that never reached the recording;
    ``gaps_minus_drops`` = sequence gaps the client did not report (0: every gap explained).
    """
    ranks = info.get("runs", {}).get(run, {}).get("ranks", {})
    table = {}
    for rank, out in sorted(outs.items()):
        c = ranks.get(str(rank), {})
        recorded, gaps = int(c.get("messages", 0)), int(c.get("seq_gaps", 0))
        row = {"recorded": recorded, "seq_gaps": gaps,
               "reported_in_headers": int(c.get("reported_drops", 0)),
               "client_sent": None, "client_dropped": None, "lost_beyond_reported": None,
               "gaps_minus_drops": None}
        if out is not None:
            sent, dropped = int(out["stats"]["sent"]), int(out["stats"]["dropped"])
            row.update(client_sent=sent, client_dropped=dropped,
                       lost_beyond_reported=sent - recorded, gaps_minus_drops=gaps - dropped)
        table[rank] = row
    return table


class Sender:
    """A raw PUSH socket speaking the wire format: whatever a hostile sender may send."""

    def __init__(self, endpoint: str) -> None:
        import zmq

        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.connect(endpoint)

    def send(self, kind: int, run: str, body: Any, *, rank: int = 0, world: int = 1,
             inst: int = 1, seq: int = 0, epoch: int = 0, tensors: tuple = ()) -> None:
        from trainer_client import wire

        h = wire.Header(kind, run, rank, world, inst, seq, seq, epoch, time.time(), 0, body)
        self.sock.send_multipart(wire.encode(h, list(tensors)))

    def close(self) -> None:
        self.sock.close(linger=10_000)
        self.ctx.term()
