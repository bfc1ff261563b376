"""Load the published Small CNN Zoo (Unterthiner et al. 2020) onto :class:`~symm.models.SmallCNNConfig`.

One folder per dataset holds ``weights.npy`` (rows x 4970, one flattened TensorFlow checkpoint per row),
``layout.csv`` (``varname,start_idx,end_idx,size,shape``: half-open slices of a row, TF shapes as tuple literals) and
``metrics.csv.gz`` (one row per weights row: an unnamed row-index column, ``config.*`` hyperparameters, ``step``,
test/train accuracy and loss). Weights stay memory-mapped; rows are converted on read: conv kernels (H, W, in, out)
-> torch (out, in, H, W), the dense kernel (in, out) -> (out, in), biases as they are, all cast to float32.

Runs are not numbered in the files: a run is a maximal block of consecutive rows with the same ``config.*`` values
in which no ``step`` repeats (each run stores its 9 checkpoints together, in the string order 0, 1, 2, 20, 3, 40, 60,
80, 86; ``config.random_seed`` is 0 in every row of the published extract we checked, so it does not identify a
run). Missing rows are whole runs; a run with fewer checkpoints is kept and reported in a warning.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, UsageError
from ..models.small_cnn import SmallCNNConfig
from .table import Table
from .zoo import Zoo

log = logging.getLogger(__name__)

WEIGHTS, LAYOUT, METRICS = "weights.npy", "layout.csv", "metrics.csv.gz"
LAYOUT_COLUMNS = ("varname", "start_idx", "end_idx", "size", "shape")
ACTIVATIONS = ("relu", "tanh")
METRIC_COLUMNS = ("test_accuracy", "test_loss", "train_accuracy", "train_loss")
REQUIRED_COLUMNS = ("config.activation", "step", *METRIC_COLUMNS)
#: dataset name (``config.dataset``, or the folder name) -> image side
IMAGE_SIZES = {"mnist": 28, "fashion_mnist": 28, "cifar10": 32, "svhn_cropped": 32, "svhn": 32}
CHUNK_ROWS = 8192


@dataclass(frozen=True)
class Slot:
    """One TF variable of a row: ``row[start:end]`` reshaped to ``tf_shape`` is the state-dict entry ``param``."""

    varname: str
    param: str
    start: int
    end: int
    tf_shape: tuple[int, ...]


# ---- layout and axis conversion ---------------------------------------------------------------------------
def tf_variables(config: SmallCNNConfig = SmallCNNConfig()) -> dict[str, tuple[str, tuple[int, ...]]]:
    """TF variable name -> (state-dict name, TF shape) of the Keras ``sequential`` model of ``config``."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    c = config.in_channels
    for i in range(config.n_layers):
        scope = "sequential/conv2d" + (f"_{i}" if i else "")
        out[f"{scope}/kernel:0"] = (f"convs.{i}.weight", (3, 3, c, config.width))
        out[f"{scope}/bias:0"] = (f"convs.{i}.bias", (config.width,))
        c = config.width
    out["sequential/dense/kernel:0"] = ("head.weight", (c, config.n_classes))
    out["sequential/dense/bias:0"] = ("head.bias", (config.n_classes,))
    return out


def standard_layout(config: SmallCNNConfig = SmallCNNConfig()) -> list[Slot]:
    """The published layout: variables sorted by name (biases first), packed contiguously."""
    slots, start = [], 0
    for varname, (param, shape) in sorted(tf_variables(config).items()):
        size = int(np.prod(shape))
        slots.append(Slot(varname, param, start, start + size, shape))
        start += size
    return slots


def tf_to_torch(value: np.ndarray) -> np.ndarray:
    """Stacked TF values ``[n, *tf_shape]`` -> torch layout: HWIO -> OIHW, (in, out) -> (out, in), 1-D unchanged."""
    if value.ndim == 5:
        return value.transpose(0, 4, 3, 1, 2)
    if value.ndim == 3:
        return value.transpose(0, 2, 1)
    return value


def torch_to_tf(value: np.ndarray) -> np.ndarray:
    """The inverse of :func:`tf_to_torch`: OIHW -> HWIO, (out, in) -> (in, out)."""
    if value.ndim == 5:
        return value.transpose(0, 3, 4, 2, 1)
    if value.ndim == 3:
        return value.transpose(0, 2, 1)
    return value


def to_published_row(state_dict: dict[str, torch.Tensor], layout: Sequence[Slot] | None = None) -> np.ndarray:
    """One float32 row of ``weights.npy`` from a SmallCNN state dict (the writer side of the conversion)."""
    layout = list(layout or standard_layout())
    row = np.zeros(max(s.end for s in layout), dtype=np.float32)
    for s in layout:
        value = state_dict[s.param].detach().cpu().numpy()[None]
        row[s.start : s.end] = torch_to_tf(value).reshape(-1)
    return row


# ---- reading and validating the three files ---------------------------------------------------------------
def _layout_slot(path: Path, line: int, cells: dict[str, str], expected: dict[str, tuple[str, tuple[int, ...]]]) -> Slot:
    """One line of ``layout.csv``, checked: a known variable, its expected TF shape, a slice of its size."""
    try:
        start, end, size = (int(cells[k]) for k in ("start_idx", "end_idx", "size"))
        shape = ast.literal_eval(cells["shape"])
        shape = (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)
    except (ValueError, TypeError, SyntaxError) as exc:
        raise CheckpointError(f"{path} line {line}: cannot parse {cells} ({exc})") from None
    varname = cells["varname"]
    if varname not in expected:
        raise CheckpointError(f"{path} line {line}: unknown variable {varname!r} (expected {', '.join(sorted(expected))})")
    param, want = expected[varname]
    if shape != want:
        raise CheckpointError(f"{path} line {line}: {varname} has shape {shape}, expected {want}")
    if end - start != size or size != int(np.prod(shape)):
        raise CheckpointError(f"{path} line {line}: {varname} slice [{start}, {end}) of size {size} cannot hold shape {shape}")
    return Slot(varname, param, start, end, shape)


def read_layout(path: Path, config: SmallCNNConfig = SmallCNNConfig()) -> list[Slot]:
    """Parse ``layout.csv`` and check every variable name, shape and size against ``config``'s TF variables."""
    rows = [r for r in csv.reader(io.StringIO(_read_text(path))) if r]
    header = list(LAYOUT_COLUMNS)
    if rows and "varname" in rows[0]:
        header, rows, first = rows[0], rows[1:], 2
    else:
        first = 1
    missing = [c for c in LAYOUT_COLUMNS if c not in header]
    if missing:
        raise CheckpointError(f"{path}: header {header} lacks columns {missing} (expected {','.join(LAYOUT_COLUMNS)})")
    expected = tf_variables(config)
    slots: dict[str, Slot] = {}
    for line, r in enumerate(rows, start=first):
        if len(r) != len(header):
            raise CheckpointError(f"{path} line {line}: {len(r)} fields, header has {len(header)}")
        slot = _layout_slot(path, line, dict(zip(header, r)), expected)
        if slot.varname in slots:
            raise CheckpointError(f"{path} line {line}: {slot.varname} is listed twice")
        slots[slot.varname] = slot
    absent = sorted(set(expected) - set(slots))
    if absent:
        raise CheckpointError(f"{path}: missing variables {absent}")
    return sorted(slots.values(), key=lambda s: s.start)


def check_layout_width(slots: Sequence[Slot], width: int, layout_path: Path, weights_path: Path) -> None:
    """The slices tile ``[0, width)`` exactly, ``width`` being the number of columns of ``weights.npy``."""
    for s in slots:
        if s.start < 0 or s.end > width:
            raise CheckpointError(
                f"{layout_path}: {s.varname} slice [{s.start}, {s.end}) does not fit the {width} columns of {weights_path}"
            )
    covered = 0
    for s in slots:
        if s.start != covered:
            raise CheckpointError(f"{layout_path}: {s.varname} starts at {s.start}, expected {covered} (slices must tile a row)")
        covered = s.end
    if covered != width:
        raise CheckpointError(f"{layout_path} describes rows of {covered} values but {weights_path} has {width} columns")


def open_weights(path: Path) -> np.ndarray:
    """``weights.npy`` memory-mapped read-only: a 2-D float array (a truncated or corrupt file is named)."""
    try:
        weights = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (ValueError, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable .npy array (truncated or corrupt?): {exc}") from None
    if weights.ndim != 2 or weights.dtype.kind != "f":
        raise CheckpointError(f"{path} holds a {weights.dtype} array of shape {weights.shape}; expected 2-D float (rows, 4970)")
    return weights


def _read_text(path: Path, opener=open) -> str:
    try:
        with opener(path, "rt", newline="") as f:
            return f.read()
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable (truncated or corrupt?): {exc}") from None


def read_metrics(path: Path) -> Table:
    """``metrics.csv.gz`` as typed columns (the unnamed row-index column dropped), required columns checked."""
    text = _read_text(path, gzip.open)
    try:
        raw = Table.from_csv(text)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.columns]
    if missing:
        raise CheckpointError(f"{path} lacks columns {missing} (has {', '.join(raw.names)})")
    return Table({k: v for k, v in raw.columns.items() if k and not k.startswith("Unnamed:")})


def _check_metrics(metrics: Table, path: Path) -> None:
    acts = set(np.unique(metrics["config.activation"]).tolist()) if len(metrics) else set()
    if acts - set(ACTIVATIONS):
        raise CheckpointError(f"{path}: unknown config.activation values {sorted(acts - set(ACTIVATIONS))} (expected relu or tanh)")
    if metrics["step"].dtype.kind != "i":
        raise CheckpointError(f"{path}: column step must hold integer epochs, got {metrics['step'].dtype} values")


# ---- rows -> runs, columns, architectures -----------------------------------------------------------------
def _differs_from_previous(col: np.ndarray) -> np.ndarray:
    """``col[i] != col[i - 1]`` for i >= 1, NaN equal to NaN."""
    differ = np.asarray(col[1:] != col[:-1], dtype=bool)
    if col.dtype.kind == "f":
        differ &= ~(np.isnan(col[1:]) & np.isnan(col[:-1]))
    return differ


def group_runs(keys: Sequence[np.ndarray], steps: np.ndarray) -> np.ndarray:
    """Run id per row: a new run starts when any key column changes or a step repeats within the current run."""
    n = len(steps)
    changed = np.zeros(n, dtype=bool)
    if n:
        changed[0] = True
    for col in keys:
        changed[1:] |= _differs_from_previous(np.asarray(col))
    new = changed.copy()
    seen: set[int] = set()
    for i, (start, step) in enumerate(zip(changed.tolist(), steps.tolist())):
        if start or step in seen:
            new[i], seen = True, set()
        seen.add(step)
    return np.cumsum(new) - 1


def _warn_irregular_runs(run_id: np.ndarray, path: Path) -> None:
    counts = np.bincount(run_id)
    if not len(counts):
        return
    modal = int(np.bincount(counts).argmax())
    odd = np.nonzero(counts != modal)[0]
    if len(odd):
        log.warning("%s: %d of %d runs do not have %d checkpoints (e.g. runs %s with %s)", path, len(odd), len(counts), modal,
                    odd[:5].tolist(), counts[odd[:5]].tolist())


def dataset_name(metrics: Table, folder: Path, dataset: str | None) -> str:
    """``dataset`` if given, else the one ``config.dataset`` value, else the folder's name."""
    if dataset is None and "config.dataset" in metrics.columns and len(metrics):
        values = np.unique(metrics["config.dataset"].astype(str))
        if len(values) != 1:
            raise CheckpointError(f"{folder / METRICS} mixes datasets {values.tolist()}; load one dataset per folder")
        dataset = str(values[0])
    dataset = dataset or folder.name
    if dataset not in IMAGE_SIZES:
        raise UsageError(f"unknown Small CNN Zoo dataset {dataset!r} (known: {', '.join(IMAGE_SIZES)}); pass dataset=")
    return dataset


def build_table(metrics: Table, run_id: np.ndarray, dataset: str) -> Table:
    """``run_id, epoch, arch``, the four metrics, every ``config.*`` without its prefix, other columns, ``row``."""
    cols: dict[str, np.ndarray] = {
        "run_id": run_id.astype(np.int64),
        "epoch": metrics["step"].astype(np.int64),
        "arch": np.asarray([f"small-cnn-{a}" for a in metrics["config.activation"]], dtype=object),
    }
    cols.update({m: metrics[m].astype(np.float64) for m in METRIC_COLUMNS})
    rest = [k for k in metrics.names if k not in REQUIRED_COLUMNS[1:]]
    for name in sorted(rest, key=lambda k: not k.startswith("config.")):
        new = name.removeprefix("config.")
        if new in cols or new == "row":
            raise CheckpointError(f"metrics column {name!r} would overwrite the column {new!r}")
        cols[new] = metrics[name]
    cols.setdefault("dataset", np.full(len(run_id), dataset, dtype=object))
    cols["row"] = np.arange(len(run_id), dtype=np.int64)
    return Table(cols)


def finite_rows(weights: np.ndarray, rows: np.ndarray, path: Path) -> np.ndarray:
    """Mask of ``rows`` whose weights are all finite (read in chunks); non-finite rows are logged."""
    ok = np.ones(len(rows), dtype=bool)
    for lo in range(0, len(rows), CHUNK_ROWS):
        ok[lo : lo + CHUNK_ROWS] = np.isfinite(weights[rows[lo : lo + CHUNK_ROWS]]).all(axis=1)
    if not ok.all():
        bad = rows[~ok]
        more = " ..." if len(bad) > 10 else ""
        log.warning("%s: skipping %d rows with non-finite weights (rows %s%s)", path, len(bad), bad[:10].tolist(), more)
    return ok


class PublishedReader:
    """Reads stacked, torch-layout float32 parameters of table positions from the memory-mapped ``weights.npy``."""

    def __init__(self, path: Path, rows: np.ndarray, slots: Sequence[Slot]) -> None:
        self.path, self.rows, self.slots = path, np.asarray(rows, dtype=np.int64), tuple(slots)
        self._weights: np.ndarray | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_weights": None}  # pickle the path, not the mapped array

    @property
    def weights(self) -> np.ndarray:
        if self._weights is None:
            self._weights = open_weights(self.path)
        return self._weights

    def __call__(self, positions: np.ndarray) -> dict[str, torch.Tensor]:
        rows = self.rows[np.asarray(positions, dtype=np.int64)]
        if len(rows) == 0:
            raise UsageError("no rows selected")
        order = np.argsort(rows, kind="stable")  # read the memory map in file order
        block = np.empty((len(rows), self.weights.shape[1]), dtype=np.float32)
        block[order] = self.weights[rows[order]]
        n = len(rows)
        return {
            s.param: torch.from_numpy(np.ascontiguousarray(tf_to_torch(block[:, s.start : s.end].reshape(n, *s.tf_shape))))
            for s in self.slots
        }


# ---- the loader ---------------------------------------------------------------------------------------------
def _check_files(folder: Path) -> None:
    if not folder.is_dir():
        raise CheckpointError(f"Small CNN Zoo folder {folder} does not exist")
    missing = [str(folder / f) for f in (WEIGHTS, LAYOUT, METRICS) if not (folder / f).is_file()]
    if missing:
        raise CheckpointError(f"missing file {', '.join(missing)} (a Small CNN Zoo folder holds {WEIGHTS}, {LAYOUT}, {METRICS})")


def load_small_cnn_zoo(
    folder: str | Path,
    *,
    activation: str | None = None,
    dataset: str | None = None,
    epochs: Sequence[int] | None = None,
    check_finite: bool = True,
) -> Zoo:
    """Open one dataset folder of the Small CNN Zoo as a :class:`Zoo` (weights memory-mapped, converted on read).

    ``activation`` keeps ``"relu"`` or ``"tanh"`` runs; ``epochs`` keeps those checkpoints (e.g. ``[86]``);
    ``dataset`` overrides ``config.dataset`` (it sets the image side: 28 for MNIST / Fashion-MNIST, 32 for
    CIFAR-10 / SVHN). Every file is validated before any work; rows with non-finite weights are skipped with a
    warning (``check_finite`` reads each kept row once, in chunks). Run ids do not depend on these filters.
    """
    if activation is not None and activation not in ACTIVATIONS:
        raise UsageError(f"activation must be None, 'relu' or 'tanh', got {activation!r}")
    folder = Path(folder)
    _check_files(folder)
    weights = open_weights(folder / WEIGHTS)
    slots = read_layout(folder / LAYOUT)
    check_layout_width(slots, weights.shape[1], folder / LAYOUT, folder / WEIGHTS)
    metrics = read_metrics(folder / METRICS)
    if len(metrics) != weights.shape[0]:
        raise CheckpointError(f"{folder / METRICS} has {len(metrics)} rows but {folder / WEIGHTS} has {weights.shape[0]}")
    _check_metrics(metrics, folder / METRICS)
    name = dataset_name(metrics, folder, dataset)

    config_cols = [k for k in metrics.names if k.startswith("config.")]
    run_id = group_runs([metrics[k] for k in config_cols], metrics["step"])
    _warn_irregular_runs(run_id, folder / METRICS)
    table = build_table(metrics, run_id, name)
    keep = table.mask(activation=activation) if activation else np.ones(len(table), dtype=bool)
    if epochs is not None:
        keep &= np.isin(table["epoch"], np.asarray(list(epochs), dtype=np.int64))
    kept = np.nonzero(keep)[0]
    if check_finite:
        kept = kept[finite_rows(weights, kept, folder / WEIGHTS)]
    table = table.take(kept)

    present = sorted(set(table["activation"].tolist())) if len(table) else [activation or "relu"]
    architectures = {f"small-cnn-{a}": SmallCNNConfig(activation=a, image_size=IMAGE_SIZES[name]) for a in present}
    info = {"format": "small-cnn-zoo", "source": str(folder), "dataset": name, "n_rows": int(weights.shape[0]),
            "steps": metrics["step"].astype(np.int64)}
    log.info("%s: %d of %d checkpoints (%d runs), architectures %s", folder, len(table), weights.shape[0],
             len(np.unique(table["run_id"])), list(architectures))
    reader = PublishedReader(folder / WEIGHTS, table["row"], slots)
    return Zoo(architectures, table, reader, np.arange(len(table)), info)


# ---- the standard split -----------------------------------------------------------------------------------
def read_split_csv(path: Path, n_rows: int) -> np.ndarray:
    """The published row order: a permutation of ``0..n_rows-1``, after the stray first ``0`` line."""
    text = _read_text(Path(path))
    try:
        values = np.asarray([int(t) for t in text.split()], dtype=np.int64)
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a list of integers ({exc})") from None
    if len(values) == n_rows + 1:
        values = values[1:]
    if len(values) != n_rows or not np.array_equal(np.sort(values), np.arange(n_rows)):
        raise CheckpointError(f"{path} is not a permutation of the {n_rows} rows of weights.npy (it lists {len(values)} values)")
    return values


def standard_split(zoo: Zoo, split_csv_path: str | Path, *, seed: int = 0, filter_first: bool = False) -> tuple[Zoo, Zoo, Zoo]:
    """The NFN / ScaleGMN / Neural Graphs split of the final checkpoints: ``(train, val, test)`` views of ``zoo``.

    Rows are reordered by the published split csv, only ``step == 86`` (the last epoch) is kept, the last 50% is
    test, and the first half, shuffled by ``random.Random(seed)``, is cut 80/20 into train/val (CIFAR-10:
    12,000 / 3,000 / 15,000). The split is drawn over **all** final rows of the folder and each part then keeps the
    rows present in ``zoo``: a ReLU-only zoo gets ScaleGMN's ReLU subsets (6,024 / 1,535 / 7,567 on CIFAR-10).
    ``filter_first=True`` restricts to ``zoo``'s rows before splitting instead (the Monomial-NFN protocol).
    """
    if zoo.info.get("format") != "small-cnn-zoo":
        raise UsageError("standard_split needs a zoo from load_small_cnn_zoo (its info lacks the rows of weights.npy)")
    steps, n_rows = np.asarray(zoo.info["steps"]), int(zoo.info["n_rows"])
    order = read_split_csv(Path(split_csv_path), n_rows)
    final = order[steps[order] == steps.max()]
    lookup = np.full(n_rows, -1, dtype=np.int64)
    lookup[zoo.table["row"]] = np.arange(len(zoo))
    if filter_first:
        final = final[lookup[final] >= 0]
    half = int(0.5 * len(final))
    trainval = list(range(half))
    random.Random(seed).shuffle(trainval)
    cut = int(0.8 * len(trainval))
    parts = (final[trainval[:cut]], final[trainval[cut:]], final[half:])
    views = tuple(zoo.take(lookup[p][lookup[p] >= 0]) for p in parts)
    log.info("standard split of %d final checkpoints: train %d, val %d, test %d rows of this view", len(final), *map(len, views))
    return views  # type: ignore[return-value]
