"""numba kernels: single-pass moments of raw float16/bfloat16/float32/float64 arrays.

Every kernel is a pure function over numpy arrays. Values are widened to float64 inside the
kernel, non-finite values (NaN, +-Inf) are counted and kept out of the moments, and the
moments are accumulated as (count, mean, M2) so that chunks, channels and ranks merge
exactly with Chan's formula. No blanket fastmath: its no-NaN/no-Inf assumptions would
erase the finiteness checks. Two narrow flags only: the block sums may be reassociated
(vector lanes), and the extremes of a block already known finite are taken as such.

    raw = as_kernel_input(chunk, "bfloat16")
    n, mean, m2, lo, hi, bad = moments_1d(raw.reshape(-1))
    std = (m2 / n) ** 0.5

How an element is widened is chosen by the array's element type when numba compiles the
kernel, so the inner loops carry no dtype branch: float32/float64 are read as they are,
uint16 is a bfloat16 bit pattern and int16 a float16 bit pattern (numba has no float16
arithmetic). ``as_kernel_input`` makes those views from a declared dtype.

An empty accumulator is (0, 0.0, 0.0, +inf, -inf): callers omit statistics when n == 0.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from trainer_client.wire import FLOAT_DTYPES

__all__ = [
    "DTYPES",
    "as_kernel_input",
    "channel_moments",
    "merge_channel_moments",
    "merge_moments",
    "moments_1d",
    "reduce_moments",
    "warm_up",
    "window_median",
]

DTYPES = FLOAT_DTYPES  # the wire's float dtypes: the kernels read each raw
_BLOCK = 1024  # values per block: one shift each; a NaN/Inf block is re-read from L1
_F16_SUBNORMAL = 2.0**-24  # value of the lowest float16 mantissa bit when the exponent is 0


def as_kernel_input(arr: np.ndarray, dtype: str) -> np.ndarray:
    """The view of a raw array the kernels read for its declared dtype (never a copy).

    bfloat16 arrives as its uint16 bit pattern and stays uint16; float16 is viewed as int16.
    """
    arr = np.asarray(arr)
    if dtype == "bfloat16":
        if arr.dtype not in (np.uint16, np.int16):
            raise ValueError(f"bfloat16 data must arrive as uint16 bit patterns, got {arr.dtype}")
        return arr.view(np.uint16)
    if dtype == "float16":
        if arr.dtype != np.float16:
            raise ValueError(f"declared float16, got {arr.dtype}")
        return arr.view(np.int16)
    if dtype in ("float32", "float64"):
        if arr.dtype != np.dtype(dtype):
            raise ValueError(f"declared {dtype}, got {arr.dtype}")
        return arr
    raise ValueError(f"unsupported dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


@intrinsic
def _bits_as_f32(typingctx, bits):
    """Reinterprets a uint32 as the float32 with that bit pattern (a free register move)."""
    sig = types.float32(types.uint32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@njit(cache=True)
def _f16_bits_to_f64(raw):
    h = np.uint32(raw) & np.uint32(0xFFFF)
    sign = (h >> np.uint32(15)) << np.uint32(31)
    exp = (h >> np.uint32(10)) & np.uint32(0x1F)
    mant = h & np.uint32(0x3FF)
    if exp == 0:  # zero or subnormal: exactly mant * 2**-24
        v = np.float64(mant) * _F16_SUBNORMAL
        return -v if sign else v
    if exp == 0x1F:  # Inf / NaN keep their mantissa
        return np.float64(_bits_as_f32(sign | np.uint32(0x7F800000) | (mant << np.uint32(13))))
    bits = sign | ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))
    return np.float64(_bits_as_f32(bits))


def widen(raw):
    """One raw element as float64; chosen by the array's element type at compile time."""
    raise NotImplementedError("only callable from jitted code")


@overload(widen)
def _widen_impl(raw):
    if raw == types.uint16:  # bfloat16 bit pattern: the top half of a float32
        return lambda raw: np.float64(_bits_as_f32(np.uint32(raw) << np.uint32(16)))
    if raw == types.int16:  # float16 bit pattern
        return lambda raw: _f16_bits_to_f64(raw)
    if isinstance(raw, types.Float):
        return lambda raw: np.float64(raw)
    return None


@njit(cache=True)
def merge_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: the (count, mean, M2) of the union of two disjoint sets."""
    n = n_a + n_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a / n) * n_b
    return n, mean, m2


def _finite_extreme(name):
    """llvm.minnum/maxnum on float64, flagged nnan+nsz: LLVM vectorises a reduction of these
    (it does not vectorise a compare-and-select one without fastmath on the whole function).
    Only for values known finite, where the flags are true; +-0 compare equal."""

    @intrinsic
    def extreme(typingctx, a, b):
        sig = types.float64(types.float64, types.float64)

        def codegen(context, builder, signature, args):
            f64 = ir.DoubleType()
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f64, [f64, f64]),
                                                f"llvm.{name}.f64")
            return builder.call(fn, args, fastmath=("nnan", "nsz"))

        return sig, codegen

    return extreme


_finite_min = _finite_extreme("minnum")
_finite_max = _finite_extreme("maxnum")


@njit(cache=True, fastmath={"reassoc"})
def _shifted_sums(x, start, stop, shift):
    """sum(d), sum(d^2) with d = x[j] - shift over x[start:stop].

    reassoc (and nothing else: NaN/Inf still propagate) lets LLVM keep the sums in vector
    lanes; the unsigned index drops numba's negative-index wraparound, which otherwise
    turns every load into a gather.
    """
    s = 0.0
    q = 0.0
    for j in range(np.uint64(start), np.uint64(stop)):
        d = widen(x[j]) - shift
        s += d
        q += d * d
    return s, q


@njit(cache=True)
def _finite_extremes(x, start, stop):
    """(min, max) of x[start:stop], whose values are all finite (vectorised)."""
    lo = np.inf
    hi = -np.inf
    for j in range(np.uint64(start), np.uint64(stop)):
        v = widen(x[j])
        lo = _finite_min(lo, v)
        hi = _finite_max(hi, v)
    return lo, hi


@njit(cache=True)
def _block_shifted(x, start, stop):
    """Moments of x[start:stop] shifted by the block's first value: two vectorised reads.

    M2 = sum(d^2) - sum(d)^2/k with d = v - x[start] loses at most ~k ulps (a data point is
    within sqrt(k) std of the mean), negligible for k = 1024; the mean is good to about an
    ulp of the block's largest |value|, as a plain sum would be. The first returned value is
    False when a sum is not finite: the block holds NaN/Inf (or overflows) and must take the
    exact path instead, so no per-element finiteness branch is needed. Finite sums mean
    every value is finite, so the extremes pass (re-reading the block from L1) may assume it.
    Both loops run at memory speed; a scalar loop here was bound by the core's execution
    throughput, so anything sharing the core slowed it (see benchmarks/bench_kernels.py).
    """
    shift = widen(x[start])
    s, q = _shifted_sums(x, start, stop, shift)
    if not (s - s == 0.0 and q - q == 0.0):
        return False, 0.0, 0.0, 0.0, 0.0
    lo, hi = _finite_extremes(x, start, stop)
    k = stop - start
    return True, shift + s / k, max(q - s * s / k, 0.0), lo, hi


@njit(cache=True)
def _exact(x, start, stop):
    """Two-pass moments of the finite values of x[start:stop]: the fallback for a block
    holding NaN/Inf (taken only there, so its branches cost nothing elsewhere)."""
    k = 0
    total = 0.0
    lo = np.inf
    hi = -np.inf
    for i in range(start, stop):
        v = widen(x[i])
        if v - v == 0.0:  # v - v is NaN exactly for NaN and +-Inf
            k += 1
            total += v
            lo = min(lo, v)
            hi = max(hi, v)
    if k == 0:
        return 0, 0.0, 0.0, lo, hi
    mean = total / k
    m2 = 0.0
    for i in range(start, stop):
        v = widen(x[i])
        if v - v == 0.0:
            m2 += (v - mean) * (v - mean)
    return k, mean, m2, lo, hi


@njit(cache=True)
def moments_1d(x):
    """(finite count, mean, M2, min, max, non-finite count) of a 1-D array in one read.

    Each block of 1024 values is reduced in one shifted pass and merged into the running
    total with Chan; a block holding NaN/Inf is reduced again by the exact fallback.
    """
    n = 0
    mean = 0.0
    m2 = 0.0
    lo = np.inf
    hi = -np.inf
    size = x.shape[0]
    for start in range(0, size, _BLOCK):
        stop = min(start + _BLOCK, size)
        ok, b_mean, b_m2, b_lo, b_hi = _block_shifted(x, start, stop)
        k = stop - start
        if not ok:
            k, b_mean, b_m2, b_lo, b_hi = _exact(x, start, stop)
        n, mean, m2 = merge_moments(n, mean, m2, k, b_mean, b_m2)
        lo = min(lo, b_lo)
        hi = max(hi, b_hi)
    return n, mean, m2, lo, hi, size - n


@njit(cache=True)
def channel_moments(x):
    """Per-channel moments of a 2-D (N, C) array: arrays (count, mean, M2, min, max, bad).

    Row blocks are reduced in one shifted pass per channel (as in ``moments_1d``), the
    channels side by side; a channel whose block holds NaN/Inf is redone exactly.
    """
    rows, chans = x.shape
    n = np.zeros(chans, np.int64)
    mean = np.zeros(chans, np.float64)
    m2 = np.zeros(chans, np.float64)
    lo = np.full(chans, np.inf)
    hi = np.full(chans, -np.inf)
    shift = np.zeros(chans, np.float64)
    bs = np.zeros(chans, np.float64)
    bq = np.zeros(chans, np.float64)
    blo = np.zeros(chans, np.float64)
    bhi = np.zeros(chans, np.float64)
    block_rows = max(1, _BLOCK // max(chans, 1))
    for start in range(0, rows, block_rows):
        stop = min(start + block_rows, rows)
        for c in range(chans):
            shift[c] = widen(x[start, c])
        bs[:] = 0.0
        bq[:] = 0.0
        blo[:] = np.inf
        bhi[:] = -np.inf
        for r in range(start, stop):
            for c in range(chans):
                v = widen(x[r, c])
                blo[c] = v if v < blo[c] else blo[c]
                bhi[c] = v if v > bhi[c] else bhi[c]
                d = v - shift[c]
                bs[c] += d
                bq[c] += d * d
        k = stop - start
        for c in range(chans):
            if bs[c] - bs[c] == 0.0 and bq[c] - bq[c] == 0.0:
                b_n, b_mean, b_m2 = k, shift[c] + bs[c] / k, max(bq[c] - bs[c] * bs[c] / k, 0.0)
                b_lo, b_hi = blo[c], bhi[c]
            else:
                b_n, b_mean, b_m2, b_lo, b_hi = _exact(x[:, c], start, stop)
            n[c], mean[c], m2[c] = merge_moments(n[c], mean[c], m2[c], b_n, b_mean, b_m2)
            lo[c] = min(lo[c], b_lo)
            hi[c] = max(hi[c], b_hi)
    return n, mean, m2, lo, hi, rows - n


@njit(cache=True)
def merge_channel_moments(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Element-wise Chan merge of two per-channel accumulators; returns new arrays."""
    size = n_a.shape[0]
    n = np.empty(size, np.int64)
    mean = np.empty(size, np.float64)
    m2 = np.empty(size, np.float64)
    for c in range(size):
        n[c], mean[c], m2[c] = merge_moments(n_a[c], mean_a[c], m2_a[c], n_b[c], mean_b[c], m2_b[c])
    return n, mean, m2


@njit(cache=True)
def reduce_moments(n, mean, m2):
    """Pools a vector of (count, mean, M2) accumulators (channels, ranks) into one."""
    tn = 0
    tmean = 0.0
    tm2 = 0.0
    for i in range(n.shape[0]):
        tn, tmean, tm2 = merge_moments(tn, tmean, tm2, n[i], mean[i], m2[i])
    return tn, tmean, tm2


@njit(cache=True)
def window_median(values):
    """Median of the finite values of a small window (insertion sort); NaN when none."""
    tmp = np.empty(values.shape[0], np.float64)
    k = 0
    for i in range(values.shape[0]):
        v = values[i]
        if v - v == 0.0:
            j = k
            while j > 0 and tmp[j - 1] > v:
                tmp[j] = tmp[j - 1]
                j -= 1
            tmp[j] = v
            k += 1
    if k == 0:
        return np.nan
    if k % 2 == 1:
        return tmp[k // 2]
    return 0.5 * (tmp[k // 2 - 1] + tmp[k // 2])


def warm_up() -> None:
    """Compiles every kernel specialization the collector uses, or loads it from numba's
    on-disk cache: ~20 s on a cold cache, well under 1 s after. Call it at start-up so the
    first closed epoch does not stall ingest."""
    i64, f64 = np.zeros(2, np.int64), np.zeros(2, np.float64)
    for dtype in DTYPES:
        raw = as_kernel_input(np.zeros((2, 2), np.uint16 if dtype == "bfloat16" else dtype),
                              dtype)
        moments_1d(np.ascontiguousarray(raw.reshape(-1)))
        channel_moments(raw)
    merge_channel_moments(i64, f64, f64, i64, f64, f64)
    reduce_moments(i64, f64, f64)
    window_median(f64)
    from collector.analysis import diversity  # imports this module: here, not at the top

    diversity.warm_up()  # the first validation's sample figures
