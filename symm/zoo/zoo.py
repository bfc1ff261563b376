"""A loaded zoo: metadata rows, the architectures they name, and memory-mapped weights read on demand."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..models import build_model, spec_for
from ..spec import Spec
from .table import Table, split_by_run

log = logging.getLogger(__name__)

# reads the rows at the given positions of the *full* table: name -> [len(positions), *shape]
WeightReader = Callable[[np.ndarray], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Zoo:
    """Checkpoints of trained networks. ``table`` has one row per checkpoint, with at least ``run_id``, ``arch``
    and ``test_accuracy``; ``architectures`` maps each ``arch`` value to its reference-model config."""

    architectures: Mapping[str, object]
    table: Table
    read: WeightReader = field(repr=False)
    positions: np.ndarray = field(repr=False)  # this view's rows in the full table
    info: Mapping[str, object] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.table)

    # ---- views ------------------------------------------------------------------------------------
    def take(self, index: np.ndarray | Sequence[int]) -> "Zoo":
        index = np.asarray(index)
        if index.dtype == bool and len(index) != len(self):
            raise UsageError(f"mask of length {len(index)} for a zoo of {len(self)} rows")
        return Zoo(self.architectures, self.table.take(index), self.read, self.positions[index], self.info)

    def select(self, mask: np.ndarray | None = None, **equals: object) -> "Zoo":
        """Rows matching a boolean ``mask`` and/or column values, e.g. ``zoo.select(activation="relu")``."""
        keep = self.table.mask(**equals)
        if mask is not None:
            keep &= np.asarray(mask, dtype=bool)
        return self.take(keep)

    def final(self) -> "Zoo":
        """The last checkpoint of every run."""
        runs, epochs = self.table["run_id"], self.table["epoch"]
        order = np.lexsort((epochs, runs))
        last = np.ones(len(order), dtype=bool)
        last[:-1] = runs[order][1:] != runs[order][:-1]
        return self.take(np.sort(order[last]))

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> tuple["Zoo", ...]:
        """Seeded split **by run** (the checkpoints of one run land in one part)."""
        return tuple(self.take(m) for m in split_by_run(self.table["run_id"], fractions, seed))

    # ---- weights ----------------------------------------------------------------------------------
    @property
    def arch(self) -> str:
        """The one architecture of this view (select one first if the zoo mixes several)."""
        archs = np.unique(self.table["arch"]) if len(self) else np.asarray(list(self.architectures))
        if len(archs) != 1:
            counts = {a: int((self.table["arch"] == a).sum()) for a in archs}
            raise UsageError(f"this view mixes {len(archs)} architectures {counts}; select one, e.g. zoo.select(arch=...)")
        return str(archs[0])

    @property
    def config(self) -> object:
        return self.architectures[self.arch]

    def spec(self) -> Spec:
        return spec_for(self.config)

    def weights(self) -> dict[str, torch.Tensor]:
        """Every parameter stacked over this view's rows: ``name -> [len(self), *shape]`` (float32).

        A view may mix architectures whose parameters have the same names and shapes (e.g. ReLU and tanh nets
        of one shape); otherwise select one architecture first."""
        archs = sorted({str(a) for a in self.table["arch"]}) if len(self) else []
        if len(archs) > 1 and len({tuple(_param_shapes(self.architectures[a]).items()) for a in archs}) > 1:
            self.arch  # the clear error
        return self.read(self.positions)

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """The parameters of row ``i`` of this view."""
        if not -len(self) <= i < len(self):
            raise UsageError(f"row {i} out of range for a zoo view of {len(self)} rows")
        return {k: v[0] for k, v in self.take([i]).weights().items()}

    def model(self, i: int) -> nn.Module:
        """The reference model of row ``i`` with its weights loaded (eval mode)."""
        row = self.take([i])
        model = build_model(row.config)
        model.load_state_dict(row.state_dict(0), strict=True)
        return model.eval()

    def row(self, i: int) -> dict[str, object]:
        return next(self.take([i]).table.rows())

    def describe(self) -> str:
        """Counts, architectures and the test-accuracy spread."""
        lines = [f"{len(self)} checkpoints of {len(np.unique(self.table['run_id']))} runs, {len(np.unique(self.table['arch']))} architectures"]
        final = self.final()
        acc = np.asarray(final.table["test_accuracy"], dtype=float)
        acc = acc[np.isfinite(acc)]
        if len(acc):
            q = np.quantile(acc, [0, 0.25, 0.5, 0.75, 1])
            lines.append(
                "final test accuracy: min {:.3f}  q1 {:.3f}  median {:.3f}  q3 {:.3f}  max {:.3f}  (IQR {:.3f})".format(*q, q[3] - q[1])
            )
        return "\n".join(lines)


def _param_shapes(config: object) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a reference config (built on the meta device: no memory, no init cost)."""
    with torch.device("meta"):
        model = build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}
