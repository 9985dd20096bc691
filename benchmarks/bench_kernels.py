"""The moments kernel against the same statistics in numpy, on 1e7 values.

    python benchmarks/bench_kernels.py

numpy needs several passes over the data (isfinite mask, boolean gather, widening copy,
mean, squared deviations, min, max); the kernel reads each value once. The JIT is warmed
first, kernel and numpy runs alternate (so drift on a shared machine hits both alike), and
the best of ``repeats`` is kept. The headline ``kernel_over_numpy`` is float32.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.analysis.kernels import as_kernel_input, channel_moments, moments_1d  # noqa: E402

N = 10_000_000


def numpy_moments(values: np.ndarray) -> tuple[int, float, float, float, float, int]:
    """What the kernel computes, written the usual numpy way (values already floats)."""
    finite = values[np.isfinite(values)].astype(np.float64)
    mean = finite.mean()
    m2 = np.square(finite - mean).sum()
    return finite.size, mean, m2, finite.min(), finite.max(), values.size - finite.size


def _numpy_widen(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


def _best_pair(kernel, baseline, repeats: int) -> tuple[float, float]:
    best_k = best_b = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        kernel()
        t1 = time.perf_counter()
        baseline()
        t2 = time.perf_counter()
        best_k, best_b = min(best_k, t1 - t0), min(best_b, t2 - t1)
    return best_k, best_b


def bench_kernels(n: int = N, repeats: int = 7) -> dict:
    rng = np.random.default_rng(0)
    f32 = (rng.standard_normal(n) * 3.0 + 1.0).astype(np.float32)
    inputs = {
        "float32": f32,
        "float64": f32.astype(np.float64),
        "float16": f32.astype(np.float16),
        "bfloat16": (f32.view(np.uint32) >> 16).astype(np.uint16),
    }
    out: dict = {"kernel_values": n}
    for dtype, raw in inputs.items():
        arr = as_kernel_input(raw, dtype)
        got = moments_1d(arr)  # warms the JIT (or loads it from the on-disk cache)
        want = numpy_moments(_numpy_widen(raw, dtype))
        if got[0] != want[0] or not np.isclose(got[1], want[1], rtol=1e-9, atol=1e-12):
            raise AssertionError(f"{dtype}: kernel {got[:3]} != numpy {want[:3]}")
        tk, tn = _best_pair(lambda arr=arr: moments_1d(arr),
                            lambda raw=raw, dtype=dtype: numpy_moments(_numpy_widen(raw, dtype)),
                            repeats)
        suffix = "" if dtype == "float32" else f"_{dtype}"
        out[f"kernel_over_numpy{suffix}"] = round(tn / tk, 2)
        out[f"kernel_ms{suffix}"] = round(tk * 1e3, 2)
        out[f"numpy_ms{suffix}"] = round(tn * 1e3, 2)
    # Per-channel moments of an (N/8, 8) float32 tensor (data stats, validation).
    x2 = f32.reshape(-1, 8)
    channel_moments(x2)
    tk, tn = _best_pair(lambda: channel_moments(x2),
                        lambda: [numpy_moments(x2[:, c]) for c in range(8)], repeats)
    out["channel_kernel_over_numpy"] = round(tn / tk, 2)
    return out


if __name__ == "__main__":
    for key, value in bench_kernels().items():
        print(f"{key:32s} {value}")
