"""Train a metanetwork on a zoo (optax AdamW, MSE on the target), data-parallel over all JAX devices; evaluate it.

The step is a pure function of the model's parameters (``nnx.split`` / ``nnx.merge``), jit-compiled once per model.
Every batch is sharded along its leading axis over a 1-d ``Mesh`` of the devices (``jax.sharding``), parameters and
optimizer state are replicated, and XLA inserts the gradient all-reduce: the same code runs on one CPU, on
``XLA_FLAGS=--xla_force_host_platform_device_count=2`` host devices, or on a multi-GPU host, with the same losses up
to float round-off. Early stopping keeps the parameters of the best validation epoch (Kendall's tau or loss).

Usage::

    splits = load_splits(zoo.select(arch=...).final(), (0.8, 0.1, 0.1), seed=0)
    model = StatNN(BaselineConfig(splits["train"].shapes, splits["train"].hparams.shape[1]), rngs=nnx.Rngs(0))
    result = train(model, splits["train"], splits["val"], TrainConfig(epochs=100))
    report = evaluate(model, splits)      # {split: {transform: {"kendall_tau", "r2", "mse", "n"}}}
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy.stats import kendalltau
from tqdm.auto import tqdm

from symm.errors import UsageError

from .data import Batch, ZooData, minibatches
from .transforms import TRANSFORMS, Transformed, transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """AdamW with a cosine (or constant) learning rate; early stopping after ``patience`` epochs without improvement."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # or "constant"
    patience: int = 20  # 0: no early stopping
    monitor: str = "kendall_tau"  # or "loss" (validation MSE)
    seed: int = 0  # shuffling
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1 or self.patience < 0:
            raise UsageError("epochs, batch_size and eval_batch_size must be positive, patience non-negative")
        if self.schedule not in ("cosine", "constant"):
            raise UsageError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.monitor not in ("kendall_tau", "loss"):
            raise UsageError(f"monitor must be 'kendall_tau' or 'loss', got {self.monitor!r}")
        if not self.learning_rate > 0 or self.weight_decay < 0:
            raise UsageError("learning_rate must be positive and weight_decay non-negative")


@dataclass
class TrainResult:
    """The model (at its best epoch), per-epoch history and how the batches were sharded."""

    model: nnx.Module
    history: list[dict[str, float]]
    best_epoch: int
    best_value: float
    n_devices: int
    shard_rows: tuple[int, ...] = field(default=())  # rows of a training batch on each device


# ----- sharding ------------------------------------------------------------------------------------------------
def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-d mesh with axis ``data`` over ``devices`` (default: all of ``jax.devices()``)."""
    return Mesh(np.asarray(list(devices or jax.devices())), ("data",))


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """Every array of ``batch`` on the mesh, split along its leading (batch) axis."""
    return jax.device_put(batch, NamedSharding(mesh, PartitionSpec("data")))


def replicate(tree: object, mesh: Mesh) -> object:
    """Every array of ``tree`` copied to every device of the mesh."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


# ----- metrics and prediction ----------------------------------------------------------------------------------
def r2(pred: np.ndarray, target: np.ndarray) -> float:
    """1 - sum (y - yhat)^2 / sum (y - mean y)^2."""
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    total = float(((target - target.mean()) ** 2).sum())
    return float("nan") if total == 0 else 1.0 - float(((target - pred) ** 2).sum()) / total


def metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Kendall's tau (scipy), R^2 and MSE of predictions against targets."""
    if len(pred) != len(target) or len(pred) == 0:
        raise UsageError(f"metrics need equal, non-zero numbers of predictions and targets ({len(pred)}, {len(target)})")
    tau = kendalltau(pred, target).statistic if len(pred) > 1 else float("nan")
    mse = float(np.mean((np.asarray(pred, np.float64) - np.asarray(target, np.float64)) ** 2))
    return {"kendall_tau": float(tau), "r2": r2(pred, target), "mse": mse, "n": int(len(pred))}


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch) -> jax.Array:
    return nnx.merge(graphdef, state)(batch)


def predict(model: nnx.Module, data: ZooData, batch_size: int = 256, mesh: Mesh | None = None) -> np.ndarray:
    """``model(batch)`` over every row of ``data`` (padded batches of ``batch_size``, sharded over the mesh)."""
    mesh = mesh or data_mesh()
    n = mesh.devices.size
    size = -(-batch_size // n) * n
    graphdef, state = nnx.split(model)
    state = replicate(state, mesh)
    out = [np.asarray(_forward(graphdef, state, shard_batch(b, mesh)))[b["mask"] > 0] for b in minibatches(data, size, multiple=n)]
    return np.concatenate(out)


# ----- training ------------------------------------------------------------------------------------------------
def _optimizer(config: TrainConfig, steps: int) -> optax.GradientTransformation:
    lr = optax.cosine_decay_schedule(config.learning_rate, steps) if config.schedule == "cosine" else config.learning_rate
    return optax.adamw(lr, weight_decay=config.weight_decay)


def _masked_mse(pred: jax.Array, batch: Batch) -> jax.Array:
    """sum mask (yhat - y)^2 / sum mask."""
    mask = batch["mask"]
    return jnp.sum(mask * (pred - batch["target"]) ** 2) / jnp.maximum(jnp.sum(mask), 1.0)


def make_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
    """``step(params, rest, opt_state, batch) -> (params, opt_state, loss)``: one AdamW step on the masked MSE."""

    def loss_fn(params: nnx.State, rest: nnx.State, batch: Batch) -> jax.Array:
        return _masked_mse(nnx.merge(graphdef, params, rest)(batch), batch)

    @jax.jit
    def step(params: nnx.State, rest: nnx.State, opt_state: optax.OptState, batch: Batch) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _improved(value: float, best: float, monitor: str) -> bool:
    if not np.isfinite(value):
        return False
    return not np.isfinite(best) or (value > best if monitor == "kendall_tau" else value < best)


def _train_epoch(step, params, rest, opt_state, data: ZooData, config: TrainConfig, epoch: int, mesh: Mesh):
    """One pass over ``data`` in seeded, sharded minibatches -> (params, opt_state, mean loss, rows per device)."""
    total, count, shard_rows = 0.0, 0.0, ()
    seed = int(np.random.SeedSequence([config.seed, epoch]).generate_state(1)[0])
    for batch in minibatches(data, config.batch_size, seed=seed, multiple=mesh.devices.size):
        sharded = shard_batch(batch, mesh)
        shard_rows = shard_rows or tuple(s.data.shape[0] for s in sharded["target"].addressable_shards)
        params, opt_state, loss = step(params, rest, opt_state, sharded)
        rows = float(batch["mask"].sum())
        total, count = total + float(loss) * rows, count + rows
    return params, opt_state, total / count, shard_rows


def train(model: nnx.Module, train_data: ZooData, val_data: ZooData, config: TrainConfig = TrainConfig(), *,
          mesh: Mesh | None = None, progress: bool = True) -> TrainResult:
    """Fit ``model`` (in place) to the target of ``train_data``; keep the parameters of the best validation epoch.

    If the model has ``fit_normalization(batches)`` it is called first on the training data (feature statistics)."""
    if len(train_data) == 0 or len(val_data) == 0:
        raise UsageError(f"empty split: {len(train_data)} training and {len(val_data)} validation rows")
    mesh = mesh or data_mesh()
    if config.batch_size % mesh.devices.size:
        raise UsageError(f"batch size {config.batch_size} is not a multiple of the {mesh.devices.size} devices it is sharded over")
    if hasattr(model, "fit_normalization"):
        model.fit_normalization(minibatches(train_data, config.eval_batch_size))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _optimizer(config, config.epochs * -(-len(train_data) // config.batch_size))
    params, rest, opt_state = replicate(params, mesh), replicate(rest, mesh), replicate(tx.init(params), mesh)
    step = make_step(graphdef, tx)
    history, best, best_epoch, best_params = [], float("nan"), -1, None
    bar = tqdm(range(config.epochs), desc=f"train {type(model).__name__}", unit="epoch", disable=not progress)
    for epoch in bar:
        params, opt_state, loss, shard_rows = _train_epoch(step, params, rest, opt_state, train_data, config, epoch, mesh)
        nnx.update(model, params)
        val = metrics(predict(model, val_data, config.eval_batch_size, mesh), val_data.target)
        history.append({"epoch": epoch, "train_loss": loss, "val_loss": val["mse"], "val_kendall_tau": val["kendall_tau"]})
        value = val["mse"] if config.monitor == "loss" else val["kendall_tau"]
        if best_params is None or _improved(value, best, config.monitor):
            best, best_epoch, best_params = value, epoch, jax.tree.map(np.asarray, params)
        bar.set_postfix(loss=f"{loss:.4g}", val_tau=f"{val['kendall_tau']:.3f}")
        if config.patience and epoch - best_epoch >= config.patience:
            log.info("early stop at epoch %d: no better validation %s since epoch %d", epoch, config.monitor, best_epoch)
            break
    bar.close()
    nnx.update(model, jax.tree.map(jnp.asarray, best_params))
    log.info("%s: best validation %s %.4f at epoch %d", type(model).__name__, config.monitor, best, best_epoch)
    return TrainResult(model, history, best_epoch, float(best), mesh.devices.size, shard_rows)


# ----- evaluation ----------------------------------------------------------------------------------------------
def transformed_views(splits: Mapping[str, ZooData], names: Sequence[str] = TRANSFORMS, seed: int = 0) -> dict[str, dict[str, Transformed]]:
    """``{split: {transform: Transformed}}`` (compute once, evaluate several models on them)."""
    return {s: {n: transform(data, n, seed) for n in names} for s, data in splits.items()}


def evaluate(model: nnx.Module, splits: Mapping[str, ZooData], transforms: Sequence[str] = TRANSFORMS, *, seed: int = 0,
             views: Mapping[str, Mapping[str, Transformed]] | None = None, batch_size: int = 256,
             mesh: Mesh | None = None) -> dict[str, dict[str, dict[str, object]]]:
    """``{split: {transform: {"kendall_tau", "r2", "mse", "n"[, "note"]}}}`` of ``model`` on transformed test networks."""
    views = views or transformed_views(splits, transforms, seed)
    missing = [(s, n) for s in splits for n in transforms if n not in views.get(s, {})]
    if missing:
        raise UsageError(f"views lack (split, transform) pairs {missing}")
    report: dict[str, dict[str, dict[str, object]]] = {}
    for split in splits:
        report[split] = {}
        for name in transforms:
            view = views[split][name]
            result: dict[str, object] = metrics(predict(model, view.data, batch_size, mesh), view.data.target)
            if view.note:
                result["note"] = view.note
            report[split][name] = result
    return report
