"""Metanetwork training infrastructure: zoo data, robustness transforms, baselines, training, checkpoints, data parallelism.

One tiny zoo (24 runs of a 64-8-10 MLP, ReLU and tanh: the same parameter shapes, different groups) serves every test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx

from metanets.baselines import BASELINES, QUANTILES, BaselineConfig, HParamsMLP, StatNN, stat_features
from metanets.checkpoint import load_checkpoint, save_checkpoint
from metanets.data import load_splits, minibatches
from metanets.train import TrainConfig, evaluate, predict, train, transformed_views
from metanets.transforms import TRANSFORMS, max_function_error, transform
from symm.errors import CheckpointError, UsageError
from symm.zoo import SearchSpace, ZooPlan, load, make_zoo

FRACTIONS = (0.6, 0.2, 0.2)
QUICK = TrainConfig(epochs=12, batch_size=8, learning_rate=3e-3, patience=0, eval_batch_size=64)


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    space = SearchSpace(widths=(8,), depths=(1,), activations=("relu", "tanh"), epochs=(1, 2))
    out = tmp_path_factory.mktemp("zoo")
    make_zoo(out, ZooPlan(arch="mlp", dataset="digits", n_models=24, space=space), progress=False)
    return out


@pytest.fixture(scope="module")
def splits(zoo_dir):
    return load_splits(load(zoo_dir), FRACTIONS, seed=0)


@pytest.fixture(scope="module")
def views(splits):
    return transformed_views(splits, TRANSFORMS, seed=0)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[:32] / 16.0, dtype=torch.float32)


def _config(data, hidden=(32,)) -> BaselineConfig:
    return BaselineConfig(data.shapes, data.hparams.shape[1], hidden)


# ----- data ----------------------------------------------------------------------------------------------------
def test_data_shapes_and_by_run_splits(zoo_dir, splits):
    zoo = load(zoo_dir)
    assert sum(len(d) for d in splits.values()) == len(zoo)
    runs = [set(d.run_id.tolist()) for d in splits.values()]
    assert all(not (a & b) for i, a in enumerate(runs) for b in runs[i + 1 :]), "a run straddles two splits"
    train = splits["train"]
    assert dict(train.shapes) == {"layers.0.weight": (8, 64), "layers.0.bias": (8,), "layers.1.weight": (10, 8), "layers.1.bias": (10,)}
    assert train.hparams.shape == (len(train), len(train.hparam_names)) and train.hparams.dtype == np.float32
    assert {"optimizer=adam", "activation=tanh", "log learning_rate", "log epochs"} <= set(train.hparam_names)
    assert np.all(np.isfinite(train.hparams)) and np.all((train.target >= 0) & (train.target <= 1))
    again = load_splits(load(zoo_dir), FRACTIONS, seed=0)
    assert np.array_equal(again["test"].run_id, splits["test"].run_id)
    assert not np.array_equal(load_splits(load(zoo_dir), FRACTIONS, seed=1)["test"].run_id, splits["test"].run_id)


def test_minibatches_pad_and_shuffle(splits):
    data = splits["train"]
    batches = list(minibatches(data, 8, seed=3))
    assert all(b["hparams"].shape == (8, data.hparams.shape[1]) for b in batches)
    assert sum(b["mask"].sum() for b in batches) == len(data)
    order = np.concatenate([b["target"][b["mask"] > 0] for b in batches])
    assert sorted(order.tolist()) == sorted(data.target.tolist())
    same = np.concatenate([b["target"][b["mask"] > 0] for b in minibatches(data, 8, seed=3)])
    assert np.array_equal(order, same)
    with pytest.raises(UsageError, match="multiple of 2"):
        next(minibatches(data, 7, seed=0, multiple=2))


def test_bad_views_are_refused(tmp_path, zoo_dir):
    with pytest.raises(UsageError, match="split 'val' is empty"):
        load_splits(load(zoo_dir), (1.0, 0.0, 0.0))
    space = SearchSpace(widths=(4, 8), depths=(1,), activations=("relu",), epochs=(1,))
    make_zoo(tmp_path / "mixed", ZooPlan(arch="mlp", dataset="digits", n_models=6, space=space), progress=False)
    with pytest.raises(UsageError, match="architectures"):
        load_splits(load(tmp_path / "mixed"), (0.5, 0.5), names=("train", "test"))


def test_non_finite_rows_are_dropped_with_a_warning(zoo_dir, caplog):
    zoo = load(zoo_dir)
    cols = dict(zoo.table.columns)
    cols["finite"] = np.where(np.arange(len(zoo)) == 0, 0, cols["finite"])
    broken = type(zoo)(zoo.architectures, type(zoo.table)(cols), zoo.read, zoo.positions, zoo.info)
    with caplog.at_level("WARNING", logger="metanets.data"):
        parts = load_splits(broken, FRACTIONS, seed=0)
    assert sum(len(d) for d in parts.values()) == len(zoo) - 1
    assert "dropping 1 of" in caplog.text


# ----- transforms ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["permutation", "scale10", "scale1000"])
def test_transforms_preserve_function_and_move_weights(splits, views, inputs, name):
    data, moved = splits["test"], views["test"][name]
    assert max_function_error(data, moved.data, inputs) <= 1e-5
    for i in range(len(data)):
        change = sum(float(np.abs(moved.data.weights[k][i] - v[i]).sum()) for k, v in data.weights.items())
        assert change > 0, f"row {i} did not move"
    if name != "permutation":
        relu = [a for a in data.architectures if "-relu-" in a]
        assert set(moved.scaled_archs) == set(relu) and all("tanh" in a for a in moved.permutation_only_archs)
        assert "permuted only" in moved.note
        scales = _max_scale(data, moved.data)
        assert scales.max() > (5 if name == "scale10" else 100)
    again = transform(data, name, seed=0)
    assert all(np.array_equal(again.data.weights[k], moved.data.weights[k]) for k in data.weights)


def _max_scale(data, moved) -> np.ndarray:
    """Largest ratio of sorted absolute bias entries (a permutation keeps the sorted values; a scaling does not)."""
    a = np.sort(np.abs(data.weights["layers.0.bias"]), axis=1)
    b = np.sort(np.abs(moved.weights["layers.0.bias"]), axis=1)
    return b.max(axis=1) / np.maximum(a.max(axis=1), 1e-12)


# ----- baselines and training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(BASELINES))
def test_baseline_trains_and_reports(splits, views, name):
    model = BASELINES[name](_config(splits["train"]), rngs=nnx.Rngs(0))
    result = train(model, splits["train"], splits["val"], QUICK, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == QUICK.epochs and losses[-1] < 0.7 * losses[0], losses
    report = evaluate(model, splits, views=views)
    assert set(report) == set(splits)
    for split in report:
        assert set(report[split]) == set(TRANSFORMS)
        for m in report[split].values():
            assert {"kendall_tau", "r2", "mse", "n"} <= set(m) and np.isfinite(m["kendall_tau"]) and np.isfinite(m["r2"])
    assert "permuted only" in report["test"]["scale10"]["note"]
    if name == "HParamsMLP":  # no weights read: every transformation scores the same
        assert len({m["kendall_tau"] for m in report["test"].values()}) == 1


def test_statnn_is_permutation_invariant(splits, views):
    data, moved = splits["test"], views["test"]["permutation"].data
    names = [n for n, _ in data.shapes]
    f0 = np.asarray(stat_features(data.weights, names))
    assert np.array_equal(np.asarray(stat_features(moved.weights, names)), f0)  # sorted entries: bit-identical
    flat = {k: v.reshape(len(v), -1) for k, v in data.weights.items()}
    for i, k in enumerate(names):  # mean, variance, then the quantiles of jnp.quantile
        np.testing.assert_allclose(f0[:, 7 * i], flat[k].mean(1), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f0[:, 7 * i + 1], flat[k].var(1), rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(f0[:, 7 * i + 2 : 7 * i + 7], np.quantile(flat[k], QUANTILES, axis=1).T, rtol=1e-5, atol=1e-6)
    model = StatNN(_config(data), rngs=nnx.Rngs(1))
    model.fit_normalization(minibatches(splits["train"], 64))
    assert np.array_equal(predict(model, moved), predict(model, data))


def test_checkpoint_round_trip(tmp_path, splits):
    model = HParamsMLP(_config(splits["train"]), rngs=nnx.Rngs(2))
    train(model, splits["train"], splits["val"], TrainConfig(epochs=2, batch_size=8, patience=0), progress=False)
    save_checkpoint(tmp_path / "ckpt", model, {"train": {"epochs": 2}})
    loaded, info = load_checkpoint(tmp_path / "ckpt")
    assert type(loaded) is HParamsMLP and loaded.config == model.config and info["metadata"] == {"train": {"epochs": 2}}
    assert np.array_equal(predict(loaded, splits["test"]), predict(model, splits["test"]))
    with pytest.raises(CheckpointError, match="not among"):
        load_checkpoint(tmp_path / "ckpt", models={"StatNN": StatNN})


# ----- data parallelism ----------------------------------------------------------------------------------------
_DP_SCRIPT = """
import json, sys
import jax
from flax import nnx
from symm.zoo import load
from metanets.baselines import BaselineConfig, FlatMLP
from metanets.data import load_splits
from metanets.train import TrainConfig, train
splits = load_splits(load(sys.argv[1]), (0.6, 0.2, 0.2), seed=0)
cfg = BaselineConfig(splits["train"].shapes, splits["train"].hparams.shape[1], (32,))
model = FlatMLP(cfg, rngs=nnx.Rngs(0))
r = train(model, splits["train"], splits["val"], TrainConfig(epochs=6, batch_size=8, patience=0, eval_batch_size=64), progress=False)
print(json.dumps({"devices": len(jax.devices()), "n_devices": r.n_devices, "shard_rows": r.shard_rows,
                  "loss": [h["train_loss"] for h in r.history], "val": [h["val_loss"] for h in r.history]}))
"""


def _start_with_devices(zoo_dir: Path, n: int) -> subprocess.Popen:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-c", _DP_SCRIPT, str(zoo_dir)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_data_parallel_matches_single_device(zoo_dir):
    procs = [_start_with_devices(zoo_dir, 1), _start_with_devices(zoo_dir, 2)]  # concurrently: mostly start-up time
    try:
        one, two = (_result(p) for p in procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert one["n_devices"] == 1 and tuple(one["shard_rows"]) == (8,)
    assert two["devices"] == 2 and two["n_devices"] == 2 and tuple(two["shard_rows"]) == (4, 4), "batch not sharded over 2 devices"
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
    np.testing.assert_allclose(two["val"], one["val"], rtol=1e-5)
    assert one["loss"][-1] < one["loss"][0]
