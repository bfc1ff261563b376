"""The hyperparameter space a zoo's runs are drawn from, and the deterministic draw of run ``i``.

Run ``i`` of a zoo with seed ``s`` depends only on ``(s, i)`` (numpy ``SeedSequence([s, i])``), never on how runs
are batched, which worker trains them or how often generation was interrupted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import UsageError

OPTIMIZERS = ("sgd", "momentum", "adam")


@dataclass(frozen=True)
class SearchSpace:
    """Default space: wide enough that final test accuracies spread from chance to the ceiling.

    Learning rates are log-uniform per optimizer, weight decay is 0 with probability ``p_no_weight_decay`` and
    log-uniform otherwise; ``init_scale`` multiplies PyTorch's default initialisation; ``label_noise`` is the
    fraction of training labels replaced by uniformly random classes; ``train_fraction`` the fraction of the
    training split a run sees. Widths/depths are hidden sizes/layers (MLP) or channels/blocks (CNN).
    """

    learning_rate: Mapping[str, tuple[float, float]] = dataclasses.field(
        default_factory=lambda: {"sgd": (1e-2, 1.0), "momentum": (1e-3, 0.3), "adam": (1e-4, 3e-2)}
    )
    weight_decay: tuple[float, float] = (1e-5, 1e-2)
    p_no_weight_decay: float = 0.3
    widths: tuple[int, ...] = (16, 32, 64)
    depths: tuple[int, ...] = (1, 2, 3)
    activations: tuple[str, ...] = ("relu", "tanh", "gelu")
    init_scale: tuple[float, float] = (0.3, 3.0)
    dropout: tuple[float, ...] = (0.0, 0.05, 0.2, 0.5)
    train_fraction: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    label_noise: tuple[float, ...] = (0.0, 0.05, 0.2, 0.4)
    optimizers: tuple[str, ...] = OPTIMIZERS
    epochs: tuple[int, ...] = (5, 10, 20, 30)

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "epochs"):
            values = getattr(self, name)
            if not values or any(int(v) < 1 for v in values):
                raise UsageError(f"search space: {name} must be positive integers, got {values}")
        bad = set(self.optimizers) - set(OPTIMIZERS)
        if bad or not self.optimizers:
            raise UsageError(f"search space: unknown optimizers {sorted(bad)} (known: {', '.join(OPTIMIZERS)})")
        missing = set(self.optimizers) - set(self.learning_rate)
        if missing:
            raise UsageError(f"search space: no learning-rate range for {sorted(missing)}")
        for lo, hi in [*self.learning_rate.values(), self.weight_decay, self.init_scale]:
            if not 0 < lo <= hi:
                raise UsageError(f"search space: a log-uniform range must satisfy 0 < low <= high, got ({lo}, {hi})")
        if any(not 0 < f <= 1 for f in self.train_fraction) or any(not 0 <= p < 1 for p in (*self.dropout, *self.label_noise)):
            raise UsageError("search space: train_fraction in (0, 1], dropout and label_noise in [0, 1)")

    def to_json(self) -> dict:
        return json_ready(dataclasses.asdict(self))

    @staticmethod
    def from_json(data: Mapping) -> "SearchSpace":
        fields = {f.name for f in dataclasses.fields(SearchSpace)}
        unknown = set(data) - fields
        if unknown:
            raise UsageError(f"search space: unknown fields {sorted(unknown)} (known: {', '.join(sorted(fields))})")
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items()}
        if "learning_rate" in kw:
            kw["learning_rate"] = {k: tuple(v) for k, v in kw["learning_rate"].items()}
        return SearchSpace(**kw)


TRANSFORMER_FFNS = ("relu", "gelu", "silu", "swiglu")


def default_space(arch: str) -> SearchSpace:
    """The documented default space of an architecture family (transformers: d_model, layers, FFN kind; no dropout)."""
    if arch == "transformer":
        return SearchSpace(widths=(16, 32), depths=(1, 2), activations=("relu", "gelu", "swiglu"), dropout=(0.0,),
                           label_noise=(0.0, 0.05, 0.2), epochs=(1, 2, 4, 8))
    return SearchSpace()


@dataclass(frozen=True)
class Run:
    """One training run: its id, torch seed and hyperparameters."""

    run_id: int
    seed: int
    optimizer: str
    learning_rate: float
    weight_decay: float
    width: int
    depth: int
    activation: str
    init_scale: float
    dropout: float
    train_fraction: float
    label_noise: float
    epochs: int

    def hyperparameters(self) -> dict[str, object]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("run_id", "seed")}


def draw_run(space: SearchSpace, zoo_seed: int, run_id: int) -> Run:
    """The hyperparameters of run ``run_id``: a pure function of ``(zoo_seed, run_id)``."""
    ss = np.random.SeedSequence([int(zoo_seed), int(run_id)])
    rng = np.random.default_rng(ss)
    optimizer = str(rng.choice(space.optimizers))
    wd = 0.0 if rng.random() < space.p_no_weight_decay else _log_uniform(rng, space.weight_decay)
    return Run(
        run_id=int(run_id),
        seed=int(ss.generate_state(1, np.uint32)[0]),
        optimizer=optimizer,
        learning_rate=_log_uniform(rng, space.learning_rate[optimizer]),
        weight_decay=wd,
        width=int(rng.choice(space.widths)),
        depth=int(rng.choice(space.depths)),
        activation=str(rng.choice(space.activations)),
        init_scale=_log_uniform(rng, space.init_scale),
        dropout=float(rng.choice(space.dropout)),
        train_fraction=float(rng.choice(space.train_fraction)),
        label_noise=float(rng.choice(space.label_noise)),
        epochs=int(rng.choice(space.epochs)),
    )


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def json_ready(obj: object) -> object:
    """Tuples to lists, recursively (for JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
