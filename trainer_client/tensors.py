"""Tensors going to the wire: dtype names, raw bytes without a copy, channel layouts, data
sampled on the device, normalisation constants, config values msgpack can carry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from . import wire

__all__ = ["BadArgument", "BadDtype", "channel_axis", "constants", "data_chunks", "dtype_name",
           "plain", "raw", "sample_rows"]

DATA_SAMPLE_SEED = 0  # the same data gives the same sample on every run and rank


class BadArgument(ValueError):
    """A ``log_*`` argument the client refuses: raised to the caller, never swallowed."""


class BadDtype(TypeError):
    """A tensor of a dtype the wire does not carry: raised to the caller."""


def raw(host: torch.Tensor, name: str, dtype: str) -> wire.Tensor:
    """A host tensor's bytes without a copy (bfloat16 has no numpy type: view as bytes)."""
    data = host.contiguous().view(torch.uint8).numpy() if host.numel() else b""
    return wire.Tensor(name, dtype, tuple(host.shape), data)


def channel_axis(t: torch.Tensor, dim: Any, n_names: int | None, call: str, what: str) -> int:
    """``dim`` as a non-negative index into ``t`` whose size is ``n_names``, or a clear error."""
    if not isinstance(t, torch.Tensor):
        raise BadDtype(f"{call}: {what} must be a torch.Tensor, not {type(t).__name__}")
    if type(dim) is not int:
        raise BadArgument(f"{call}: channel_dim must be an int, got {dim!r}")
    if not -t.ndim <= dim < t.ndim:
        raise BadArgument(f"{call}: channel_dim {dim} is not a dim of {what} of shape "
                           f"{tuple(t.shape)}")
    dim %= t.ndim
    if n_names is not None and t.shape[dim] != n_names:
        raise BadArgument(f"{call}: {what} has {t.shape[dim]} channels along dim {dim} "
                           f"(shape {tuple(t.shape)}), but {n_names} channel names")
    return dim


def sample_rows(x: torch.Tensor, dim: int, max_rows: int | None) -> tuple[torch.Tensor, int]:
    """[rows, channels] with the channel dim last, and how many rows there were; at most
    ``max_rows`` of them, drawn uniformly on the device (no host read, no full copy)."""
    x = x.movedim(dim, -1)
    c = x.shape[-1]
    total = x.numel() // c if c else 0
    if max_rows is None or total <= max_rows:
        return x.reshape(-1, c), total
    g = torch.Generator(device=x.device)
    g.manual_seed(DATA_SAMPLE_SEED)
    idx = torch.randint(total, (max_rows,), generator=g, device=x.device).sort().values
    if x.is_contiguous():
        return x.reshape(-1, c).index_select(0, idx), total
    coords = []
    for size in reversed(x.shape[:-1]):  # the flat row index -> one index per leading dim
        coords.append(idx % size)
        idx = idx // size
    return x[tuple(reversed(coords))], total


def data_chunks(flat: torch.Tensor, total: int, names: list[str], dtype: str,
                consts: dict[str, bytes | None], chunk_bytes: int) -> list[tuple]:
    """``log_data_stats``' messages, one per chunk of ``flat`` (rows x channels) of about
    ``chunk_bytes``: (build, host copy, its event, bytes), each copy to host memory
    started; the first chunk's body says ``rows_total``/``rows_sent`` and carries
    ``consts``."""
    from .reductions import to_host

    rows = max(1, chunk_bytes // max(1, flat.shape[1] * flat.element_size()))
    chunks = list(torch.split(flat, rows)) or [flat]
    out = []
    for i, chunk in enumerate(chunks):
        host, event = to_host(chunk.contiguous())
        extra = consts if i == 0 else {}
        body: dict[str, Any] = {"index": i, "count": len(chunks), "channels": names}
        if i == 0:
            body.update(rows_total=total, rows_sent=flat.shape[0])

        def build(h: torch.Tensor, body: dict = body, extra: dict = extra) -> tuple:
            ts = [raw(h, "chunk", dtype)]
            ts += [wire.Tensor(k, "float64", (len(names),), v) for k, v in extra.items()
                   if v is not None]
            return body, ts

        out.append((build, host, event, host.numel() * host.element_size()))
    return out


def dtype_name(t: torch.Tensor) -> str:
    if not isinstance(t, torch.Tensor):
        raise BadDtype(f"trainwatch ships torch tensors, not {type(t).__name__}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in wire.FLOAT_DTYPES:
        raise BadDtype(f"trainwatch ships float16/bfloat16/float32/float64 tensors, "
                        f"not {t.dtype}")
    return name


def constants(v: Any, n: int, what: str) -> bytes | None:
    """Normalisation constants as float64 bytes (host values: they are set once, up front)."""
    if v is None:
        return None
    # float64 from the start: Python floats would otherwise pass through float32.
    t = torch.as_tensor(v, dtype=torch.float64).detach().to("cpu").reshape(-1)
    if t.numel() != n:
        raise BadArgument(f"log_data_stats: {what} has {t.numel()} values for {n} channels")
    return t.numpy().tobytes()


def plain(v: Any) -> Any:
    """A config value msgpack can carry: numbers, strings, bools, lists, dicts; else str()."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [plain(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, torch.Tensor) and v.numel() == 1 and v.device.type == "cpu":
        return v.item()
    return str(v)
