"""Read an offline wandb run back from its files, to show what the wandb sink wrote.

wandb 0.31 ships no Python reader for its transaction log (the ``.wandb`` file; the
``datastore`` module of older versions is gone, and ``wandb leet inspect --json`` needs the
``wandb-core`` binary), so this module reads the format itself: a 7-byte file header, then
32 KiB blocks of LevelDB-log chunks, each chunk a CRC-32, a length and a type, whose
payloads join into serialised ``wandb_internal_pb2.Record`` protobufs.

    from support.wandb_readback import find_offline_runs, read_offline_run
    for run_dir in find_offline_runs("out/wandb"):
        run = read_offline_run(run_dir)
        print(run["run_id"], len(run["history"]), run["summary"].get("train/total_loss"))
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["find_offline_runs", "iter_records", "read_offline_run"]

_FILE_HEADER = struct.Struct("<4sHB")  # ident, magic, version
_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_CHUNK_HEADER = struct.Struct("<IHB")  # crc32 of (type byte + payload), payload length, type
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}


def _payloads(data: bytes) -> Iterator[bytes]:
    """Yield each whole record payload; a torn tail (a run still writing, a crash) ends it."""
    if len(data) < _FILE_HEADER.size:
        return
    ident, magic, version = _FILE_HEADER.unpack_from(data)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC or version != 0:
        raise ValueError(f"not a wandb transaction log (header {data[:7]!r})")
    pos, parts = _FILE_HEADER.size, []
    while True:
        # A chunk header never straddles a block: the writer pads the block's tail instead.
        if _BLOCK_LEN - pos % _BLOCK_LEN < _CHUNK_HEADER.size:
            pos += _BLOCK_LEN - pos % _BLOCK_LEN
        if pos + _CHUNK_HEADER.size > len(data):
            return
        crc, length, kind = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        if start + length > len(data):
            return
        if kind == 0 and crc == 0 and length == 0:  # zero fill of a preallocated tail
            return
        payload = data[start:start + length]
        if kind not in _TYPE_CRC or zlib.crc32(payload, _TYPE_CRC[kind]) != crc:
            raise ValueError(f"corrupt chunk at byte {pos} (type {kind})")
        pos = start + length
        if kind == _FULL:
            yield payload
        elif kind == _FIRST:
            parts = [payload]
        elif kind == _MIDDLE:
            parts.append(payload)
        else:
            parts.append(payload)
            yield b"".join(parts)
            parts = []


def iter_records(wandb_file: str | Path) -> Iterator[Any]:
    """Yield the ``wandb_internal_pb2.Record`` messages of one ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    for payload in _payloads(Path(wandb_file).read_bytes()):
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def find_offline_runs(wandb_dir: str | Path) -> list[Path]:
    """Offline run directories under ``wandb_dir`` (the sink's ``dir`` or its ``wandb/``).

    Sorted by directory name, which starts with the run's start time.
    """
    root = Path(wandb_dir)
    found = {p.parent for base in (root, root / "wandb")
             for p in base.glob("offline-run-*/run-*.wandb")}
    return sorted(found, key=lambda p: p.name)


def read_offline_run(run_dir: str | Path, wait_s: float = 5.0) -> dict[str, Any]:
    """Everything one offline run recorded, as plain Python values.

    ``wait_s`` bounds the wait for the run's exit record: wandb 0.31's ``finish()`` can
    return before wandb-core has flushed the file (it may hold only its header for a few
    hundred milliseconds). A run that never finished is read as far as it got.

    Returns ``{"run_id", "name", "project", "entity", "group", "sweep_id", "tags",
    "config", "history", "summary", "metrics", "tables", "alerts", "exit_code"}``:
    ``history`` holds one dict per ``log`` call (nested keys rebuilt as dicts), ``metrics``
    maps each defined metric or glob to ``{"step_metric", "summary"}``, and ``tables`` holds
    every logged table file as ``{"key", "step", "epoch", "path", "columns", "data"}``.
    """
    run_dir = Path(run_dir)
    files = sorted(run_dir.glob("run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one run-*.wandb file in {run_dir}, found {len(files)}")
    out: dict[str, Any] = {
        "run_id": None, "name": None, "project": None, "entity": None, "group": None,
        "sweep_id": None, "tags": [], "config": {}, "history": [], "summary": {},
        "metrics": {}, "tables": [], "alerts": [], "exit_code": None,
    }
    deadline = time.monotonic() + wait_s
    records = list(iter_records(files[0]))
    while (not any(r.WhichOneof("record_type") == "exit" for r in records)
           and time.monotonic() < deadline):
        time.sleep(0.05)
        records = list(iter_records(files[0]))
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            _read_run(record.run, out)
        elif kind == "config":
            _apply(out["config"], record.config.update, record.config.remove)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, _path(item), _history_value(item))
            out["history"].append(row)
        elif kind == "summary":
            _apply(out["summary"], record.summary.update, record.summary.remove)
        elif kind == "metric":
            m = record.metric
            name = m.name or m.glob_name
            aggs = [f.name for f, on in m.summary.ListFields() if on is True]
            out["metrics"][name] = {"step_metric": m.step_metric or None, "summary": aggs}
        elif kind == "alert":
            out["alerts"].append({"title": record.alert.title, "text": record.alert.text,
                                  "level": record.alert.level})
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["config"].pop("_wandb", None)
    out["summary"].pop("_wandb", None)
    out["tables"] = _tables(run_dir, out["history"], out["summary"])
    return out


def _read_run(run: Any, out: dict[str, Any]) -> None:
    out.update(run_id=run.run_id, name=run.display_name or None, project=run.project or None,
               entity=run.entity or None, group=run.run_group or None,
               sweep_id=run.sweep_id or None, tags=list(run.tags))
    _apply(out["config"], run.config.update, run.config.remove)
    _apply(out["summary"], run.summary.update, run.summary.remove)


def _path(item: Any) -> list[str]:
    return list(item.nested_key) if item.nested_key else [item.key]


def _put(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        nxt = target.get(key)
        if not isinstance(nxt, dict):
            nxt = target[key] = {}
        target = nxt
    target[path[-1]] = value


def _apply(target: dict[str, Any], update: Any, remove: Any) -> None:
    for item in update:
        _put(target, _path(item), json.loads(item.value_json))
    for item in remove:
        path, node = _path(item), target
        for key in path[:-1]:
            node = node.get(key, {})
        if isinstance(node, dict):
            node.pop(path[-1], None)


def _history_value(item: Any) -> Any:
    """A history value in either of wandb's encodings (``x_history_value_encoding``)."""
    if item.value_json:
        return json.loads(item.value_json)  # NaN/Infinity are written as JSON extensions
    which = item.WhichOneof("value")
    if which in (None, "none"):
        return None
    if which == "json":
        return json.loads(item.json)
    return getattr(item, which)


def _tables(run_dir: Path, history: list[dict], summary: dict) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    sources = [(row, row.get("_step"), row.get("epoch")) for row in history]
    sources.append((summary, None, summary.get("epoch")))
    for values, step, epoch in sources:
        for key, value in values.items():
            if not (isinstance(value, dict) and value.get("_type") == "table-file"):
                continue
            path = value.get("path", "")
            if path in seen:
                continue
            seen.add(path)
            content = json.loads((run_dir / "files" / path).read_text())
            found.append({"key": key, "step": step, "epoch": epoch, "path": path,
                          "columns": content.get("columns", []),
                          "data": content.get("data", [])})
    return found
