"""Read and index a zoo folder in our format (see ``manifest.py`` for the layout).

```
DIR/manifest.json                      format version, architectures, dataset, search space
DIR/metadata.csv                       one row per checkpoint (an index rebuilt from the shards)
DIR/shards/<arch>/<runs>.safetensors   [n_checkpoints, *shape] per parameter; header metadata = its rows
```

The shards are the truth: ``metadata.csv`` is rewritten after every committed shard, and a reader that finds a
shard the index does not list (a kill between the two renames) rebuilds the index from the shard headers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .manifest import METADATA, SHARDS, config_from_json, read_manifest, write_atomic
from .shards import TMP_PREFIX, ShardHeader, read_header, read_stacks
from .table import Table
from .zoo import Zoo

log = logging.getLogger(__name__)


def shard_paths(folder: Path) -> list[Path]:
    """Committed shards (temporary files of killed writers are not shards)."""
    root = folder / SHARDS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("*/*.safetensors") if not p.name.startswith(TMP_PREFIX))


def table_from_headers(folder: Path, headers: Sequence[ShardHeader]) -> Table:
    """The metadata table of the given shards, rows sorted by run then epoch, with ``shard`` and ``index``."""
    rows = []
    for h in headers:
        shard_rows = h.rows
        if h.n != len(shard_rows):
            raise CheckpointError(f"shard {h.path} stacks {h.n} checkpoints but lists {len(shard_rows)} rows")
        rel = str(h.path.relative_to(folder))
        rows += [{**r, "shard": rel, "index": i} for i, r in enumerate(shard_rows)]
    rows.sort(key=lambda r: (r["run_id"], r["epoch"]))
    return Table.from_rows(rows)


def load(folder: str | Path, *, check: bool = True) -> Zoo:
    """Open a zoo folder: manifest checked, every shard's header checked (missing/truncated files are named)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    architectures = {k: config_from_json(v) for k, v in manifest["architectures"].items()}
    present = shard_paths(folder)
    headers = {p: read_header(p) for p in present} if check else {}
    table = _index(folder, present, headers)
    listed = set(table["shard"]) if len(table) else set()
    for rel in listed:
        if not (folder / rel).is_file():
            raise CheckpointError(f"missing shard {folder / rel} (listed in {folder / METADATA})")
    unknown = set(table["arch"]) - set(architectures) if len(table) else set()
    if unknown:
        raise CheckpointError(f"{folder / METADATA} names architectures missing from the manifest: {sorted(unknown)}")
    reader = _ShardReader(folder, table["shard"] if len(table) else np.zeros(0, object), table["index"] if len(table) else np.zeros(0, int))
    return Zoo(architectures, table, reader, np.arange(len(table)), manifest)


def _index(folder: Path, present: list[Path], headers: dict[Path, ShardHeader]) -> Table:
    path = folder / METADATA
    if path.is_file():
        try:
            table = Table.from_csv(path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            log.warning("%s is unreadable (%s); rebuilding it from the shard headers", path, exc)
        else:
            listed = set(table["shard"]) if len(table) and "shard" in table.columns else set()
            on_disk = {str(p.relative_to(folder)) for p in present}
            for rel in sorted(listed - on_disk):
                raise CheckpointError(f"missing shard {folder / rel} (listed in {path})")
            if listed == on_disk:
                return table
            log.warning("%s does not list every committed shard; rebuilding the index from the shard headers", path)
    if not present:
        return Table.from_rows([])
    return table_from_headers(folder, [headers.get(p) or read_header(p) for p in present])


def rebuild_index(folder: Path) -> Table:
    """Rewrite ``metadata.csv`` from the committed shards (atomically)."""
    table = table_from_headers(folder, [read_header(p) for p in shard_paths(folder)])
    write_atomic(folder / METADATA, table.to_csv())
    return table


class _ShardReader:
    """Gathers rows from memory-mapped shards, in the order asked."""

    def __init__(self, folder: Path, shard: np.ndarray, index: np.ndarray) -> None:
        self.folder, self.shard, self.index = folder, shard, index.astype(np.int64)

    @lru_cache(maxsize=None)
    def _stacks(self, rel: str) -> dict[str, np.ndarray]:
        return read_stacks(read_header(self.folder / rel))

    def __call__(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        if len(positions) == 0:
            raise CheckpointError("no rows selected")
        shards = self.shard[positions]
        out: dict[str, np.ndarray] | None = None
        for rel in dict.fromkeys(shards):
            where = np.nonzero(shards == rel)[0]
            stacks = self._stacks(rel)
            if out is None:
                out = {k: np.empty((len(positions), *v.shape[1:]), dtype=v.dtype) for k, v in stacks.items()}
            if set(stacks) != set(out):
                raise CheckpointError(f"shard {self.folder / rel} holds parameters {sorted(stacks)}, expected {sorted(out)}")
            rows = self.index[positions[where]]
            for k, v in stacks.items():
                out[k][where] = v[rows]
        return {k: torch.from_numpy(v) for k, v in out.items()}
