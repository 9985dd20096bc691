"""``make soak``: sustained load on a real collector from real ranks, bounded in time.

    python benchmarks/soak.py                       # 4 ranks, 60 s at most
    python benchmarks/soak.py --ranks 8 --steps 20000 --duration-s 120
    python benchmarks/soak.py --independent         # no DDP lockstep: more messages

A ``trainwatch collect --once`` process listens on an ipc:// socket; N rank processes
(benchmarks/rank_worker.py) train a small model as one DDP job (gloo over loopback, so the
ranks keep in step as on a cluster) with the real TrainerClient: steps, epochs, and every
few epochs 64 x 128 x 8 float32 generated samples. The job stops after ``--steps`` steps
per rank or ``--duration-s`` seconds, whichever comes first; the collector stops by itself
once every rank said goodbye.

Printed, and written to ``soak-results.json`` in the current folder:

- messages per second the collector handled (and per second of its CPU);
- p50 / p99 / max time of the ranks' ``log_*`` calls, measured inside the ranks;
- the collector's RSS every second, and whether it stayed flat (last-quarter mean within
  20 % of the second-quarter mean; the first quarter is warm-up);
- messages lost per rank: sequence gaps in the recording (``trainwatch inspect --json``)
  against the drops the client counted; both 0 when the collector kept up.

Exit status 1 when a message was lost beyond what the clients reported, the RSS grew, or a
process failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402 - the benchmarks folder is not a package

RUN = "soak"
QUIET_S = 1.0


@dataclass
class SoakConfig:
    ranks: int = 4
    steps: int = 100_000  # per rank, at most
    duration_s: float = 60.0  # per rank, at most
    steps_per_epoch: int = 100
    val_every: int = 5  # epochs between validation samples
    val_shape: str = "64,128,8"
    rss_tolerance: float = 0.2  # last-quarter RSS may exceed the second quarter by this
    ddp: bool = True  # one DDP job (ranks in step); else independent ranks that drift apart


def run_soak(cfg: SoakConfig, workdir: Path) -> dict:
    """One soak in ``workdir``; returns the figures (see the module docstring) and ``passed``."""
    col = harness.CollectorProc(workdir, f"ipc://{workdir}/soak.sock", "--once", "--quiet",
                                str(QUIET_S)).start()
    sampler = harness.RssSampler(col.pid).start()
    outs = {r: workdir / f"rank{r}.json" for r in range(cfg.ranks)}
    ddp_port = int(harness.free_tcp().rsplit(":", 1)[1]) if cfg.ddp else None
    procs = [harness.start_rank(col.endpoint, RUN, r, cfg.ranks, outs[r], steps=cfg.steps,
                                duration_s=cfg.duration_s, steps_per_epoch=cfg.steps_per_epoch,
                                val_every=cfg.val_every, val_shape=cfg.val_shape, seed=r,
                                ddp_port=ddp_port)
             for r in range(cfg.ranks)]
    try:
        rank_codes = harness.wait_all(procs, cfg.duration_s + 180)
        col_code = col.wait(120)
    finally:
        harness.reap(procs)
        col.kill()
    t_exit = time.time()
    samples = sampler.stop()
    results = {r: harness.read_json(path) for r, path in outs.items()}
    info = harness.inspect(col.record)

    problems = []
    if any(c != 0 for c in rank_codes):
        problems.append(f"rank exit codes {rank_codes}")
    if col_code != 0:
        problems.append(f"collector exit code {col_code}")
    ranks = info["runs"].get(RUN, {}).get("ranks", {})
    messages = sum(c["messages"] for c in ranks.values())
    first = min((c["first_time"] for c in ranks.values() if c["first_time"]), default=t_exit)
    last = max((c["last_time"] for c in ranks.values() if c["last_time"]), default=t_exit)
    # The collector exits QUIET_S (+ one 0.5 s tick at most) after its last message: the
    # span up to then is how long it took to handle everything the ranks sent.
    handled_s = max(1e-9, t_exit - QUIET_S - first)

    calls: dict[str, list[float]] = {}
    for res in results.values():
        for kind, ts in (res or {}).get("calls", {}).items():
            calls.setdefault(kind, []).extend(ts)
    calls["all log_* calls"] = [t for k, ts in calls.items() if k != "close" for t in ts]
    # CPU time of the calling thread: what the call itself cost, without waiting (for the
    # GIL, or for a core on a busy machine)
    calls["all, thread CPU"] = [t for res in results.values() for t in (res or {}).get(
        "calls_cpu", [])]

    # Judge memory over the loaded period only: before the first message the collector
    # has not yet loaded its kernels, and that step is not growth.
    loaded = [(kb, cpu) for t, kb, cpu in samples if first <= t <= last]
    trend = harness.rss_trend([kb for kb, _ in loaded], cfg.rss_tolerance)
    cpu_loaded = loaded[-1][1] - loaded[0][1] if len(loaded) > 1 else 0.0
    span_loaded = max(1e-9, last - first)
    if trend["flat"] is False:
        problems.append(f"collector RSS grew {trend['growth_pct']:.0f} %")

    losses = harness.losses_per_rank(info, RUN, results)
    for rank, row in losses.items():
        if row["lost_beyond_reported"] != 0 or row["gaps_minus_drops"] != 0:
            problems.append(f"rank {rank} lost messages beyond what it reported: {row}")
    recs = col.records()
    if not any(r["type"] == "summary" for r in recs):
        problems.append("no summary record")
    return {
        "config": asdict(cfg),
        "messages": messages,
        "recording_bytes": col.record.stat().st_size if col.record.exists() else 0,
        "msgs_per_s_handled": messages / handled_s,
        "msgs_per_s_sent": messages / max(1e-9, last - first),
        "handled_span_s": handled_s,
        "collector_cpu_s": samples[-1][2] if samples else None,
        # while the ranks sent: the collector's share of one core, and its cost per message
        "collector_core_share": cpu_loaded / span_loaded,
        "msgs_per_collector_cpu_s": messages / cpu_loaded if cpu_loaded else None,
        "loadavg_1m_at_end": os.getloadavg()[0],
        "epochs_closed": sum(1 for r in recs if r["type"] == "epoch"),
        "client_call_s": {k: harness.percentiles(ts) for k, ts in calls.items()},
        "collector_rss_mb": [round(kb / 1024, 1) for _, kb, _ in samples],
        "rss": trend,
        "losses": {str(r): row for r, row in losses.items()},
        "client_drops_by_reason": {str(r): (res or {}).get("stats", {}).get("dropped_by_reason")
                                   for r, res in results.items()},
        "rank_exit_codes": rank_codes,
        "collector_exit_code": col_code,
        "problems": problems,
        "passed": not problems,
    }


def print_report(res: dict) -> None:
    cfg = res["config"]
    print(f"soak: {cfg['ranks']} ranks{' (DDP)' if cfg['ddp'] else ''}, <= {cfg['steps']} steps "
          f"or {cfg['duration_s']:g} s each, "
          f"{cfg['steps_per_epoch']} steps/epoch, samples {cfg['val_shape']} every "
          f"{cfg['val_every']} epochs")
    print(f"collector handled {res['messages']} messages ({res['recording_bytes'] / 1e6:.1f} MB)"
          f" in {res['handled_span_s']:.1f} s: {res['msgs_per_s_handled']:.0f} msgs/s "
          f"(ranks sent {res['msgs_per_s_sent']:.0f} msgs/s); {res['epochs_closed']} epochs closed")
    per_cpu = res["msgs_per_collector_cpu_s"]
    print(f"collector CPU while loaded: {100 * res['collector_core_share']:.0f} % of one core, "
          f"{per_cpu or 0:.0f} msgs per CPU second at this rate (epoch closes included); load "
          f"average {res['loadavg_1m_at_end']:.1f} on {os.cpu_count()} cores")
    print(f"\n{'client call':<18} {'n':>8} {'p50 us':>9} {'p99 us':>9} {'max us':>10}")
    for kind, p in res["client_call_s"].items():
        if p["n"]:
            print(f"{kind:<18} {p['n']:>8} {p['p50'] * 1e6:>9.0f} {p['p99'] * 1e6:>9.0f} "
                  f"{p['max'] * 1e6:>10.0f}")
    t = res["rss"]
    print("\ncollector RSS MB, each second:", " ".join(f"{x:.0f}" for x in res["collector_rss_mb"]))
    if t["flat"] is None:
        print(f"RSS trend: not judged ({t['reason']})")
    else:
        print(f"RSS second quarter {t['q2_mean_mb']:.1f} MB, last quarter {t['q4_mean_mb']:.1f} MB"
              f" ({t['growth_pct']:+.1f} %): {'flat' if t['flat'] else 'GROWING'}")
    print(f"\n{'rank':>4} {'recorded':>9} {'sent':>9} {'dropped':>8} {'gaps':>6} {'lost':>5}")
    for rank, row in res["losses"].items():
        print(f"{rank:>4} {row['recorded']:>9} {row['client_sent']!s:>9} "
              f"{row['client_dropped']!s:>8} {row['seq_gaps']:>6} "
              f"{row['lost_beyond_reported']!s:>5}")
    print("\nsoak " + ("PASSED" if res["passed"] else "FAILED: " + "; ".join(res["problems"])))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ranks", type=int, default=SoakConfig.ranks)
    ap.add_argument("--steps", type=int, default=SoakConfig.steps, help="per rank, at most")
    ap.add_argument("--duration-s", type=float, default=SoakConfig.duration_s,
                    help="per rank, at most")
    ap.add_argument("--steps-per-epoch", type=int, default=SoakConfig.steps_per_epoch)
    ap.add_argument("--val-every", type=int, default=SoakConfig.val_every)
    ap.add_argument("--independent", action="store_true",
                    help="no DDP: more messages, but the ranks drift apart and the collector "
                         "holds the fast ranks' epochs until the slow ones close them")
    ap.add_argument("--keep", action="store_true", help="keep the recording and logs")
    a = ap.parse_args(argv)
    cfg = SoakConfig(a.ranks, a.steps, a.duration_s, a.steps_per_epoch, a.val_every,
                     ddp=not a.independent)
    tmp = Path(tempfile.mkdtemp(prefix="tw-soak-"))
    try:
        res = run_soak(cfg, tmp)
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    Path("soak-results.json").write_text(json.dumps(res, indent=2, sort_keys=True))
    print_report(res)
    print("wrote soak-results.json" + (f"; kept {tmp}" if a.keep else ""))
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
