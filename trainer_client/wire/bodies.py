"""Per-kind checks of a msgpack message's body and tensor specs: every field type-checked."""

from __future__ import annotations

from typing import Any

from trainer_client.wire.types import (
    DTYPES,
    EMA_FIELDS,
    FLOAT_DTYPES,
    KIND_BYE,
    KIND_CONFIG,
    KIND_DATA,
    KIND_EPOCH,
    KIND_HELLO,
    KIND_STEP,
    KIND_VALIDATION,
    MAX_DIMS,
    U63,
    WEIGHT_FIELDS,
    DecodeError,
    Tensor,
)

_NUM_TYPES = frozenset((int, float))
_MAX_EXTENT = 1 << 62


def tensors_of(specs: Any, frames: list, run: str) -> dict[str, Tensor]:
    if type(specs) is not list or len(specs) != len(frames) - 1:
        raise DecodeError("bad_tensors", "spec count != frame count", run)
    out: dict[str, Tensor] = {}
    for spec, data in zip(specs, frames[1:], strict=True):
        if type(spec) is not list or len(spec) != 3:
            raise DecodeError("bad_tensors", "spec shape", run)
        name, dtype, shape = spec
        if type(name) is not str or name in out or dtype not in DTYPES:
            raise DecodeError("bad_tensors", "name or dtype", run)
        if type(shape) is not list or len(shape) > MAX_DIMS:
            raise DecodeError("bad_tensors", "shape", run)
        n, extent = DTYPES[dtype], 1
        for d in shape:
            if type(d) is not int or d < 0:
                raise DecodeError("bad_tensors", "shape", run)
            n *= d  # Python ints: a huge declared shape cannot overflow, it just mismatches
            extent *= d or 1
        if n != len(data):
            raise DecodeError("size_mismatch", f"{name}: declared {n} bytes, frame {len(data)}",
                              run)
        if extent > _MAX_EXTENT:  # empty, yet no array can have that shape
            raise DecodeError("bad_tensors", f"{name}: shape beyond any array", run)
        out[name] = Tensor(name, dtype, tuple(shape), data)
    return out


def _str_list(v: Any) -> bool:
    return type(v) is list and all(type(s) is str for s in v)


def _map(body: Any, run: str) -> dict:
    if type(body) is not dict:
        raise DecodeError("bad_body", "expected a map", run)
    return body


def _check_hello(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    env = body.get("env", {})
    if type(env) is not dict or not all(type(v) is str for v in env.values()):
        raise DecodeError("bad_body", "hello env", run)
    return body


def _check_config(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    if type(body.get("config")) is not dict:
        raise DecodeError("bad_body", "config", run)
    if body.get("num_params") is not None and type(body["num_params"]) is not int:
        raise DecodeError("bad_body", "num_params", run)
    return body


def _check_data(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    index, count, channels = body.get("index"), body.get("count"), body.get("channels")
    if not (type(index) is int and type(count) is int and 0 <= index < count):
        raise DecodeError("bad_body", "data chunk index", run)
    if not _str_list(channels) or "chunk" not in tensors:
        raise DecodeError("bad_body", "data channels or chunk", run)
    if tensors["chunk"].dtype not in FLOAT_DTYPES:
        raise DecodeError("bad_tensors", "data chunk dtype", run)
    shape = tensors["chunk"].shape
    if not shape or shape[-1] != len(channels):
        raise DecodeError("size_mismatch", "data chunk's last dim != channels", run)
    # Optional (chunk 0): how many rows the data had, how many of them were sent.
    rows_total, rows_sent = body.get("rows_total"), body.get("rows_sent")
    if (rows_total is not None or rows_sent is not None) and not (
            type(rows_total) is int and type(rows_sent) is int
            and 0 <= rows_sent <= rows_total < U63):
        raise DecodeError("bad_body", "data rows_total/rows_sent", run)
    for const in ("mean", "std"):
        t = tensors.get(const)
        if t is not None and t.dtype != "float64":
            raise DecodeError("bad_tensors", f"data {const} must be float64", run)
        if t is not None and t.shape != (len(channels),):
            raise DecodeError("size_mismatch", f"data {const} shape", run)
    return body


# Step messages repeat the same component names: the last validated list is remembered.
_known_names: list = [[]]


def _check_step(body: Any, tensors: dict, run: str) -> list:
    """A msgpack step (recordings older than the binary layout): 4 fields, or 5 with lr."""
    if type(body) is not list or len(body) not in (4, 5):
        raise DecodeError("bad_body", "step", run)
    loss, grad_norm, names, values, *rest = body
    lr = rest[0] if rest else None
    if (type(loss) is not float and type(loss) is not int) or not (
            grad_norm is None or type(grad_norm) is float or type(grad_norm) is int) or not (
            lr is None or type(lr) is float or type(lr) is int):
        raise DecodeError("bad_body", "step loss, grad_norm or lr", run)
    if names != _known_names[0]:
        if not _str_list(names):
            raise DecodeError("bad_body", "step components", run)
        _known_names[0] = names
    if type(values) is not list or len(values) != len(names) or (
            values and not _NUM_TYPES.issuperset(map(type, values))):
        raise DecodeError("bad_body", "step component values", run)
    if tensors:
        pn = tensors.get("param_norms")
        if pn is None or len(tensors) != 1 or len(pn.shape) != 1 or pn.dtype != "float32":
            raise DecodeError("bad_tensors", "a step carries only 1-D float32 param_norms",
                              run)
    return body if rest else [*body, None]


def _check_epoch(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    for key, n in (("weights", len(WEIGHT_FIELDS)), ("ema", len(EMA_FIELDS))):
        v = body.get(key)
        if v is not None and not (type(v) is list and len(v) == n
                                  and _NUM_TYPES.issuperset(map(type, v))):
            raise DecodeError("bad_body", f"epoch {key}", run)
    names = body.get("param_names")
    if names is not None and not _str_list(names):
        raise DecodeError("bad_body", "epoch param_names", run)
    return body


def _check_validation(body: Any, tensors: dict, run: str) -> dict:
    body = _map(body, run)
    channels = body.get("channels")
    samples = tensors.get("samples")
    if samples is None or not samples.shape or samples.dtype not in FLOAT_DTYPES:
        raise DecodeError("bad_body", "validation samples", run)
    if "epoch" in body and (type(body["epoch"]) is not int or body["epoch"] < 0):
        raise DecodeError("bad_body", "validation epoch", run)
    if channels is not None and (not _str_list(channels) or len(channels) != samples.shape[-1]):
        raise DecodeError("size_mismatch", "validation channels != last dim", run)
    return body


def _check_bye(body: Any, tensors: dict, run: str) -> dict:
    return _map(body, run)


BODY_CHECKS = {
    KIND_HELLO: _check_hello,
    KIND_CONFIG: _check_config,
    KIND_DATA: _check_data,
    KIND_STEP: _check_step,
    KIND_EPOCH: _check_epoch,
    KIND_VALIDATION: _check_validation,
    KIND_BYE: _check_bye,
}
