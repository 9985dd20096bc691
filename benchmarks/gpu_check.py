"""The client on one CUDA GPU: its added time per training step and its host syncs.

    python benchmarks/gpu_check.py                          # CUDA, a ~50M-parameter LM
    python benchmarks/gpu_check.py --device cpu --steps 3   # the same logic, tiny, anywhere

It trains a real model: a decoder-only transformer language model (12 blocks, width 512,
~46M parameters; ``--preset tiny`` on the CPU) under bf16 autocast on CUDA, with gradient
clipping and an EMA copy (updated with a fused lerp, no host read), reporting to a real
collector process (``python -m collector collect``) over an ipc socket.

Added time per step: the same process, model and optimizer alternate between blocks of
steps without and with ``tw.log_step(loss, terms, model=model, grad_norm=norm, lr=lr)``,
in the order bare, logged, logged, bare, ... (so a drift in clock or load hits both arms
alike). A block is timed from a device synchronize before it to one after it; nothing in
between waits for the device. Reported: the median block's time per step of each arm,
their difference and ratio, and the training thread's own time inside the log calls.
``log_epoch`` (weights and EMA difference) and ``log_validation`` run at each epoch's end,
timed apart.

Host syncs: on CUDA, every ``log_step`` / ``log_epoch`` / ``log_validation`` call runs under
``torch.cuda.set_sync_debug_mode("error")``, so a device-to-host sync inside it raises.
``host_syncs`` counts the calls that raised, plus those in which the client caught the
error itself (it never raises into the loop: such a call shows as a ``log_failed`` drop,
or as a warning from ``log_epoch``); it must be 0. A second pass under ``"warn"`` counts
every sync warning (``sync_warnings``, also 0). On the CPU no such mode exists:
``host_syncs`` is null, and ``value_reads`` counts the aten ops that read a tensor's value
(``.item()``, ``bool(t)``) seen by a dispatch mode on the training thread (0 expected; the
same check as tests/test_client_nosync.py). That mode runs Python for every op, so CPU
timings of the logged arm are inflated: the CPU run checks the logic, the CUDA run gives
the figures.

Prints one JSON object (also written to ``--out``); exits 1 if a sync or value read was
seen, or the collector did not get the run.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

PRESETS = {  # vocab, width, blocks, heads, sequence, batch
    "50m": dict(vocab=8192, width=512, blocks=12, heads=8, seq=256, batch=16),
    "tiny": dict(vocab=256, width=64, blocks=2, heads=4, seq=32, batch=4),
}
READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.equal.default"}


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads) \
            .permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.ln2(x))


class LM(nn.Module):
    def __init__(self, vocab: int, width: int, blocks: int, heads: int, seq: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(seq, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class ValueReads:
    """Counts value-reading aten ops on the calling thread (CPU runs)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if str(func) in READS:
                    outer.count += 1
                return func(*args, **(kwargs or {}))

        self.count = 0
        self.mode = Mode


class _Said(logging.Handler):
    """What the client logged from the calling thread (a sync error it caught and told)."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


class Checker:
    """Runs each log call under the device's sync check and counts the calls that synced."""

    def __init__(self, device: torch.device, tw: Any) -> None:
        self.cuda = device.type == "cuda"
        self.tw = tw
        self.host_syncs = 0 if self.cuda else None
        self.reads = None if self.cuda else ValueReads()
        self.call_s: dict[str, list[float]] = {}

    @contextmanager
    def check(self, what: str):
        failed = self.tw.stats["dropped_by_reason"]["log_failed"]
        said = _Said()
        client_log = logging.getLogger("trainwatch.client")
        client_log.addHandler(said)
        raised = False
        t0 = time.perf_counter()
        try:
            if self.cuda:
                torch.cuda.set_sync_debug_mode("error")
                try:
                    yield
                except RuntimeError as exc:
                    if "synchroniz" not in str(exc):
                        raise
                    raised = True
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            else:
                with self.reads.mode():
                    yield
        finally:
            self.call_s.setdefault(what, []).append(time.perf_counter() - t0)
            client_log.removeHandler(said)
        # The client never raises into the loop: a sync error it caught shows as a
        # log_failed drop (log_step, log_validation) or a warning (log_epoch's summaries).
        if self.cuda and (raised or self.tw.stats["dropped_by_reason"]["log_failed"] > failed
                          or any("synchroniz" in m for m in said.messages)):
            self.host_syncs += 1


def _collector(tmp: Path):
    from harness import CollectorProc

    return CollectorProc(tmp, f"ipc://{tmp}/gpu.sock", "--once", "--quiet", "1").start()


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="tw-gpu-check-") as tmp:
        return _run(args, Path(tmp))


def _run(args: argparse.Namespace, tmp: Path) -> dict:
    from trainer_client import TrainerClient

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (try --device cpu)")
    preset = PRESETS[args.preset or ("50m" if device.type == "cuda" else "tiny")]
    torch.manual_seed(0)
    model = LM(preset["vocab"], preset["width"], preset["blocks"], preset["heads"],
               preset["seq"]).to(device)
    # An EMA copy updated without any host read (AveragedModel reads its counter on the
    # host every update: a sync per step in both arms would hide the device's run-ahead).
    ema = copy.deepcopy(model).requires_grad_(False)
    ema_params, params = list(ema.parameters()), list(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4,
                            fused=device.type == "cuda")
    amp = device.type == "cuda" and not args.no_amp
    gen = torch.Generator(device=device).manual_seed(1)
    b, t, v = preset["batch"], preset["seq"], preset["vocab"]
    col = _collector(tmp)
    tw = TrainerClient(endpoint=col.endpoint, run="gpu-check", rank=0, world_size=1)
    tw.log_config({"preset": args.preset, "amp": amp, "batch": b, "seq": t}, model=model)
    chk = Checker(device, tw)

    def step(log: bool) -> torch.Tensor:
        idx = torch.randint(v, (b, t + 1), device=device, generator=gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(idx[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, v), idx[:, 1:].reshape(-1))
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if log:
            terms = {"ce": loss.detach(), "logit_mean": logits.detach().float().mean()}
            with chk.check("log_step"):
                tw.log_step(loss.detach(), terms, model=model, grad_norm=norm,
                            lr=opt.param_groups[0]["lr"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch._foreach_lerp_(ema_params, params, 1e-3)
        return logits

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):  # compile kernels, fill the allocator: both arms alike
        step(log=False)
    sync()
    block = max(1, min(args.block, args.steps))
    n_blocks = max(1, math.ceil(args.steps / block))
    pattern = [(i % 4) in (1, 2) for i in range(2 * n_blocks)]  # bare, log, log, bare, ...
    per_step: dict[bool, list[float]] = {False: [], True: []}
    epoch = 0

    def end_epoch(logits: torch.Tensor) -> None:
        nonlocal epoch
        epoch += 1
        samples = logits.detach()[:4, :, :16].float()  # [batch, seq, 16 "channels"]
        with chk.check("log_validation"):
            tw.log_validation(epoch, samples)
        with chk.check("log_epoch"):
            tw.log_epoch(epoch, model=model, ema_model=ema)

    since = 0  # logged steps since the last epoch's end
    for log in pattern:
        sync()
        t0 = time.perf_counter()
        for _ in range(block):
            logits = step(log)
        sync()
        per_step[log].append((time.perf_counter() - t0) / block)
        if log:
            since += block
            if since >= args.epoch_steps:  # between timed blocks, timed on their own
                end_epoch(logits)
                since = 0
    if since or not epoch:
        end_epoch(logits)

    sync_warnings = None
    if device.type == "cuda":  # a second, counting pass: every sync warns
        sync_warnings = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(args.warn_steps):
                idx = torch.randint(v, (b, t + 1), device=device, generator=gen)
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                    logits = model(idx[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, v), idx[:, 1:].reshape(-1))
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    tw.log_step(loss.detach(), {"ce": loss.detach()}, model=model,
                                grad_norm=norm)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
                opt.zero_grad(set_to_none=True)
        sync_warnings = sum("synchroniz" in str(w.message) for w in caught)

    tw.close(timeout=60)
    status = col.wait(120)
    epochs = [r for r in col.records() if r["type"] == "epoch"]
    bare = statistics.median(per_step[False])
    logged = statistics.median(per_step[True])
    n_params = sum(p.numel() for p in model.parameters())
    stats = tw.stats
    calls = {k: statistics.median(s) * 1e6 for k, s in chk.call_s.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "params": n_params,
        "amp_bf16": amp,
        "steps_per_arm": block * n_blocks,
        "blocks_per_arm": n_blocks,
        "bare_step_ms": bare * 1e3,
        "logged_step_ms": logged * 1e3,
        "added_ms_per_step": (logged - bare) * 1e3,
        "added_fraction": (logged - bare) / bare,
        "log_call_us_median": calls,
        "host_syncs": chk.host_syncs,
        "sync_warnings": sync_warnings,
        "value_reads": None if chk.reads is None else chk.reads.count,
        "client_stats": {k: stats[k] for k in ("handed_to_socket", "dropped",
                                               "dropped_by_reason")},
        "collector_exit": status,
        "collector_epochs": len(epochs),
        "epochs_logged": epoch,
    }
    result["ok"] = bool(not result["host_syncs"] and not result["sync_warnings"]
                        and not result["value_reads"] and status == 0
                        and len(epochs) == epoch and stats["dropped"] == 0)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model size (default: 50m on CUDA, tiny on the CPU)")
    ap.add_argument("--steps", type=int, default=200, help="measured steps per arm")
    ap.add_argument("--block", type=int, default=10, help="steps per timed block")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--epoch-steps", type=int, default=100,
                    help="logged steps per epoch (log_validation + log_epoch)")
    ap.add_argument("--warn-steps", type=int, default=5)
    ap.add_argument("--no-amp", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
