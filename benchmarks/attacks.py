"""``make reliability``'s attacks: each against a real collector, with a real training rank
beside it that must lose nothing (its rows join the "messages lost" check).

    c = Check("attack: bind guard bypass"); check_bind_bypass(tmp, c)   # c.figures, ...

``c`` is reliability.py's ``Check`` (figures, losses, need()).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time
import unicodedata
from pathlib import Path
from typing import Any

import harness
import hostile
import msgpack

from collector.text import printable
from trainer_client import wire

__all__ = ["check_bind_bypass", "check_crafted_controls", "check_disk_fills",
           "check_log_injection"]

_STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(,\d+)? trainwatch")


def _beside(col: harness.CollectorProc, tmp: Path, run: str, **opts: Any
            ) -> tuple[subprocess.Popen, Path]:
    """A real training rank on ``col``, live (its run opened) before the attack starts."""
    out = tmp / f"{run}.json"
    kw = {"steps": 150, "steps_per_epoch": 30, "val_every": 0, "step_sleep": 0.02} | opts
    proc = harness.start_rank(col.endpoint, run, 0, 1, out, **kw)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None \
            and not any(r["run"] == run for r in col.records()):
        time.sleep(0.05)
    return proc, out


def _losses(c: Any, info: dict, run: str, out: Path) -> None:
    rows = harness.losses_per_rank(info, run, {0: harness.read_json(out)})
    c.losses.update({f"{run}/{r}": row for r, row in rows.items()})


def _tw(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "collector", *map(str, args)],
                          env=harness.child_env(), capture_output=True, text=True, timeout=180)


def _port() -> int:
    return int(harness.free_tcp().rsplit(":", 1)[1])


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait_summary(col: harness.CollectorProc, run: str, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(r["type"] == "summary" and r["run"] == run for r in col.records()):
            return True
        time.sleep(0.1)
    return False


# -- the bind guard -------------------------------------------------------------------------
def check_bind_bypass(tmp: Path, c: Any) -> None:
    import zmq

    from collector.ingest import binds

    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1").start()
    proc, out = _beside(col, tmp, "bind-beside")
    try:
        ports = [_port() for _ in range(6)]
        forms = [f"tcp://127.0.0.1:{ports[0]};0.0.0.0:{ports[1]}", f"tcp://*:{ports[2]}",
                 f"tcp://0:{ports[3]}", f"tcp://[::]:{ports[4]}",
                 f"tcp://lo:{ports[0]};*:{ports[5]}", f"tcp://127.1:{ports[0]};0x0:{ports[5]}"]
        refused, first = 0, None
        for form, port in zip(forms, [ports[1], ports[2], ports[3], ports[4], ports[5],
                                      ports[5]], strict=True):
            r = _tw("collect", "--bind", form, "--record", tmp / "attack.twrec", "--no-view",
                    "--wandb-mode", "disabled")
            lines = r.stderr.strip().splitlines()
            ok = r.returncode == 2 and len(lines) == 1 and "refusing to bind" in lines[0] \
                and not _listening(port)
            refused += ok
            first = first or (r.returncode, len(lines), _listening(port))
            c.need(ok, f"{form}: exit {r.returncode}, {lines[-1:] or lines}")
        try:
            binds.check_binds(["tcp://0.0.0.0:1\x00;127.0.0.1:2"], False, True)
            nul = False
        except binds.BindError:
            nul = True
        sock = zmq.Context.instance().socket(zmq.PULL)
        try:
            binds.bind_all(sock, ["tcp://[::1]:0"])
            ipv6 = "binds"
        except binds.BindError as exc:  # a host without IPv6: one line, no traceback
            ipv6 = f"refused: {exc}"
        finally:
            sock.close(0)
        code = harness.wait_all([proc], 150)[0]
        col_code = col.wait(60)
    finally:
        harness.reap([proc])
    c.figures = {"forms_refused": f"{refused}/{len(forms)}", "bypass_exit": first[0],
                 "bypass_stderr_lines": first[1], "bypass_listening": first[2],
                 "nul_variant_refused": nul, "ipv6_loopback": ipv6}
    c.need(nul, "an endpoint with a NUL passed the guard")
    c.need(code == 0 and col_code == 0, f"exits: rank {code}, collector {col_code}")
    _losses(c, harness.inspect(col.record), "bind-beside", out)


# -- a disk that fills ----------------------------------------------------------------------
def check_disk_fills(tmp: Path, c: Any) -> None:
    with harness.small_disk(tmp / "disk", 1 << 20) as disk:
        run = harness.disk_fill_run(tmp, disk)
        info = harness.inspect(run.rec)
    col, outs, codes, col_code, mid_run, mode = (run.col, run.outs, run.codes, run.col_code,
                                                 run.full_mid_run, run.mode)
    log = col.log_text()
    found = re.findall(r"closed: (\d+) records written, unrecorded (\d+) \(of (\d+)\)", log)
    written, unrecorded, appended = map(int, found[-1]) if found else (-1, -1, -2)
    res = {r: harness.read_json(o) for r, o in outs.items()}
    sent = sum(x["stats"]["sent"] for x in res.values() if x)
    dropped = sum(x["stats"]["dropped"] for x in res.values() if x)
    summ = next((r for r in col.records() if r["type"] == "summary"), None)
    gaps = summ["metrics"].get("summary/seq_gaps", 0) if summ else None
    c.figures = {"mode": mode, "full_mid_run": mid_run, "appended": appended,
                 "written": written, "unrecorded": unrecorded, "read_back": info["records"],
                 "error_lines": log.count("trainwatch.recording ERROR"),
                 "recovered_lines": log.count("writes again")}
    c.need(codes == [0, 0] and col_code == 0, f"exits: ranks {codes}, collector {col_code}")
    c.need(mid_run, "the run ended before the disk filled")
    # accepted: what the ranks sent, and the limits control the collector records at start
    c.need(written + unrecorded == appended == sent + 1, "written + unrecorded != accepted")
    c.need(info["records"] == written and info["corrupted"] == 0,
           f"the file reads back {info['records']} records ({info['corrupted']} corrupted), "
           f"{written} counted written")
    c.need(c.figures["error_lines"] == 1, "the write error was not logged exactly once")
    c.losses = {"fills/all": {"lost_beyond_reported": sent - (appended - 1),
                              "gaps_minus_drops": None if gaps is None else gaps - dropped}}


# -- crafted CONTROL records ----------------------------------------------------------------
def _bad_count(text: str) -> int | None:
    found = re.findall(r"(\d+) bad controls", text)
    return int(found[-1]) if found else None


def check_crafted_controls(tmp: Path, c: Any) -> None:
    crafted = hostile.crafted_controls("crafted")
    rec = hostile.write_recording(tmp / "crafted.twrec", "crafted", crafted)
    counts: dict[str, int | None] = {}
    exits: dict[str, int] = {}
    r = _tw("inspect", rec, "--json")
    exits["inspect"] = r.returncode
    counts["inspect"] = json.loads(r.stdout)["bad_controls"] if r.returncode == 0 else None
    for name, args in (("replay", ["replay", rec]),
                       ("report", ["report", rec, "-o", tmp / "r.html"]),
                       ("upload", ["upload", rec, "--wandb-mode", "disabled"])):
        r = _tw(*args)
        exits[name], counts[name] = r.returncode, _bad_count(r.stderr)
    live = tmp / "live.twrec"
    live.write_bytes(rec.read_bytes())
    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", record=live).start()
    proc, out = _beside(col, tmp, "controls-beside")
    try:
        code = harness.wait_all([proc], 150)[0]
        summary = _wait_summary(col, "controls-beside")
        col.kill(signal.SIGTERM)
        col_code = col.wait(60)
    finally:
        harness.reap([proc])
    counts["rebuild"] = _bad_count(col.log_text())
    c.figures = {"crafted": len(crafted), "skipped_and_counted": counts, "exits": exits}
    c.need(all(n == len(crafted) for n in counts.values()), f"counts {counts}")
    c.need(not any(exits.values()), f"exits {exits}")
    c.need(code == 0 and col_code == 0 and summary,
           f"rank exit {code}, collector exit {col_code}, summary {summary}")
    _losses(c, harness.inspect(live), "controls-beside", out)


# -- log injection --------------------------------------------------------------------------
def check_log_injection(tmp: Path, c: Any) -> None:
    import zmq

    col = harness.CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "1",
                                view=True).start()
    proc, out = _beside(col, tmp, "log-beside")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDTIMEO, 5000)
    push.connect(col.endpoint)
    try:
        for run in hostile.HOSTILE_RUN_IDS:  # a NaN loss: an event and a summary line each
            for kind, seq, body, epoch in ((wire.KIND_HELLO, 0, {"host": "h\nforged"}, 0),
                                           (wire.KIND_STEP, 1, [float("nan"), 1.0, [], []], 1),
                                           (wire.KIND_EPOCH, 2, {}, 1),
                                           (wire.KIND_BYE, 3, {}, 2)):
                head = [wire.VERSION, kind, run, 0, 1, 5, seq, seq, epoch, 1.7e9, 0, body, []]
                push.send_multipart([msgpack.packb(head)])
        push.close(linger=5000)
        ctx.term()
        code = harness.wait_all([proc], 150)[0]
        col_code = col.wait(60)
    finally:
        harness.reap([proc])
    log, board = col.log_text(), col.out_text()
    lines = log.splitlines() + board.splitlines()
    escaped = sum(log.count(f"[{printable(r)}]") >= 2 for r in hostile.HOSTILE_RUN_IDS)
    c.figures = {"hostile_run_ids": len(hostile.HOSTILE_RUN_IDS), "lines": len(lines),
                 "unstamped_lines": sum(not _STAMP.match(x) for x in lines),
                 "invisible_chars": sum(not x.isprintable() for x in lines)
                 + sum(unicodedata.category(ch) == "Cf" for ch in log + board),
                 "run_ids_logged_escaped": escaped}
    c.need(c.figures["unstamped_lines"] == 0, "a log or board line was forged")
    c.need(c.figures["invisible_chars"] == 0, "a control or bidi character reached the log")
    c.need(escaped == len(hostile.HOSTILE_RUN_IDS), "a hostile run's lines are missing")
    c.need(code == 0 and col_code == 0, f"exits: rank {code}, collector {col_code}")
    _losses(c, harness.inspect(col.record), "log-beside", out)
