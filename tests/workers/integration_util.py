"""What the framework-integration tests share: the README's examples as scripts, the
messages a recording holds, and an op log scoped to a callback's own code."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils._python_dispatch import TorchDispatchMode

from collector.recording.format import MESSAGE
from collector.recording.reader import read_records
from trainer_client import wire

ROOT = Path(__file__).resolve().parents[2]

# Value reads on the calling thread (see tests/test_client_nosync.py).
READS = {"aten._local_scalar_dense.default", "aten.item.default", "aten.equal.default"}


def readme_example(name: str) -> str:
    """The python block that follows ``<!-- example: NAME -->`` in README.md."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"<!-- example: {re.escape(name)} -->\n```python\n(.*?)```", text, re.S)
    assert m, f"README.md has no example {name!r}"
    return m.group(1)


def run_example(name: str, cwd: Path, env: dict[str, str], timeout: float = 240) -> None:
    """Run a README example as written, as a script in ``cwd``; wandb stays offline."""
    script = cwd / f"{name}_example.py"
    script.write_text(readme_example(name))
    env = {k: v for k, v in env.items() if k not in ("WANDB_API_KEY", "WANDB_MODE")}
    env["NETRC"] = str(cwd / "no-netrc")  # no credentials: the collector's wandb is offline
    r = subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]


@contextmanager
def short_tmp() -> Iterator[Path]:
    """A folder with a short path: ``local_collector`` puts an ipc socket in it, and a
    socket path may hold at most 107 characters (pytest's tmp_path can be longer)."""
    path = Path(tempfile.mkdtemp(prefix="tw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def messages(recording: Path) -> list[wire.Message]:
    """Every message a collector recorded, decoded."""
    return [wire.decode([bytes(f) for f in frames]) for rtype, frames in read_records(recording)
            if rtype == MESSAGE]


def tensor(msg: wire.Message, name: str) -> np.ndarray:
    t = msg.tensors[name]
    return np.frombuffer(bytes(t.data), dtype=t.dtype).reshape(t.shape)


class OpLog(TorchDispatchMode):
    """Every aten op the calling thread runs while it is active, into ``ops``."""

    def __init__(self, ops: list[str]) -> None:
        super().__init__()
        self.ops = ops
        self.thread = threading.get_ident()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def scope_ops(callback: Any, names: list[str]) -> list[str]:
    """Run the callback's methods ``names`` under an op log; return the shared op list.

    The frameworks look hooks up on the instance, so wrapping them there measures what the
    callback itself does, not what the trainer around it does."""
    ops: list[str] = []
    for name in names:
        fn = getattr(callback, name)

        def wrapped(*a: Any, _fn: Any = fn, **k: Any) -> Any:
            with OpLog(ops):
                return _fn(*a, **k)

        setattr(callback, name, wrapped)
    return ops


def hook_names(cls: type, extra: tuple[str, ...] = ()) -> list[str]:
    """The hooks a callback class defines itself (``on_*``, ``setup``, ``teardown``)."""
    own = [n for n in vars(cls) if n.startswith("on_") or n in ("setup", "teardown")]
    return own + list(extra)
