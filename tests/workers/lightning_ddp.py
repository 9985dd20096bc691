"""A 2-rank Lightning fit under the ``ddp`` strategy (gloo, CPU) with the trainwatch callback.

Lightning re-runs this script for rank 1 (``LOCAL_RANK=1``). Each rank writes what it
trained on to ``OUT/rank<r>.json``: its per-step losses and pre-clip gradient norms by
epoch, and the run id its client used.

    python tests/workers/lightning_ddp.py --endpoint ipc:///tmp/c.sock --out /tmp/out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import torch
from torch import nn

from trainer_client.integrations.lightning import TrainwatchCallback


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.loss: dict[int, list[float]] = {}
        self.grad_norm: dict[int, list[float]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.loss.setdefault(self.current_epoch + 1, []).append(float(loss.detach()))
        return loss

    def on_before_optimizer_step(self, optimizer):
        gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters()]))
        self.grad_norm.setdefault(self.current_epoch + 1, []).append(float(gn))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    y = torch.tanh(x[:, :3])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    cb = TrainwatchCallback(endpoint=args.endpoint)
    module = Net()
    run: dict[str, str] = {}

    class RunId(L.Callback):  # the id the rank's client used, read while it is open
        def on_train_end(self, trainer, pl_module):
            run["run"] = cb.client.run

    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp",
                        callbacks=[cb, RunId()], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=0.01)
    trainer.fit(module, loader)
    out = {"rank": trainer.global_rank, **run, "loss": module.loss,
           "grad_norm": module.grad_norm}
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main()
