"""A zoo's metadata: one row per checkpoint, stored column-wise as numpy arrays (no pandas needed).

Columns are typed on read (int, then float, else str). Splits are drawn **by run**, so the checkpoints of one
run never straddle two splits.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class Table:
    """Equal-length named columns; row ``i`` is one checkpoint."""

    columns: Mapping[str, np.ndarray]

    def __post_init__(self) -> None:
        lengths = {name: len(col) for name, col in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"columns of unequal length: {lengths}")

    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.columns[name]
        except KeyError:
            raise UsageError(f"no metadata column {name!r}; columns: {', '.join(self.columns)}") from None

    @property
    def names(self) -> list[str]:
        return list(self.columns)

    def take(self, index: np.ndarray | Sequence[int]) -> "Table":
        """The rows at ``index`` (a boolean mask or integer positions), in that order."""
        index = np.asarray(index)
        return Table({k: v[index] for k, v in self.columns.items()})

    def mask(self, **equals: object) -> np.ndarray:
        """Rows whose columns equal the given values (a list or tuple value means 'any of these')."""
        keep = np.ones(len(self), dtype=bool)
        for name, value in equals.items():
            col = self[name]
            values = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
            keep &= np.isin(col, np.asarray(list(values), dtype=col.dtype))
        return keep

    def rows(self) -> Iterator[dict[str, object]]:
        for i in range(len(self)):
            yield {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in self.columns.items()}

    @staticmethod
    def from_rows(rows: Sequence[Mapping[str, object]], order: Sequence[str] | None = None) -> "Table":
        """Column arrays from dict rows (every row must have the same keys)."""
        if not rows:
            return Table({name: np.zeros(0) for name in (order or [])})
        names = list(order or rows[0])
        for r in rows:
            if set(r) != set(names):
                raise ValueError(f"row keys differ: {sorted(set(r) ^ set(names))}")
        return Table({n: _typed([r[n] for r in rows]) for n in names})

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.names)
        cols = [self.columns[n] for n in self.names]
        for i in range(len(self)):
            w.writerow([_cell(c[i]) for c in cols])
        return buf.getvalue()

    @staticmethod
    def from_csv(text: str) -> "Table":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            raise ValueError("empty CSV (no header)")
        raw = list(reader)
        for line, r in enumerate(raw, start=2):
            if len(r) != len(header):
                raise ValueError(f"line {line} has {len(r)} fields, header has {len(header)}")
        return Table({n: _parse([r[j] for r in raw]) for j, n in enumerate(header)})


def _cell(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        return repr(float(v))  # round-trips exactly
    return str(v)


def _typed(values: list[object]) -> np.ndarray:
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, (int, float, np.integer, np.floating)) for v in values):
        return np.asarray(values, dtype=np.float64)
    return np.asarray([str(v) for v in values], dtype=object)


def _parse(cells: list[str]) -> np.ndarray:
    for kind in (int, float):
        try:
            return np.asarray([kind(c) for c in cells], dtype=np.int64 if kind is int else np.float64)
        except ValueError:
            continue
    return np.asarray(cells, dtype=object)


def split_by_run(run_ids: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Row masks, one per fraction: runs are shuffled with ``seed`` and cut by the fractions (which sum to 1)."""
    fr = np.asarray(fractions, dtype=float)
    if np.any(fr < 0) or not np.isclose(fr.sum(), 1.0):
        raise UsageError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    runs = np.unique(run_ids)
    runs = runs[np.random.default_rng(seed).permutation(len(runs))]
    cuts = np.round(np.cumsum(fr) * len(runs)).astype(int)
    parts = np.split(runs, cuts[:-1])
    return [np.isin(run_ids, part) for part in parts]
