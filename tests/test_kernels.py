"""The numba kernels and the statistics built on them equal the plain numpy reference.

Property tests over all four input dtypes with NaN and +-Inf mixed in; example counts are
bounded so the file runs in seconds once numba's on-disk cache is warm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collector.analysis.datastats import DataStatsAccumulator
from collector.analysis.inputs import DataConstants, EpochInput, StepSeries, ValidationInput
from collector.analysis.kernels import (
    as_kernel_input,
    channel_moments,
    merge_moments,
    moments_1d,
    reduce_moments,
    window_median,
)
from collector.analysis.profile_load import load_profile
from collector.analysis.stats import epoch_stats

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SPECIAL = [math.nan, math.inf, -math.inf]


@st.composite
def raw_arrays(draw, dtype: str, ndim: int = 1, max_size: int = 3000, chans: int = 0,
               bound: float = 0.0):
    """A raw array as the wire delivers it, with NaN/Inf sprinkled in (bf16: uint16 bits)."""
    if ndim == 1:
        shape = (draw(st.integers(0, max_size)),)
    else:
        chans = chans or draw(st.integers(1, 5))
        shape = (draw(st.integers(0, max_size // chans)), chans)
    if dtype in ("bfloat16", "float16"):
        bits = draw(hnp.arrays(np.uint16, shape, elements=st.integers(0, 0xFFFF),
                               fill=st.integers(0x3C00, 0x3E00)))  # mostly ordinary values
        return bits if dtype == "bfloat16" else bits.view(np.float16)
    width = 32 if dtype == "float32" else 64
    bound = bound or (2.0**100 if width == 32 else 2.0**330)
    finite = st.floats(-bound, bound, width=width)
    offset = draw(st.sampled_from([0.0, 1.0, -1e3, 1e6]))
    arr = draw(hnp.arrays(np.dtype(dtype), shape, elements=finite | st.sampled_from(SPECIAL),
                          fill=st.floats(-2, 2, width=width)))
    return (arr + np.asarray(offset, dtype=dtype)).astype(dtype)


def assert_moments_equal(got, want, scale: float) -> None:
    n, mean, m2, lo, hi, bad = got
    wn, wmean, wm2, wlo, whi, wbad = want
    assert (n, bad) == (wn, wbad)
    if wn == 0:
        return
    assert (lo, hi) == (wlo, whi)
    assert abs(mean - wmean) <= 1e-12 * scale
    assert abs(m2 - wm2) <= 1e-9 * wm2 + 1e-12 * n * scale * scale


def _scale(values: np.ndarray) -> float:
    fin = values[np.isfinite(values)]
    return float(np.abs(fin).max()) if fin.size else 1.0


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@SETTINGS
@given(data=st.data())
def test_moments_1d_equals_reference(dtype, data):
    raw = data.draw(raw_arrays(dtype))
    wide = ref.widen(raw, dtype)
    got = moments_1d(as_kernel_input(raw, dtype))
    assert_moments_equal(got, ref.moments(wide), _scale(wide))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@SETTINGS
@given(data=st.data())
def test_channel_moments_equal_reference(dtype, data):
    raw = data.draw(raw_arrays(dtype, ndim=2))
    wide = ref.widen(raw, dtype)
    got = channel_moments(np.ascontiguousarray(as_kernel_input(raw, dtype)))
    for c, want in enumerate(ref.channel_moments(wide)):
        assert_moments_equal(tuple(a[c] for a in got), want, _scale(wide[:, c]))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_every_16_bit_pattern_widens_exactly(dtype):
    """All 65536 patterns, one per channel: min == max == the reference value, or non-finite."""
    bits = np.arange(65536, dtype=np.uint16)
    raw = bits if dtype == "bfloat16" else bits.view(np.float16)
    want = ref.widen(raw, dtype)
    n, mean, m2, lo, hi, bad = channel_moments(as_kernel_input(raw, dtype).reshape(1, -1))
    fin = np.isfinite(want)
    assert np.array_equal(bad, (~fin).astype(np.int64))
    assert np.array_equal(lo[fin], want[fin]) and np.array_equal(hi[fin], want[fin])
    assert np.array_equal(mean[fin], want[fin]) and not m2.any()


@SETTINGS
@given(a=raw_arrays("float64", max_size=500), b=raw_arrays("float64", max_size=500))
def test_chan_merge_equals_moments_of_the_union(a, b):
    ma, mb = moments_1d(a), moments_1d(b)
    n, mean, m2 = merge_moments(ma[0], ma[1], ma[2], mb[0], mb[1], mb[2])
    whole = np.concatenate([a, b])
    want = ref.moments(whole)
    pooled = reduce_moments(np.array([ma[0], mb[0]]), np.array([ma[1], mb[1]]),
                            np.array([ma[2], mb[2]]))
    for got in ((n, mean, m2), pooled):
        assert_moments_equal((*got, want[3], want[4], want[5]), want, _scale(whole))


@SETTINGS
@given(values=st.lists(st.floats(-1e6, 1e6) | st.sampled_from(SPECIAL), max_size=12))
def test_window_median_equals_numpy_median(values):
    got = window_median(np.asarray(values, dtype=np.float64))
    want = ref.finite_median(np.asarray(values))
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-15)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_data_stats_stream_equals_whole_tensor(dtype, data):
    raw = data.draw(raw_arrays(dtype, ndim=2, max_size=2000))
    wide = ref.widen(raw, dtype)
    assume(np.isfinite(wide).any(axis=0).all())  # every channel has a figure
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=4)))
    acc = DataStatsAccumulator()
    for part in np.split(raw, cuts):
        acc.add(part, dtype)
    names = [f"c{i}" for i in range(raw.shape[1])]
    got = acc.metrics(names)
    want = ref.data_stats([raw], dtype, names)
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key] == pytest.approx(w, rel=1e-9, abs=1e-12 * _scale(wide)), key


def test_data_stats_accumulate_exactly_over_many_chunks():
    """Millions of values far from zero, streamed in uneven chunks: float64 two-pass quality."""
    rng = np.random.default_rng(7)
    data = (1e4 + rng.standard_normal((2_000_000, 3))).astype(np.float32)
    acc = DataStatsAccumulator()
    for part in np.array_split(data, 37):
        acc.add(part, "float32")
    got = acc.metrics(["a", "b", "c"])
    wide = data.astype(np.float64)
    assert got["data_stats/normalized_mean"] == pytest.approx(wide.mean(), rel=1e-14)
    assert got["data_stats/normalized_std"] == pytest.approx(wide.std(), rel=1e-10)
    assert got["data_stats/b_std"] == pytest.approx(wide[:, 1].std(), rel=1e-10)


def test_as_kernel_input_rejects_mismatched_dtypes():
    with pytest.raises(ValueError, match="uint16"):
        as_kernel_input(np.zeros(3, np.float32), "bfloat16")
    with pytest.raises(ValueError, match="declared float32"):
        as_kernel_input(np.zeros(3, np.float64), "float32")
    with pytest.raises(ValueError, match="unsupported"):
        as_kernel_input(np.zeros(3, np.float64), "int8")


@st.composite
def epoch_inputs(draw):
    """A DDP epoch of 1-3 ranks with NaN/Inf steps, loss terms and validation samples."""
    world = draw(st.integers(1, 3))
    n = draw(st.integers(1, 40))
    vals = st.floats(0.01, 50) | st.sampled_from(SPECIAL)
    steps = np.arange(n, dtype=np.int64) + 100
    grad = np.asarray(draw(st.lists(vals, min_size=n, max_size=n)))
    series = {}
    for r in range(world):
        loss = np.asarray(draw(st.lists(vals, min_size=n, max_size=n)))
        comps = {t: np.asarray(draw(st.lists(st.floats(0, 5), min_size=n, max_size=n)))
                 for t in ("simple", "vel", "fk")[: draw(st.integers(0, 3))]}
        series[r] = StepSeries(steps, loss, grad.copy(), comps)
    w = np.array([1000.0, 120.0, 3.0, 40.0, 2.5])
    # Moderate magnitudes: precision at extreme ranges is the kernel tests' business.
    samples = draw(raw_arrays("float32", ndim=2, max_size=300, chans=2, bound=1e3).filter(
        lambda a: np.isfinite(a).any(axis=0).all()))
    val = ValidationInput(5, "float32", [samples], ["knee_angle_r", "grf_vz_r"])
    return EpochInput("run", 5, world, series, {r: w for r in range(world)},
                      {0: np.array([1000.0, 3.0])}, [], [], val)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inp=epoch_inputs())
def test_epoch_stats_equal_reference(inp):
    consts = DataConstants(["knee_angle_r", "grf_vz_r"], np.array([0.3, 500.0]),
                           np.array([0.4, 200.0]))
    got = epoch_stats(inp, consts, load_profile(None)).metrics
    want = ref.epoch_metrics(inp, consts)
    assert set(got) == set(want)
    for key, w in want.items():
        assert got[key] == pytest.approx(w, rel=1e-9, abs=1e-9), key
        assert type(got[key]) in (float, int), key


@pytest.mark.parametrize("offset", [1e4, 1e8])
def test_moments_keep_their_precision_far_from_zero(offset):
    """The block sums may be reassociated (vector lanes); the shift by the block's first
    value must survive that, or M2 of values far from zero would cancel catastrophically."""
    x = offset + np.random.default_rng(11).standard_normal(300_000)
    n, mean, m2, lo, hi, bad = moments_1d(x)
    want = ref.moments(x)
    assert (n, lo, hi, bad) == (want[0], want[3], want[4], want[5])
    assert m2 == pytest.approx(want[2], rel=1e-9)
    assert mean == pytest.approx(want[1], rel=1e-15)
