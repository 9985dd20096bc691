"""The numba kernels against the same statistics in numpy.

    python benchmarks/bench_kernels.py

1. Moments of 1e7 values per input dtype (the headline ``kernel_over_numpy`` is float32):
   numpy needs several passes (isfinite mask, boolean gather, widening copy, mean, squared
   deviations, min, max); the kernel reads each value once.
2. The sample-diversity figures of 256 raw float32 samples (64 steps x 8 channels) against
   a 256-window reference: across-sample std (numpy: ``nanstd`` over the sample axis),
   near-duplicate pair distances (numpy: gather the pairs, subtract, RMS) and per-channel
   W1 (numpy: sort, then scipy.stats.wasserstein_distance's CDF integral).

The JIT is warmed first, kernel and numpy runs alternate (so drift on a shared machine hits
both alike), and each figure is reported as the min and the median of its repeats, in wall
time; ``kernel_cpu_ms*`` is the float32 kernel's thread CPU time, which a descheduled run
does not inflate (a wall median far above it means the machine was busy, not the kernel).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.analysis.diversity_kernels import (  # noqa: E402
    across_sample_std,
    pair_rms_distances,
    sorted_finite,
    wasserstein1_sorted,
    widen_1d,
)
from collector.analysis.kernels import as_kernel_input, channel_moments, moments_1d  # noqa: E402

N = 10_000_000
SAMPLES, STEPS, CHANNELS, REF_WINDOWS, MAX_PAIRS = 256, 64, 8, 256, 4096


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


def _timed(kernel, baseline, repeats: int) -> dict[str, list[float]]:
    """Alternating runs: wall seconds of each, and the kernel's thread CPU seconds."""
    out: dict[str, list[float]] = {"kernel": [], "numpy": [], "kernel_cpu": []}
    for _ in range(repeats):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        kernel()
        t1 = time.perf_counter()
        c1 = time.thread_time()
        baseline()
        t2 = time.perf_counter()
        out["kernel"].append(t1 - t0)
        out["kernel_cpu"].append(c1 - c0)
        out["numpy"].append(t2 - t1)
    return out


def _summary(prefix: str, suffix: str, t: dict[str, list[float]], cpu: bool = False) -> dict:
    """<prefix>kernel_ms<suffix> (min), ..._median, numpy the same, and both ratios."""
    k, b = t["kernel"], t["numpy"]
    out = {f"{prefix}kernel_over_numpy{suffix}": round(min(b) / min(k), 2),
           f"{prefix}kernel_over_numpy{suffix}_median": round(
               statistics.median(b) / statistics.median(k), 2),
           f"{prefix}kernel_ms{suffix}": round(min(k) * 1e3, 3),
           f"{prefix}kernel_ms{suffix}_median": round(statistics.median(k) * 1e3, 3),
           f"{prefix}numpy_ms{suffix}": round(min(b) * 1e3, 3),
           f"{prefix}numpy_ms{suffix}_median": round(statistics.median(b) * 1e3, 3)}
    if cpu:
        out[f"{prefix}kernel_cpu_ms{suffix}"] = round(min(t["kernel_cpu"]) * 1e3, 3)
        out[f"{prefix}kernel_cpu_ms{suffix}_median"] = round(
            statistics.median(t["kernel_cpu"]) * 1e3, 3)
    return out


def bench_moments(n: int = N, repeats: int = 11) -> dict:
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
        t = _timed(lambda arr=arr: moments_1d(arr),
                   lambda raw=raw, dtype=dtype: numpy_moments(_numpy_widen(raw, dtype)), repeats)
        out.update(_summary("", "" if dtype == "float32" else f"_{dtype}", t,
                            cpu=dtype == "float32"))
    # Per-channel moments of an (N/8, 8) float32 tensor (data stats, validation).
    x2 = f32.reshape(-1, 8)
    channel_moments(x2)
    t = _timed(lambda: channel_moments(x2),
               lambda: [numpy_moments(x2[:, c]) for c in range(8)], repeats)
    out["channel_kernel_over_numpy"] = round(min(t["numpy"]) / min(t["kernel"]), 2)
    return out


# -- sample diversity ----------------------------------------------------------------------
def _widened(raw: np.ndarray) -> np.ndarray:
    return widen_1d(raw.reshape(-1)).reshape(raw.shape)


def numpy_across_std(raw: np.ndarray) -> np.ndarray:
    x = raw.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        std = np.nanstd(x, axis=0, ddof=1)
    std[np.isfinite(x).sum(axis=0) < 2] = np.nan
    return np.nanmean(std, axis=0)


def _pairs(n: int, max_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs the kernel compares: evenly spaced over i < j in row-major order."""
    total = n * (n - 1) // 2
    count = min(total, max_pairs)
    p = (np.arange(count) * total) // count
    starts = np.concatenate([[0], np.cumsum(np.arange(n - 1, 0, -1))])
    i = np.searchsorted(starts, p, side="right") - 1
    return i, i + 1 + (p - starts[i])


def numpy_pair_distances(raw: np.ndarray, inv_scale: np.ndarray, i: np.ndarray,
                         j: np.ndarray) -> np.ndarray:
    y = raw.astype(np.float64) * inv_scale
    d = (y[i] - y[j]).reshape(len(i), -1)
    return np.sqrt(np.mean(d * d, axis=1))


def numpy_w1(raw: np.ndarray, ref_sorted: list[np.ndarray]) -> list[float]:
    x = raw.astype(np.float64)
    out = []
    for c, b in enumerate(ref_sorted):
        a = x[:, :, c].ravel()
        a = np.sort(a[np.isfinite(a)])
        both = np.sort(np.concatenate([a, b]))
        fa = np.searchsorted(a, both[:-1], side="right") / a.size
        fb = np.searchsorted(b, both[:-1], side="right") / b.size
        out.append(float(np.sum(np.abs(fa - fb) * np.diff(both))))
    return out


def kernel_w1(raw: np.ndarray, ref_sorted: list[np.ndarray]) -> list[float]:
    x = _widened(raw)
    return [wasserstein1_sorted(sorted_finite(np.ascontiguousarray(x[:, :, c]).reshape(-1)), b)
            for c, b in enumerate(ref_sorted)]


def bench_diversity(repeats: int = 21) -> dict:
    rng = np.random.default_rng(1)
    raw = rng.standard_normal((SAMPLES, STEPS, CHANNELS)).astype(np.float32)
    ref = rng.standard_normal((REF_WINDOWS, STEPS, CHANNELS))
    ref_sorted = [np.sort(ref[:, :, c].ravel()) for c in range(CHANNELS)]
    inv = 1.0 / ref.reshape(-1, CHANNELS).std(axis=0)
    i, j = _pairs(SAMPLES, MAX_PAIRS)
    cases = {
        "diversity_std_": (lambda: across_sample_std(_widened(raw))[0],
                           lambda: numpy_across_std(raw)),
        "duplicate_pairs_": (lambda: pair_rms_distances(_widened(raw), inv, MAX_PAIRS),
                             lambda: numpy_pair_distances(raw, inv, i, j)),
        "w1_": (lambda: kernel_w1(raw, ref_sorted), lambda: numpy_w1(raw, ref_sorted)),
    }
    out: dict = {"diversity_shape": f"{SAMPLES}x{STEPS}x{CHANNELS}"}
    for prefix, (kernel, baseline) in cases.items():
        got, want = np.asarray(kernel()), np.asarray(baseline())  # warm-up and agreement
        if got.shape != want.shape or not np.allclose(got, want, rtol=1e-9, atol=1e-12):
            raise AssertionError(f"{prefix}: kernel {got[:4]} != numpy {want[:4]}")
        out.update(_summary(prefix, "", _timed(kernel, baseline, repeats)))
    return out


def bench_kernels() -> dict:
    return {**bench_moments(), **bench_diversity()}


if __name__ == "__main__":
    for key, value in bench_kernels().items():
        print(f"{key:40s} {value}")
