"""The main job: a short `make demo`, and each injected failure caught by its rules.

Real training (the gait-diffusion example), a real collector process, real offline wandb.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, CollectorProc, env

TRAIN = ROOT / "examples" / "gait_diffusion" / "train.py"
DEMO = ROOT / "examples" / "gait_diffusion" / "demo.py"


def test_short_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, str(DEMO), "--out", str(out), "--epochs", "3",
                        "--no-view", "--", "--pseudo-dataset-len", "128",
                        "--validate-every", "3"], env=env(), capture_output=True,
                       text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "=== trainwatch verdict" in r.stdout
    from collector.report.html import LEVEL_TEXT

    assert any(f"\n{v.upper()}" in r.stdout for v in LEVEL_TEXT.values())
    assert "wandb offline run" in r.stdout and "3 epoch rows" in r.stdout
    html = (out / "report.html").read_text()
    assert "<html" in html.lower() and "knee_r_std" in html
    assert (out / "run.jsonl").read_text().count('"type":"epoch"') == 3


# inject -> flags of which at least one must fire (the guide's rule for that failure)
EXPECT = {
    "exploding": {"health/exploding_gradients", "diagnosis/gradient_explosion"},
    "collapse": {"diagnosis/mode_collapse", "health/mode_collapse"},
    "stall": {"health/stalled", "diagnosis/loss_not_falling"},
}


@pytest.fixture(scope="module")
def injected(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inject")
    col = CollectorProc(tmp, f"ipc://{tmp}/c.sock", "--once", "--quiet", "2").start()
    procs = [subprocess.Popen([sys.executable, str(TRAIN), "--inject", name, "--run",
                               f"inject-{name}", "--endpoint", col.endpoint], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in EXPECT]
    for p in procs:
        out, _ = p.communicate(timeout=400)
        assert p.returncode == 0, out.decode()[-3000:]
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    return col.records()


@pytest.mark.parametrize("inject", sorted(EXPECT))
def test_each_inject_fires_its_rule(injected, inject):
    epochs = [r for r in injected if r["run"] == f"inject-{inject}" and r["type"] == "epoch"]
    assert epochs
    fired = {k for e in epochs for k, v in e["metrics"].items() if v == 1}
    assert EXPECT[inject] & fired, sorted(fired)
    events = [ev for e in epochs for ev in e["events"]]
    assert any(ev["remedy"] for ev in events)
