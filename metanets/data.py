"""A zoo view as arrays for metanetworks: stacked weights, a target, hyperparameter features, by-run splits, minibatches.

A metanetwork maps a batch ``{"weights": {name: [B, *shape]}, "hparams": [B, F]}`` to ``[B]`` predictions. Rows are
the checkpoints of the view as given (``zoo.final()`` keeps the last checkpoint of each run); splits are drawn by run
(:meth:`symm.zoo.Zoo.split`), so the checkpoints of one run never straddle two splits.

Usage::

    parts = load_splits(symm.zoo.load(DIR).select(arch=...).final(), (0.8, 0.1, 0.1), seed=0)
    for batch in minibatches(parts["train"], 32, seed=epoch):
        ...  # batch["weights"], batch["hparams"], batch["target"], batch["mask"] (1 real row, 0 padding)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from symm.errors import UsageError
from symm.zoo import Table, Zoo

log = logging.getLogger(__name__)

#: hyperparameter columns used by default (those present in the zoo's table)
HPARAM_COLUMNS = ("optimizer", "learning_rate", "weight_decay", "init_scale", "dropout", "train_fraction", "label_noise",
                  "epochs", "activation")
SPLIT_NAMES = ("train", "val", "test")
Batch = dict[str, object]


@dataclass(frozen=True)
class HParamEncoder:
    """Categorical columns -> one-hot; numeric columns -> log(max(x, floor)) and, if a column has zeros, [x == 0]."""

    categories: Mapping[str, tuple[str, ...]]
    floors: Mapping[str, float]  # numeric column -> smallest positive value seen when fitting
    with_zero: tuple[str, ...]  # numeric columns that had zeros when fitting

    @staticmethod
    def fit(table: Table, columns: Sequence[str] | None = None) -> "HParamEncoder":
        """Categories and floors from ``table`` (default columns: those of :data:`HPARAM_COLUMNS` it has)."""
        columns = _columns(table, columns)
        categories, floors, with_zero = {}, {}, []
        for name in columns:
            col = table[name]
            if col.dtype == object:
                categories[name] = tuple(sorted({str(v) for v in col}))
                continue
            x = np.asarray(col, dtype=np.float64)
            if np.any(x < 0) or not np.all(np.isfinite(x)):
                raise UsageError(f"hyperparameter column {name!r} has negative or non-finite values: cannot take its log")
            positive = x[x > 0]
            floors[name] = float(positive.min()) if len(positive) else 1.0
            if np.any(x == 0):
                with_zero.append(name)
        return HParamEncoder(categories, floors, tuple(with_zero))

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names, e.g. ``optimizer=adam``, ``log learning_rate``, ``weight_decay==0``."""
        out = [f"{c}={v}" for c, values in self.categories.items() for v in values]
        out += [f"log {c}" for c in self.floors] + [f"{c}==0" for c in self.with_zero]
        return tuple(out)

    def __call__(self, table: Table) -> np.ndarray:
        """``[len(table), len(self.names)]`` float32 features."""
        parts = []
        for name, values in self.categories.items():
            col = np.asarray([str(v) for v in table[name]], dtype=object)
            unknown = sorted(set(col) - set(values))
            if unknown:
                log.warning("hyperparameter %s: values %s were not seen when fitting; encoded as all zeros", name, unknown)
            parts.append(col[:, None] == np.asarray(values, dtype=object)[None, :])
        for name, floor in self.floors.items():
            parts.append(np.log(np.maximum(np.asarray(table[name], dtype=np.float64), floor))[:, None])
        parts += [(np.asarray(table[name], dtype=np.float64) == 0)[:, None] for name in self.with_zero]
        if not parts:
            return np.zeros((len(table), 0), dtype=np.float32)
        return np.concatenate([p.astype(np.float64) for p in parts], axis=1).astype(np.float32)


def _columns(table: Table, columns: Sequence[str] | None) -> tuple[str, ...]:
    if columns is not None:
        missing = [c for c in columns if c not in table.names]
        if missing:
            raise UsageError(f"hyperparameter columns {missing} are not in the zoo's table (columns: {', '.join(table.names)})")
        return tuple(columns)
    absent = [c for c in HPARAM_COLUMNS if c not in table.names]
    if absent:
        log.info("hyperparameter columns %s are absent from this zoo; not used", absent)
    return tuple(c for c in HPARAM_COLUMNS if c in table.names)


@dataclass(frozen=True)
class ZooData:
    """Rows of a zoo view as arrays: ``weights[name]`` is ``[n, *shape]`` float32, ``target`` and ``hparams`` likewise."""

    weights: Mapping[str, np.ndarray]
    target: np.ndarray  # [n]
    hparams: np.ndarray  # [n, F]
    hparam_names: tuple[str, ...]
    run_id: np.ndarray  # [n]
    arch: np.ndarray  # [n] architecture id of each row
    architectures: Mapping[str, object] = field(repr=False)  # arch id -> reference-model config

    def __len__(self) -> int:
        return len(self.target)

    @property
    def shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Parameter names (sorted) and per-network shapes."""
        return tuple((k, tuple(self.weights[k].shape[1:])) for k in sorted(self.weights))

    def take(self, index: np.ndarray | Sequence[int]) -> "ZooData":
        """The rows at ``index`` (integer positions or a boolean mask)."""
        i = np.asarray(index)
        return ZooData({k: v[i] for k, v in self.weights.items()}, self.target[i], self.hparams[i], self.hparam_names,
                       self.run_id[i], self.arch[i], self.architectures)

    def with_weights(self, weights: Mapping[str, np.ndarray]) -> "ZooData":
        """The same rows with other weights of the same names and shapes (e.g. transformed networks)."""
        if {k: np.shape(v) for k, v in weights.items()} != {k: v.shape for k, v in self.weights.items()}:
            raise UsageError("replacement weights must have the same names and shapes as the data's weights")
        return ZooData({k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}, self.target, self.hparams,
                       self.hparam_names, self.run_id, self.arch, self.architectures)

    def batch(self, index: np.ndarray | None = None) -> Batch:
        """``{"weights", "hparams", "target", "mask"}`` numpy arrays of the rows at ``index`` (all rows by default)."""
        data = self if index is None else self.take(index)
        return {"weights": dict(data.weights), "hparams": data.hparams, "target": data.target,
                "mask": np.ones(len(data), dtype=np.float32)}


def finite_rows(zoo: Zoo, target: str = "test_accuracy") -> Zoo:
    """The rows whose weights are finite (column ``finite``, if present) and whose target is finite; warns on drops."""
    keep = np.isfinite(np.asarray(zoo.table[target], dtype=np.float64))
    if "finite" in zoo.table.names:
        keep &= np.asarray(zoo.table["finite"]).astype(bool)
    if not keep.all():
        log.warning("dropping %d of %d rows with non-finite weights or %s", int((~keep).sum()), len(keep), target)
    return zoo.take(np.flatnonzero(keep))


def from_zoo(zoo: Zoo, encoder: HParamEncoder | None = None, target: str = "test_accuracy") -> ZooData:
    """A zoo view (one architecture, or several of identical parameter shapes) as :class:`ZooData`; non-finite rows dropped."""
    zoo = finite_rows(zoo, target)
    if len(zoo) == 0:
        raise UsageError("the zoo view has no rows with finite weights and target")
    encoder = encoder or HParamEncoder.fit(zoo.table)
    weights = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in zoo.weights().items()}  # raises on mixed shapes
    bad = np.zeros(len(zoo), dtype=bool)
    for v in weights.values():
        bad |= ~np.isfinite(v.reshape(len(zoo), -1)).all(axis=1)
    arch = np.asarray([str(a) for a in zoo.table["arch"]], dtype=object)
    data = ZooData(weights, np.asarray(zoo.table[target], dtype=np.float32), encoder(zoo.table), encoder.names,
                   np.asarray(zoo.table["run_id"]), arch, {a: zoo.architectures[a] for a in sorted(set(arch))})
    if bad.any():
        log.warning("dropping %d rows whose weights are not finite (though the table says they are)", int(bad.sum()))
        data = data.take(np.flatnonzero(~bad))
    return data


def load_splits(zoo: Zoo, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, *,
                names: Sequence[str] = SPLIT_NAMES, target: str = "test_accuracy",
                columns: Sequence[str] | None = None) -> dict[str, ZooData]:
    """Seeded by-run split of a zoo view (``Zoo.split``); hyperparameter encoding fitted on the whole (finite) view."""
    if len(names) != len(fractions):
        raise UsageError(f"{len(names)} split names {list(names)} for {len(fractions)} fractions")
    zoo = finite_rows(zoo, target)
    if len(zoo) == 0:
        raise UsageError("the zoo view has no rows with finite weights and target")
    encoder = HParamEncoder.fit(zoo.table, columns)
    out = {}
    for name, part in zip(names, zoo.split(fractions, seed)):
        if len(part) == 0:
            raise UsageError(f"split {name!r} is empty ({len(np.unique(zoo.table['run_id']))} runs, fractions {list(fractions)})")
        out[name] = from_zoo(part, encoder, target)
    return out


def minibatches(data: ZooData, batch_size: int, *, seed: int | None = None, multiple: int = 1) -> Iterator[Batch]:
    """Batches of ``batch_size`` rows (shuffled with ``seed``; in order if None); the last is padded with ``mask`` 0.

    Every batch has exactly ``batch_size`` rows (one compiled shape); ``batch_size`` must be a multiple of
    ``multiple`` (the number of devices the batch is sharded over). Padding repeats row 0 of the data."""
    if batch_size < 1 or batch_size % multiple:
        raise UsageError(f"batch size {batch_size} must be a positive multiple of {multiple} (the number of devices)")
    if len(data) == 0:
        raise UsageError("cannot draw minibatches from empty data")
    order = np.arange(len(data)) if seed is None else np.random.default_rng(seed).permutation(len(data))
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        n_pad = batch_size - len(index)
        batch = data.batch(np.concatenate([index, np.zeros(n_pad, dtype=index.dtype)]))
        batch["mask"] = np.concatenate([np.ones(len(index)), np.zeros(n_pad)]).astype(np.float32)
        yield batch
