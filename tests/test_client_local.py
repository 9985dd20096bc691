"""``local_collector=``: a script's own collector process records the run, and leaves no
socket file behind (also when the folder is too deep for a Unix socket path)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import env

from collector.recording.format import MESSAGE
from collector.recording.reader import read_records
from trainer_client import wire

SCRIPT = """
import sys, torch
from trainer_client import TrainerClient
folder = sys.argv[1]
model = torch.nn.Linear(3, 1)
tw = TrainerClient(local_collector=folder, run="local-run")
print(tw.endpoint, flush=True)
for epoch in (1, 2):
    for _ in range(5):
        loss = model(torch.randn(4, 3)).pow(2).mean()
        loss.backward()
        tw.log_step(loss, model=model)
        model.zero_grad()
    tw.log_epoch(epoch, model=model)
tw.close()
"""


@pytest.mark.parametrize("deep", [False, True])
def test_a_local_collector_records_the_run_and_removes_its_socket(tmp_path, deep):
    folder = tmp_path / ("d" * 60 if deep else "") / ("e" * 60 if deep else "") / "runs"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    endpoint = r.stdout.split()[0]
    sock = endpoint.removeprefix("ipc://")
    assert (folder.as_posix() in sock) is not deep  # too deep: the socket lives in /tmp
    assert not (folder / "local-run.sock").exists()
    assert not os.path.exists(sock)  # gone, wherever it was
    kinds = [wire.decode(f).kind for t, f in read_records(folder / "local-run.twrec")
             if t == MESSAGE]
    assert kinds.count(wire.KIND_STEP) == 10 and kinds[-1] == wire.KIND_BYE
    assert "local-run" in (folder / "local-run.jsonl").read_text()
