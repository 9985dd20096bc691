"""Generated samples against the training data: the subsample the collector keeps of it,
and the figures of ``collector.analysis.diversity`` as validation metrics.

``log_data_stats`` ships the whole normalised training set in chunks (rows of C channels).
The collector keeps a bounded, deterministic subsample of it, whatever its size: blocks of
``block_rows`` consecutive rows at row offsets ``b * block_rows``, every ``stride``-th block,
the stride doubling whenever more than ``max_values`` raw values would be held (so the kept
blocks stay spread evenly over the data). The bound is ``max_values`` values of the data's
own dtype plus one block being filled: with the defaults (2**21 values, blocks of 4096
rows) 8 MiB of float32 per run, and the whole set for a gait dataset of 4096 windows of
64 x 8.

    keep = TrainingSubsample(block_rows=4096, max_values=2**21)
    keep.add(chunk, "float32")                 # each chunk, in order
    ref = keep.reference(64, 8, config)        # a DataReference of windows of 64 rows
    sample_metrics(validation, keep, consts, profile)   # validation/sample_diversity, ...

A reference window is ``T`` consecutive rows starting at a multiple of ``T`` (the samples'
length) inside a run of consecutive kept blocks: a training set shaped (N, T, C) then gives
whole training windows. When no two such windows exist (no data yet, other channels,
windows longer than what is kept) the samples' own figures are computed without one.
"""

from __future__ import annotations

import math

import numpy as np

from collector.analysis.diversity import DataReference, DiversityConfig, sample_diversity
from collector.analysis.inputs import DataConstants, ValidationInput
from collector.analysis.profile import Profile

__all__ = ["TrainingSubsample", "diversity_config", "physical_units", "sample_metrics"]


class TrainingSubsample:
    """Evenly spread blocks of the training rows, at most ``max_values`` raw values."""

    def __init__(self, block_rows: int, max_values: int) -> None:
        if block_rows < 1 or max_values < 1:
            raise ValueError("block_rows and max_values must be >= 1")
        self.block_rows, self.max_values = block_rows, max_values
        self.dtype: str | None = None
        self.channels = 0
        self.rows = 0  # rows seen, kept or not
        self.stride = 1
        self.max_blocks = 0
        self.blocks: dict[int, np.ndarray] = {}  # block index -> its rows (complete)
        self._filling: tuple[int, list[np.ndarray]] | None = None  # a kept block, partial
        self._refs: dict[tuple[int, int, int], DataReference | None] = {}

    @property
    def held_values(self) -> int:
        part = sum(p.size for p in self._filling[1]) if self._filling else 0
        return sum(b.size for b in self.blocks.values()) + part

    def add(self, chunk: np.ndarray, dtype: str) -> None:
        """The next chunk of raw rows (the last axis is the channels; 1-D: one channel).
        A chunk whose dtype or channel count differs from the first one's is left out."""
        rows = chunk.reshape(-1, chunk.shape[-1] if chunk.ndim > 1 else 1)
        if self.dtype is None:
            self.dtype, self.channels = dtype, rows.shape[1]
            self.block_rows = max(1, min(self.block_rows, self.max_values // self.channels))
            self.max_blocks = max(1, self.max_values // (self.block_rows * self.channels))
        if dtype != self.dtype or rows.shape[1] != self.channels or rows.shape[0] == 0:
            return
        self._refs.clear()
        at, size = 0, self.block_rows
        while at < rows.shape[0]:
            b, off = divmod(self.rows, size)
            take = min(size - off, rows.shape[0] - at)
            if b % self.stride == 0:
                if self._filling is None or self._filling[0] != b:
                    self._filling = (b, [])
                self._filling[1].append(rows[at:at + take].copy())  # not the message's buffer
                if off + take == size:
                    self._complete()
            at += take
            self.rows += take

    def _complete(self) -> None:
        assert self._filling is not None
        b, parts = self._filling
        self._filling = None
        if b % self.stride:
            return  # the stride grew while it filled
        self.blocks[b] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        while len(self.blocks) > self.max_blocks:
            self.stride *= 2
            self.blocks = {k: v for k, v in self.blocks.items() if k % self.stride == 0}

    def _runs(self) -> list[tuple[int, np.ndarray]]:
        """(first row, rows) of each run of consecutive kept blocks, the filling one too."""
        blocks = dict(self.blocks)
        if self._filling is not None and self._filling[0] % self.stride == 0:
            blocks[self._filling[0]] = np.concatenate(self._filling[1])
        out: list[tuple[int, list[np.ndarray]]] = []
        last = None
        for b in sorted(blocks):
            if last is not None and b == last + 1:
                out[-1][1].append(blocks[b])
            else:
                out.append((b * self.block_rows, [blocks[b]]))
            last = b
        return [(start, np.concatenate(parts)) for start, parts in out]

    def windows(self, window_len: int) -> list[np.ndarray]:
        """The kept whole windows of ``window_len`` rows (raw), in data order: ``T``
        consecutive rows starting at a multiple of ``T`` inside a run of kept blocks."""
        out = []
        for start, rows in self._runs():
            first = -(-start // window_len) * window_len - start  # next multiple of T
            for a in range(first, rows.shape[0] - window_len + 1, window_len):
                out.append(rows[a:a + window_len])
        return out

    def kept_rows(self, limit: int) -> np.ndarray:
        """At most ``limit`` of the kept rows (raw, ``[n, channels]``), evenly spaced."""
        runs = [rows for _, rows in self._runs()]
        if not runs:
            return np.zeros((0, self.channels))
        rows = np.concatenate(runs)
        if rows.shape[0] > limit:
            rows = rows[(np.arange(limit) * rows.shape[0]) // limit]
        return rows

    def reference(self, window_len: int, channels: int,
                  config: DiversityConfig) -> DataReference | None:
        """The training windows of ``window_len`` rows the samples are compared with, or
        None when fewer than two whole windows are kept (or the channels differ)."""
        if self.dtype is None or channels != self.channels or window_len < 1:
            return None
        key = (window_len, channels, self.rows)
        if key in self._refs:
            return self._refs[key]
        windows = self.windows(window_len)
        ref = None
        if len(windows) >= 2:
            flat = np.concatenate(windows)
            ref = DataReference.build([flat], self.dtype, window_len, config)
        self._refs = {key: ref}
        return ref


def diversity_config(profile: Profile) -> DiversityConfig:
    return DiversityConfig(max_windows=profile.max_windows, max_pairs=profile.max_pairs,
                           max_values=profile.max_values, duplicate_rms=profile.duplicate_rms)


def physical_units(consts: DataConstants | None,
                   names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (scale, offset) with physical = x * scale + offset; 1, 0 where unknown."""
    scale, offset = np.ones(len(names)), np.zeros(len(names))
    if consts is None or consts.mean is None or consts.std is None:
        return scale, offset
    for c, name in enumerate(names):
        if name in consts.channel_names:
            i = consts.channel_names.index(name)
            if i < len(consts.std) and i < len(consts.mean) and math.isfinite(
                    consts.std[i]) and math.isfinite(consts.mean[i]):
                scale[c], offset[c] = consts.std[i], consts.mean[i]
    return scale, offset


def sample_metrics(v: ValidationInput, data: TrainingSubsample | None,
                   consts: DataConstants | None, profile: Profile) -> dict[str, float]:
    """validation/sample_diversity, duplicate_frac, and per named channel <c>_w1, <c>_std,
    <c>_mean (std and mean physical with the run's constants). {} for samples with no
    sample axis (1-D), and figures without data are left out."""
    arrays = [a.reshape(a.shape[0], -1, a.shape[-1]) for a in v.samples if a.ndim >= 2]
    if not arrays:
        return {}
    steps, chans = arrays[0].shape[1], arrays[0].shape[2]
    arrays = [a for a in arrays if a.shape[1] == steps and a.shape[0] > 0]
    if not arrays:
        return {}
    config = diversity_config(profile)
    ref = data.reference(steps, chans, config) if data is not None else None
    figs = sample_diversity(arrays, v.dtype, ref, config)
    names = list(v.channel_names) if len(v.channel_names) == chans else [
        f"ch{i}" for i in range(chans)]
    scale, offset = physical_units(consts, names)
    out = figs.metrics(names, scale, offset)
    return {k: x for k, x in out.items() if math.isfinite(x)}
