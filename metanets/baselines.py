"""Baseline metanetworks (Flax NNX): an MLP on features of the weights or of the hyperparameters.

Every model maps a batch ``{"weights": {name: [B, *shape]}, "hparams": [B, F]}`` to ``[B]`` predictions:
``y = mu_y + sigma_y * MLP((phi(batch) - mu_phi) / sigma_phi)`` with a fixed feature map ``phi`` (pure functions below)
and standardisation statistics fitted on the training data (:meth:`fit_normalization`, not trained).

* :class:`FlatMLP`: ``phi`` = the flattened, concatenated weights (no symmetry: a permutation changes everything);
* :class:`StatNN`: per parameter tensor, mean, variance and the 0/25/50/75/100 % quantiles of its entries
  (Unterthiner et al. 2020, "Predicting neural network accuracy from weights"): invariant to permutations, not
  to rescalings;
* :class:`HParamsMLP`: ``phi`` = the hyperparameter features only (how much of the ranking needs no weights).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from symm.errors import UsageError

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)
Batch = Mapping[str, object]


# ----- feature maps (pure functions) ---------------------------------------------------------------------------
def flat_features(weights: Mapping[str, jax.Array], names: Iterable[str]) -> jax.Array:
    """[B, sum of sizes]: every tensor flattened, concatenated in ``names`` order."""
    return jnp.concatenate([jnp.reshape(weights[n], (weights[n].shape[0], -1)) for n in names], axis=1)


def stat_features(weights: Mapping[str, jax.Array], names: Iterable[str]) -> jax.Array:
    """[B, 7 T]: per tensor (in ``names`` order) mean, variance and quantiles 0, .25, .5, .75, 1 of its entries.

    Computed from the sorted entries (quantiles interpolate linearly, as ``jnp.quantile``), so a permutation of the
    entries leaves every feature bit-identical."""
    parts = []
    for n in names:
        x = jnp.sort(jnp.reshape(weights[n], (weights[n].shape[0], -1)), axis=1)
        pos = np.asarray(QUANTILES) * (x.shape[1] - 1)
        lo, hi = np.floor(pos).astype(int), np.ceil(pos).astype(int)
        frac = jnp.asarray(pos - lo, dtype=x.dtype)
        parts += [jnp.mean(x, axis=1, keepdims=True), jnp.var(x, axis=1, keepdims=True), x[:, lo] * (1 - frac) + x[:, hi] * frac]
    return jnp.concatenate(parts, axis=1)


# ----- modules ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BaselineConfig:
    """What a baseline is built from: parameter names and per-network shapes, hyperparameter count, hidden widths."""

    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    n_hparams: int
    hidden: tuple[int, ...] = (128, 128)

    @staticmethod
    def from_json(data: Mapping) -> "BaselineConfig":
        unknown = set(data) - {"shapes", "n_hparams", "hidden"}
        if unknown:
            raise UsageError(f"baseline config: unknown fields {sorted(unknown)}")
        return BaselineConfig(tuple((str(n), tuple(int(d) for d in s)) for n, s in data["shapes"]), int(data["n_hparams"]),
                              tuple(int(h) for h in data.get("hidden", (128, 128))))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.shapes)


class Statistic(nnx.Variable):
    """A fitted (not trained) array: the optimizer only updates :class:`nnx.Param`."""


class Standardize(nnx.Module):
    """x -> (x - mean) / std per feature, and its inverse."""

    def __init__(self, dim: int) -> None:
        self.mean = Statistic(jnp.zeros(dim))
        self.std = Statistic(jnp.ones(dim))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x - self.mean[...]) / self.std[...]

    def inverse(self, y: jax.Array) -> jax.Array:
        return y * self.std[...] + self.mean[...]

    def fit(self, x: np.ndarray, weights: np.ndarray | None = None) -> None:
        """mean and std of the rows of ``x`` (std < 1e-8 of the scale -> 1: constant features pass unscaled)."""
        x = np.asarray(x, dtype=np.float64)
        w = np.ones(len(x)) if weights is None else np.asarray(weights, dtype=np.float64)
        mean = (w[:, None] * x).sum(0) / w.sum()
        std = np.sqrt((w[:, None] * (x - mean) ** 2).sum(0) / w.sum())
        std = np.where(std > 1e-8 * np.maximum(np.abs(mean), 1.0), std, 1.0)
        self.mean.set_value(jnp.asarray(mean, jnp.float32))
        self.std.set_value(jnp.asarray(std, jnp.float32))


class MLP(nnx.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs) -> None:
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(nnx.relu(x))
        return x


class FeatureRegressor(nnx.Module, abc.ABC):
    """``y = mu_y + sigma_y * MLP((phi(batch) - mu) / sigma)``; subclasses define the feature map ``phi``."""

    def __init__(self, config: BaselineConfig, *, rngs: nnx.Rngs) -> None:
        if not config.shapes and self.uses_weights:
            raise UsageError(f"{type(self).__name__} needs at least one weight tensor")
        self.config = config
        dim = self.n_features(config)
        if dim == 0:
            raise UsageError(f"{type(self).__name__}: no input features")
        self.x_norm = Standardize(dim)
        self.y_norm = Standardize(1)
        self.mlp = MLP((dim, *config.hidden, 1), rngs=rngs)

    uses_weights = True

    @staticmethod
    def config_from_json(data: Mapping) -> BaselineConfig:
        return BaselineConfig.from_json(data)

    @staticmethod
    @abc.abstractmethod
    def n_features(config: BaselineConfig) -> int: ...

    @abc.abstractmethod
    def features(self, batch: Batch) -> jax.Array: ...

    def __call__(self, batch: Batch) -> jax.Array:
        return self.y_norm.inverse(self.mlp(self.x_norm(self.features(batch))))[:, 0]

    def fit_normalization(self, batches: Iterable[Batch]) -> None:
        """Standardisation statistics of the features and targets of ``batches`` (rows with ``mask`` 0 ignored)."""
        feats, targets, masks = [], [], []
        for b in batches:
            feats.append(np.asarray(self.features(b)))
            targets.append(np.asarray(b["target"]))
            masks.append(np.asarray(b.get("mask", np.ones(len(targets[-1])))))
        mask = np.concatenate(masks)
        self.x_norm.fit(np.concatenate(feats), mask)
        self.y_norm.fit(np.concatenate(targets)[:, None], mask)


class FlatMLP(FeatureRegressor):
    """MLP on the flattened, concatenated weights."""

    @staticmethod
    def n_features(config: BaselineConfig) -> int:
        return int(sum(np.prod(s, dtype=np.int64) for _, s in config.shapes))

    def features(self, batch: Batch) -> jax.Array:
        return flat_features(batch["weights"], self.config.names)


class StatNN(FeatureRegressor):
    """MLP on per-tensor statistics (mean, variance, five quantiles); invariant to permutations of the weights."""

    @staticmethod
    def n_features(config: BaselineConfig) -> int:
        return (2 + len(QUANTILES)) * len(config.shapes)

    def features(self, batch: Batch) -> jax.Array:
        return stat_features(batch["weights"], self.config.names)


class HParamsMLP(FeatureRegressor):
    """MLP on the hyperparameter features only."""

    uses_weights = False

    @staticmethod
    def n_features(config: BaselineConfig) -> int:
        return config.n_hparams

    def features(self, batch: Batch) -> jax.Array:
        return jnp.asarray(batch["hparams"])


#: baseline classes by name (checkpoints record the name)
BASELINES: Mapping[str, type[FeatureRegressor]] = {c.__name__: c for c in (FlatMLP, StatNN, HParamsMLP)}


def build_baseline(name: str, config: BaselineConfig, *, rngs: nnx.Rngs) -> FeatureRegressor:
    """``BASELINES[name](config, rngs=rngs)`` with a clear error for an unknown name."""
    if name not in BASELINES:
        raise UsageError(f"unknown baseline {name!r} (known: {', '.join(BASELINES)})")
    return BASELINES[name](config, rngs=rngs)
