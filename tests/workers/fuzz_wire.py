"""Coverage-guided fuzzing of ``wire.decode`` with atheris (libFuzzer).

    python tests/workers/fuzz_wire.py -max_total_time=600      # as long as you like
    python tests/workers/fuzz_wire.py crash-<hash>             # replay a finding

Half the inputs are raw frames; the other half build a 13-field header from the fuzzer's
bytes (each field either valid or arbitrary), so the search reaches the body and tensor
checks instead of stopping at msgpack. ``decode`` may raise only ``DecodeError``, and what
it returns must keep the promises the collector relies on.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

with atheris.instrument_imports():
    import msgpack

    from trainer_client import wire

_VALID = [wire.VERSION, wire.KIND_STEP, "run", 0, 2, 7, 3, 4, 1, 1.5, 0,
          [0.5, 1.0, ["a"], [0.25]], [["param_norms", "float32", [2]]]]
_BODIES = [
    {"host": "h", "env": {"WANDB_PROJECT": "p"}}, {"config": {"lr": 1e-3}, "num_params": 3},
    {"index": 0, "count": 1, "channels": ["a", "b"]}, [0.5, None, [], []],
    {"weights": [1, 2, 3, 4, 5], "ema": [1, 2], "param_names": ["w"]},
    {"epoch": 1, "channels": ["a", "b"]}, {"stats": {"sent": 1}},
]
_DTYPES = [*wire.DTYPES, "int8", ""]


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> object:
    """An arbitrary msgpack-able value."""
    pick = fdp.ConsumeIntInRange(0, 8 if depth < 2 else 6)
    if pick == 0:
        return None
    if pick == 1:
        return fdp.ConsumeBool()
    if pick == 2:
        return fdp.ConsumeIntInRange(-(2 ** 63), 2 ** 64 - 1)
    if pick == 3:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if pick == 4:
        return fdp.ConsumeUnicodeNoSurrogates(8)
    if pick == 5:
        return fdp.ConsumeBytes(8)
    if pick == 6:
        return fdp.ConsumeIntInRange(-2, 10)
    n = fdp.ConsumeIntInRange(0, 4)
    if pick == 7:
        return [_value(fdp, depth + 1) for _ in range(n)]
    return {fdp.ConsumeUnicodeNoSurrogates(4): _value(fdp, depth + 1) for _ in range(n)}


def _structured(fdp: atheris.FuzzedDataProvider) -> list[bytes]:
    head = list(_VALID)
    head[1] = fdp.ConsumeIntInRange(1, 7)
    head[11] = _BODIES[head[1] - 1]
    frames: list[bytes] = []
    specs = []
    for i in range(fdp.ConsumeIntInRange(0, 2)):
        dims = [fdp.ConsumeIntInRange(0, 4) for _ in range(fdp.ConsumeIntInRange(0, 3))]
        dtype = _DTYPES[fdp.ConsumeIntInRange(0, len(_DTYPES) - 1)]
        name = ["chunk", "samples", "param_norms", "mean"][fdp.ConsumeIntInRange(0, 3)]
        specs.append([name if i == 0 else f"{name}{i}", dtype, dims])
        n = wire.DTYPES.get(dtype, 1) * math.prod(dims)
        off = fdp.ConsumeIntInRange(-1, 1) if fdp.ConsumeBool() else 0  # usually exact
        frames.append(fdp.ConsumeBytes(max(0, n + off)))
    head[12] = specs
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        head[fdp.ConsumeIntInRange(0, 12)] = _value(fdp)
    return [msgpack.packb(head, use_bin_type=True), *frames]


def _check(frames: list[bytes]) -> None:
    try:
        m = wire.decode(frames)
    except wire.DecodeError:
        return
    assert type(m.kind) is int and m.kind in wire.KINDS, m.kind
    assert type(m.run) is str and m.run
    for v in (m.rank, m.world_size, m.instance, m.seq, m.step, m.epoch, m.dropped):
        assert type(v) is int and v >= 0, v
    assert m.rank < m.world_size and math.isfinite(m.wall_time)
    for t in m.tensors.values():
        assert len(t.data) == wire.DTYPES[t.dtype] * math.prod(t.shape), t


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    if fdp.ConsumeBool():
        frames = _structured(fdp)
    else:
        frames = [fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 256))
                  for _ in range(fdp.ConsumeIntInRange(1, 3))]
    _check(frames)


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
