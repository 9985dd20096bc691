"""Sample-diversity kernels equal plain numpy references; the figures tell collapse from health.

The acceptance cases use realistic gait windows (examples/gait_diffusion/data.py): copies of
one window, copies with slight noise, a few modes, and independent windows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import reference as ref
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from collector.analysis.diversity import (
    DataReference,
    DiversityConfig,
    sample_diversity,
    warm_up,
)
from collector.analysis.diversity_kernels import (
    across_sample_std,
    pair_rms_distances,
    sorted_finite,
    wasserstein1_sorted,
    widen_1d,
)
from collector.analysis.kernels import as_kernel_input
from examples.gait_diffusion import data as gd

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECIAL = [math.nan, math.inf, -math.inf]
WINDOW = 64


# -- plain numpy references ----------------------------------------------------------------
def ref_across_std(x: np.ndarray) -> np.ndarray:
    """Per channel: mean over t of the std (ddof=1) over n of the finite x[:, t, c]."""
    out = np.full(x.shape[2], math.nan)
    for c in range(x.shape[2]):
        stds = []
        for t in range(x.shape[1]):
            v = x[:, t, c][np.isfinite(x[:, t, c])]
            if v.size >= 2:
                stds.append(np.std(v, ddof=1))
        if stds:
            out[c] = np.mean(stds)
    return out


def ref_pairs(n: int, max_pairs: int) -> list[tuple[int, int]]:
    every = [(i, j) for i in range(n) for j in range(i + 1, n)]
    count = min(len(every), max_pairs)
    return [every[(k * len(every)) // count] for k in range(count)]


def ref_distances(x: np.ndarray, inv_scale: np.ndarray, max_pairs: int) -> np.ndarray:
    out = []
    for i, j in ref_pairs(x.shape[0], max_pairs):
        with np.errstate(invalid="ignore", over="ignore"):
            sq = ((x[i] - x[j]) * inv_scale) ** 2
        out.append(math.sqrt(math.fsum(sq.ravel()) / sq.size) if np.isfinite(sq).all()
                   else math.nan)
    return np.array(out)


def ref_w1(a: np.ndarray, b: np.ndarray) -> float:
    """W1 as the integral of |F_a - F_b| (the CDF form, as scipy computes it)."""
    a, b = np.sort(a[np.isfinite(a)]), np.sort(b[np.isfinite(b)])
    if not a.size or not b.size:
        return math.nan
    both = np.sort(np.concatenate([a, b]))
    fa = np.searchsorted(a, both[:-1], side="right") / a.size
    fb = np.searchsorted(b, both[:-1], side="right") / b.size
    return math.fsum(np.abs(fa - fb) * np.diff(both))


# -- strategies ----------------------------------------------------------------------------
def float_cubes(max_n: int = 12, max_t: int = 6, max_c: int = 4, bound: float = 1e6):
    shape = st.tuples(st.integers(0, max_n), st.integers(1, max_t), st.integers(1, max_c))
    return shape.flatmap(lambda s: hnp.arrays(
        np.float64, s, elements=st.floats(-bound, bound) | st.sampled_from(SPECIAL),
        fill=st.floats(-2, 2)))


def finite_vectors(max_size: int = 200):
    return hnp.arrays(np.float64, st.integers(1, max_size), elements=st.floats(-1e6, 1e6)
                      | st.sampled_from([0.0, 1.0, -1.0]))


# -- kernels against the references --------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
def test_widen_equals_reference_for_every_dtype(dtype):
    rng = np.random.default_rng(1)
    if dtype in ("float16", "bfloat16"):
        bits = np.arange(65536, dtype=np.uint16)  # every pattern, NaN and Inf included
        raw = bits if dtype == "bfloat16" else bits.view(np.float16)
    else:
        raw = np.concatenate([rng.standard_normal(500), SPECIAL]).astype(dtype)
    got = widen_1d(as_kernel_input(raw, dtype))
    want = ref.widen(raw, dtype)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])


@SETTINGS
@given(x=float_cubes())
def test_across_sample_std_equals_reference(x):
    got, cells = across_sample_std(np.ascontiguousarray(x))
    want = ref_across_std(x)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.array_equal(cells > 0, ~np.isnan(want))
    fin = ~np.isnan(want)
    assert np.allclose(got[fin], want[fin], rtol=1e-9, atol=1e-9)


@SETTINGS
@given(x=float_cubes(max_n=30, bound=1e3), max_pairs=st.integers(1, 500))
def test_pair_distances_equal_reference(x, max_pairs):
    inv = np.linspace(0.5, 2.0, x.shape[2])
    got = pair_rms_distances(np.ascontiguousarray(x), inv, max_pairs)
    want = ref_distances(x, inv, max_pairs)
    assert got.shape == want.shape == (min(x.shape[0] * (x.shape[0] - 1) // 2, max_pairs),)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    assert np.allclose(got[~np.isnan(got)], want[~np.isnan(want)], rtol=1e-12, atol=1e-12)


@SETTINGS
@given(a=finite_vectors(), b=finite_vectors())
def test_w1_equals_cdf_reference(a, b):
    got = wasserstein1_sorted(np.sort(a), np.sort(b))
    want = ref_w1(a, b)
    scale = max(np.abs(a).max(), np.abs(b).max(), 1.0)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12 * scale)


@SETTINGS
@given(a=finite_vectors(), shift=st.floats(-1e3, 1e3))
def test_w1_known_values(a, shift):
    """Identical sets: 0. A shifted copy: |shift|. Equal sizes: mean |a_(k) - b_(k)|."""
    s = np.sort(a)
    assert wasserstein1_sorted(s, s) == 0.0
    moved = np.sort(a + shift)
    assert wasserstein1_sorted(s, moved) == pytest.approx(
        np.mean(np.abs(moved - s)), rel=1e-9, abs=1e-9)


@SETTINGS
@given(v=hnp.arrays(np.float64, st.integers(0, 3000), elements=st.floats(width=64)
                    | st.sampled_from([*SPECIAL, 0.0, -0.0, 5e-324, -5e-324])))
def test_sorted_finite_equals_numpy(v):
    """Every exponent, subnormals and signed zeros: the radix sort's keys keep the order."""
    assert np.array_equal(sorted_finite(v), np.sort(v[np.isfinite(v)]))


# -- the reference and the figures ---------------------------------------------------------
@pytest.fixture(scope="module")
def gait() -> np.ndarray:
    """2048 normalised gait windows (64 x 8) from 16 simulated walkers."""
    warm_up()
    return gd.make_dataset(gd.DataConfig(pseudo_dataset_len=2048, window_len=WINDOW)
                           ).windows.numpy()


@pytest.fixture(scope="module")
def gait_ref(gait) -> DataReference:
    """Built the way the collector gets the data: flattened rows in uneven chunks."""
    return DataReference.build(np.array_split(gait.reshape(-1, 8), 7), "float32", WINDOW)


def picked_windows(n_windows: int, m: int) -> np.ndarray:
    return (np.arange(m) * n_windows) // m


def test_reference_equals_numpy_on_its_windows(gait, gait_ref):
    chosen = gait[picked_windows(len(gait), 256)].astype(np.float64)
    assert np.array_equal(gait_ref.windows, chosen)  # chunk boundaries cut windows: stitched
    assert np.allclose(gait_ref.across_std, ref_across_std(chosen), rtol=1e-9)
    std = chosen.reshape(-1, 8).std(axis=0)
    assert np.allclose(gait_ref.channel_std, std, rtol=1e-9)
    want = np.median(ref_distances(chosen, 1 / std, 4096))
    assert gait_ref.pair_rms == pytest.approx(want, rel=1e-9)
    for c, values in enumerate(gait_ref.values):
        assert values.size <= DiversityConfig().max_values
        assert np.array_equal(values, np.sort(chosen[:, :, c].ravel()))


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_figures_equal_numpy_for_raw_dtypes(gait, gait_ref, dtype):
    """Raw bits in, the same figures as numpy computes on the widened values."""
    x32 = gait[100:148] + np.float32(0.01) * gait[900:948]
    raw = {"float16": x32.astype(np.float16), "float32": x32,
           "bfloat16": (x32.view(np.uint32) >> 16).astype(np.uint16)}[dtype]
    x = ref.widen(raw, dtype)
    figs = sample_diversity(raw, dtype, gait_ref)
    across = ref_across_std(x)
    assert np.allclose(figs.across_std, across, rtol=1e-9)
    assert figs.diversity == pytest.approx(np.mean(across / gait_ref.across_std), rel=1e-9)
    dist = ref_distances(x, 1 / gait_ref.channel_std, 4096)
    assert figs.pairs == dist.size == 48 * 47 // 2
    assert figs.duplicate_frac == pytest.approx(np.mean(dist < 0.1 * gait_ref.pair_rms))
    w1 = [ref_w1(x[:, :, c].ravel(), gait_ref.windows[:, :, c].ravel()) for c in range(8)]
    assert np.allclose(figs.w1, w1, rtol=1e-9)
    assert np.allclose(figs.w1_norm, np.array(w1) / gait_ref.channel_std, rtol=1e-9)
    flat = x.reshape(-1, 8)
    assert np.allclose(figs.channel_std, flat.std(axis=0), rtol=1e-9)
    assert np.allclose(figs.channel_mean, flat.mean(axis=0), rtol=1e-9, atol=1e-12)


def test_copies_of_one_window_are_collapsed(gait, gait_ref):
    figs = sample_diversity(np.repeat(gait[7:8], 64, axis=0), "float32", gait_ref)
    assert figs.diversity == 0.0
    assert figs.duplicate_frac == 1.0
    # ...while the guide's spread is that of a real window (why it let this pass)
    assert figs.channel_std.min() > 0.3


@pytest.mark.parametrize("noise", [0.02, 0.05])
def test_slight_noise_around_one_window_is_still_collapsed(gait, gait_ref, noise):
    rng = np.random.default_rng(3)
    x = (np.repeat(gait[7:8], 64, axis=0) + rng.normal(0, noise, (64, WINDOW, 8))).astype(
        np.float32)
    figs = sample_diversity(x, "float32", gait_ref)
    assert figs.diversity < 0.1
    assert figs.duplicate_frac > 0.95


def test_independent_windows_are_diverse(gait, gait_ref):
    """Windows the reference did not draw, and another population of walkers."""
    picked = set(picked_windows(len(gait), 256).tolist())
    held = np.array([i for i in range(len(gait)) if i not in picked])
    others = gd.make_dataset(gd.DataConfig(pseudo_dataset_len=64, window_len=WINDOW, seed=1)
                             ).windows.numpy()
    rng = np.random.default_rng(4)
    for x in (gait[rng.choice(held, 64, replace=False)], others):
        figs = sample_diversity(x, "float32", gait_ref)
        assert 0.8 < figs.diversity < 1.2
        assert figs.duplicate_frac < 0.02
        assert np.nanmax(figs.w1_norm) < 0.15


def test_a_few_modes_show_as_duplicate_pairs(gait, gait_ref):
    """Four windows 16 times each: spread across samples looks healthy, pairs do not."""
    x = np.repeat(gait[[3, 500, 900, 1500]], 16, axis=0)
    figs = sample_diversity(x, "float32", gait_ref)
    assert figs.diversity > 0.5
    assert figs.duplicate_frac == pytest.approx(4 * 16 * 15 / (64 * 63))


def test_a_shifted_channel_shows_in_its_w1(gait, gait_ref):
    x = gait[200:264].copy()
    x[:, :, 1] += 0.5  # half a training std
    figs = sample_diversity(x, "float32", gait_ref)
    assert figs.w1_norm[1] == pytest.approx(0.5, abs=0.1)
    assert np.delete(figs.w1_norm, 1).max() < 0.15


def test_cost_is_bounded_and_deterministic(gait, gait_ref):
    x = gait[:400]
    cfg = DiversityConfig(max_pairs=1000, max_values=4096)
    a, b = sample_diversity(x, "float32", gait_ref, cfg), sample_diversity(x, "float32",
                                                                           gait_ref, cfg)
    assert a.pairs == 1000
    assert (a.duplicate_frac, a.diversity) == (b.duplicate_frac, b.diversity)
    assert np.array_equal(a.w1, b.w1)
    # W1 on 4096 // 64 = 64 evenly spaced samples of the 400
    rows = picked_windows(400, 64)
    w1 = ref_w1(x[rows, :, 0].astype(np.float64).ravel(), gait_ref.windows[:, :, 0].ravel())
    assert a.w1[0] == pytest.approx(w1, rel=1e-9)


def test_ranks_pool_and_non_finite_values_are_left_out(gait, gait_ref):
    x = gait[300:364].copy()
    pooled = sample_diversity([x[:32], x[32:]], "float32", gait_ref)
    whole = sample_diversity(x, "float32", gait_ref)
    assert pooled.duplicate_frac == whole.duplicate_frac
    assert np.array_equal(pooled.across_std, whole.across_std)
    x[5, 10, 2] = np.nan
    x[9, :, 4] = np.inf
    figs = sample_diversity(x, "float32", gait_ref)
    assert figs.pairs == 64 * 63 // 2 - (63 + 62)  # every pair with sample 5 or 9 dropped
    assert np.isfinite(figs.across_std).all() and np.isfinite(figs.w1).all()


def test_without_reference_the_samples_own_figures(gait):
    copies = sample_diversity(np.repeat(gait[7:8], 20, axis=0), "float32")
    healthy = sample_diversity(gait[::40][:50], "float32")
    assert copies.duplicate_frac == 1.0 and healthy.duplicate_frac < 0.05
    assert math.isnan(copies.diversity) and np.isnan(copies.w1_norm).all()
    assert set(copies.metrics(list(gd.CHANNELS))) == (
        {"validation/duplicate_frac"} | {f"validation/{c}_{k}" for c in gd.CHANNELS
                                         for k in ("std", "mean")})


def test_metrics_names_and_physical_units(gait, gait_ref):
    figs = sample_diversity(gait[400:464], "float32", gait_ref)
    scale, offset = np.arange(1.0, 9.0), np.full(8, 10.0)
    m = figs.metrics(list(gd.CHANNELS), scale, offset)
    assert m["validation/sample_diversity"] == figs.diversity
    assert m["validation/duplicate_frac"] == figs.duplicate_frac
    for c, name in enumerate(gd.CHANNELS):
        assert m[f"validation/{name}_w1"] == figs.w1_norm[c]
        assert m[f"validation/{name}_std"] == pytest.approx(scale[c] * figs.channel_std[c])
        assert m[f"validation/{name}_mean"] == pytest.approx(10 + scale[c] * figs.channel_mean[c])
    assert all(type(v) is float for v in m.values())
    with pytest.raises(ValueError, match="names for 8 channels"):
        figs.metrics(["a"])


def test_bad_input_is_a_clear_error(gait, gait_ref):
    with pytest.raises(ValueError, match="reference"):
        sample_diversity(gait[:4, :32], "float32", gait_ref)
    with pytest.raises(ValueError, match="declared float32"):
        sample_diversity(gait[:4].astype(np.float64), "float32", gait_ref)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        sample_diversity(np.zeros(5, np.float32), "float32")
    with pytest.raises(ValueError, match="fewer than 2 windows"):
        DataReference.build([gait[0]], "float32", WINDOW)
    with pytest.raises(ValueError, match="channel counts"):
        DataReference.build([gait[:8].reshape(-1, 8), np.zeros((64, 3), np.float32)],
                            "float32", WINDOW)
    with pytest.raises(ValueError, match="duplicate_rms"):
        DiversityConfig(duplicate_rms=0.0)
