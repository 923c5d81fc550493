"""Read a W&B offline run file (``run-<id>.wandb``) without the network or W&B's service.

The file is W&B's record log (LevelDB's log format): a 7-byte header (``:W&B``, magic 0xBEE1,
version 0), then 32 KiB blocks of chunks, each ``crc32c (4) | length (2, LE) | type (1) | data``
(type 1 a whole record; 2, 3, 4 the first, middle and last piece of one). Each record is a
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK, HEADER, CHUNK_HEADER = 32 * 1024, 7, 7


def records(path: Path) -> list[Any]:
    """The protobuf records of an offline run file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + CHUNK_HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK_HEADER:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + CHUNK_HEADER])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        chunk = data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _items(items: Any) -> dict[str, Any]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in items}


def read_run(path: Path) -> dict[str, Any]:
    """``{"history": [{key: value, "_step": n}, ...], "config": {...}, "summary": {...}}``."""
    history, config, summary = [], {}, {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "run":
            config.update({k: v.get("value") if isinstance(v, dict) else v
                           for k, v in _items(record.run.config.update).items()})
    return {"history": history, "config": config, "summary": summary}
