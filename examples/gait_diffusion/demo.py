"""``make demo``: the whole product on one machine, on a real training job.

1. starts ``trainwatch collect`` as a sidecar process (recording, JSONL, offline wandb);
2. trains the gait-diffusion model with 2 ranks: ``torchrun --nproc_per_node 2`` (gloo, CPU);
3. when the run ends, prints the health verdict (healthy, or the rules that fired and the
   guide's remedies), writes the HTML report and reads the offline wandb run back.

    python examples/gait_diffusion/demo.py                    # healthy run
    python examples/gait_diffusion/demo.py --inject collapse  # watch a mode collapse
    python examples/gait_diffusion/demo.py --epochs 60 --nproc 4 -- --batch-size 64

Everything lands in ``--out`` (default ``out/demo``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _env(endpoint: str, run: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRAINWATCH_ENDPOINT"] = endpoint
    env["TRAINWATCH_RUN"] = run
    env.setdefault("WANDB_SILENT", "true")
    env.setdefault("OMP_NUM_THREADS", "1")  # two ranks on two cores: no oversubscription
    return env


def run_demo(out: Path, inject: str, nproc: int, epochs: int | None, extra: list[str],
             view: bool = True) -> dict:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    run = f"gait-{inject}-{time.strftime('%Y%m%d-%H%M%S')}"
    endpoint = f"ipc://{out.resolve()}/collector.sock"
    env = _env(endpoint, run)
    collect = [sys.executable, "-m", "collector", "collect", "--bind", endpoint,
               "--record", str(out / "run.twrec"), "--jsonl", str(out / "run.jsonl"),
               "--wandb-mode", "offline", "--wandb-dir", str(out), "--wandb-project",
               "trainwatch-demo", "--once", "--quiet", "2", "--epoch-timeout", "30"]
    if not view:
        collect.append("--no-view")
    print(f"trainwatch demo: run {run}, {nproc} ranks, inject={inject}; output in {out}/",
          flush=True)
    collector = subprocess.Popen(collect, env=env)
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node", str(nproc), str(ROOT / "examples/gait_diffusion/train.py"),
             "--inject", inject, *(["--epochs", str(epochs)] if epochs else []), *extra]
    t0 = time.monotonic()
    with open(out / "train.log", "w") as log:
        trainer = subprocess.run(train, env=env, stdout=log, stderr=subprocess.STDOUT)
    train_s = time.monotonic() - t0
    try:
        collector.wait(120)
    except subprocess.TimeoutExpired:
        collector.terminate()
        collector.wait(30)
    if trainer.returncode != 0:
        print((out / "train.log").read_text()[-3000:], file=sys.stderr)
        raise SystemExit(f"training failed (exit {trainer.returncode}); see {out}/train.log")
    records = [json.loads(x) for x in (out / "run.jsonl").read_text().splitlines() if x]
    subprocess.run([sys.executable, "-m", "collector", "report", str(out / "run.twrec"),
                    "-o", str(out / "report.html")], env=env, check=True)
    return {"run": run, "records": records, "train_s": train_s, "out": out}


def verdict(records: list[dict]) -> tuple[str, list[str]]:
    """The report's verdict for the run (one definition: ``collector.report.model``), and
    printable lines on what fired, with the guide's remedies."""
    from collector.report.html import LEVEL_TEXT
    from collector.report.model import group_runs
    from collector.report.model import verdict as run_verdict

    runs = group_runs(records)
    if not runs:
        return "NO DATA", ["  nothing reached the collector"]
    v = run_verdict(runs[0])
    fired: dict[str, dict] = {}
    for rec in records:
        for ev in rec.get("events", []):
            if ev.get("severity") != "info":
                fired.setdefault(ev["rule"], ev | {"epoch": rec.get("epoch")})
    lines = [f"  why: {reason}" for reason in v.reasons]
    for rule, ev in sorted(fired.items(), key=lambda kv: (kv[1]["severity"] != "critical",
                                                          kv[1]["epoch"] or 0)):
        lines.append(f"  - [{ev['severity']}] {rule} (from epoch {ev['epoch']}): "
                     f"{ev['message']}")
        if ev.get("remedy"):
            lines.append(f"      remedy: {ev['remedy']}")
    if v.active:
        lines.append(f"  raised at the last epoch: {', '.join(v.active)}")
    return LEVEL_TEXT[v.level].upper(), lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "demo")
    ap.add_argument("--inject", default="none",
                    choices=["none", "exploding", "collapse", "stall"])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--no-view", action="store_true", help="no live status board")
    ap.add_argument("train_args", nargs="*", help="after --: passed to train.py")
    a = ap.parse_args()
    res = run_demo(a.out, a.inject, a.nproc, a.epochs, a.train_args,
                   view=not a.no_view and sys.stdout.isatty())
    records, out = res["records"], res["out"]
    state, lines = verdict(records)
    epochs = [r for r in records if r["type"] == "epoch"]
    summary = next((r["metrics"] for r in records if r["type"] == "summary"), {})
    first, last = epochs[0]["metrics"], epochs[-1]["metrics"]
    print(f"\n=== trainwatch verdict for {res['run']} ({len(epochs)} epochs, "
          f"trained in {res['train_s']:.0f}s) ===")
    print(f"train/total_loss {first.get('train/total_loss', float('nan')):.4f} -> "
          f"{last.get('train/total_loss', float('nan')):.4f}; "
          f"knee healthy {summary.get('summary/final_knee_healthy')}, "
          f"grf healthy {summary.get('summary/final_grf_healthy')}; "
          f"messages dropped {summary.get('summary/dropped')}")
    print(f"{state}{': no rule fired.' if not lines else ':'}")  # the reasons come first
    for line in lines:
        print(line)

    sys.path.insert(0, str(ROOT / "tests"))  # the test suite's reader of wandb's files
    from support.wandb_readback import find_offline_runs, read_offline_run

    runs = find_offline_runs(out)
    for run_dir in runs:
        got = read_offline_run(run_dir)
        rows = got["history"]
        n_epoch = sum("epoch" in row and "train/total_loss" in row for row in rows)
        n_step = sum("trainer_step" in row for row in rows)
        print(f"wandb offline run {got['run_id']}: {n_epoch} epoch rows, {n_step} per-step "
              f"rows, {len(got['config'])} config keys -> {run_dir}")
    print(f"report: {out / 'report.html'}\nrecording: {out / 'run.twrec'} "
          f"(replay: trainwatch replay {out / 'run.twrec'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
