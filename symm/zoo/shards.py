"""Weight shards: safetensors files holding ``[n_checkpoints, *shape]`` stacks per parameter name.

A shard is written whole to a hidden temporary file, flushed to disk and renamed into place, so a reader (or a
kill) never sees half a shard. Its safetensors header metadata carries the shard's own metadata rows (JSON),
so a shard is self-describing and one rename commits weights and rows together. Reads are memory-mapped.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..publish import fault_point

TMP_PREFIX = ".tmp-"
_DTYPES = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I64": np.int64, "I32": np.int32}


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: Mapping[str, tuple[np.dtype, tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    metadata: Mapping[str, str]
    data_start: int

    @property
    def rows(self) -> list[dict[str, object]]:
        try:
            return json.loads(self.metadata["rows"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"shard {self.path} has no readable metadata rows ({exc})") from None

    @property
    def n(self) -> int:
        shapes = {shape[0] for _, shape, _, _ in self.tensors.values()}
        return shapes.pop() if len(shapes) == 1 else 0


def write_shard(path: Path, weights: Mapping[str, torch.Tensor], rows: Sequence[Mapping[str, object]], extra: Mapping[str, str] | None = None) -> None:
    """Write ``weights`` (each ``[len(rows), *shape]``) and ``rows`` to ``path`` atomically (temp, fsync, rename)."""
    for name, w in weights.items():
        if w.shape[0] != len(rows):
            raise ValueError(f"shard {path.name}: {name} stacks {w.shape[0]} checkpoints, {len(rows)} rows given")
    tmp = path.parent / f"{TMP_PREFIX}{path.name}.{os.getpid()}"
    meta = {"rows": json.dumps(list(rows)), **(extra or {})}
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp), metadata=meta)
    fault_point("zoo-shard-written")
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_header(path: Path) -> ShardHeader:
    """Parse and check a shard's header: a missing, truncated or corrupt file raises an error naming it."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"shard {path} is truncated ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"shard {path} is truncated (header of {n} bytes, file of {size})")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"missing shard {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"shard {path} has a corrupt header ({exc})") from None
    meta = header.pop("__metadata__", {}) or {}
    tensors = {}
    end_max = 0
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"shard {path}: malformed entry for {name!r}") from None
        if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise CheckpointError(f"shard {path}: {name!r} has {end - begin} bytes for shape {shape}")
        tensors[name] = (np.dtype(dtype), shape, begin, end)
        end_max = max(end_max, end)
    if 8 + n + end_max > size:
        raise CheckpointError(f"shard {path} is truncated ({size} bytes, its header needs {8 + n + end_max})")
    return ShardHeader(path, tensors, meta, 8 + n)


def read_stacks(header: ShardHeader, names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Memory-mapped, read-only ``[n, *shape]`` arrays of a shard (nothing is read until indexed)."""
    out = {}
    for name in names or list(header.tensors):
        dtype, shape, begin, _ = header.tensors[name]
        if 0 in shape:
            out[name] = np.zeros(shape, dtype=dtype)
            continue
        out[name] = np.memmap(header.path, dtype=dtype, mode="r", offset=header.data_start + begin, shape=shape)
    return out
