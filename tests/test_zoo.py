"""Model zoos: generate -> load round trip, resumption, determinism across batching and workers, bad input."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
import torch

from symm.errors import CheckpointError, OutputError, UsageError
from symm.zoo import SearchSpace, ZooPlan, draw_run, load, make_zoo
from symm.zoo.datasets import load_dataset
from symm.zoo.store import shard_paths
from symm.zoo.train import ChunkTask, train_chunk

TINY = SearchSpace(widths=(8, 12), depths=(1,), activations=("relu", "tanh"), epochs=(1, 2), train_fraction=(0.25, 0.5))


def tiny_plan(n: int = 6, arch: str = "mlp", **kw) -> ZooPlan:
    return ZooPlan(arch, "digits", n, space=kw.pop("space", TINY), checkpoint_epochs=(0, 1, 2), **kw)


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo") / "z"
    make_zoo(out, tiny_plan(6), progress=False)
    return out


def test_round_trip_reproduces_recorded_accuracy(zoo_dir):
    zoo = load(zoo_dir)
    data = load_dataset("digits", 0)
    assert len(np.unique(zoo.table["run_id"])) == 6
    assert set(zoo.table["epoch"]) >= {0, 1}
    for i in range(len(zoo)):
        row = zoo.row(i)
        acc = evaluate(zoo.model(i), data.x_test, data.y_test)
        assert acc == pytest.approx(row["test_accuracy"], abs=1e-12), row["model_id"]
        assert zoo.config == zoo.architectures[row["arch"]] if len(np.unique(zoo.table["arch"])) == 1 else True


def test_weights_bit_identical_to_training(zoo_dir):
    """The stored stacks are exactly what training produced, for every architecture of the zoo."""
    zoo = load(zoo_dir)
    plan = tiny_plan(6)
    for aid in np.unique(zoo.table["arch"]):
        view = zoo.select(arch=aid)
        runs = tuple(draw_run(plan.space, plan.seed, int(r)) for r in np.unique(view.table["run_id"]))
        fresh = train_chunk(ChunkTask(str(aid), view.config, "digits", 0, runs, plan.checkpoint_epochs, plan.batch_size))
        stored = view.weights()
        assert [r["model_id"] for r in fresh.rows] == list(view.table["model_id"])
        for k, v in fresh.weights.items():
            assert torch.equal(stored[k], v), k


def test_training_independent_of_batch_composition():
    plan = tiny_plan(8, space=SearchSpace(widths=(8,), depths=(2,), activations=("relu",), epochs=(2,), dropout=(0.0, 0.2)))
    data = load_dataset("digits", 0)
    runs = tuple(draw_run(plan.space, 0, i) for i in range(5))
    cfg = plan.config(runs[0], data.n_features, data.n_classes)
    together = train_chunk(ChunkTask("a", cfg, "digits", 0, runs, (0, 2), 64))
    alone = train_chunk(ChunkTask("a", cfg, "digits", 0, runs[3:4], (0, 2), 64))
    ids = [i for i, r in enumerate(together.rows) if r["run_id"] == 3]
    for k in alone.weights:
        assert torch.equal(together.weights[k][ids], alone.weights[k]), k
    assert any(r.dropout > 0 for r in runs)


def test_mixed_architectures_stack_only_when_shapes_agree(zoo_dir):
    zoo = load(zoo_dir)
    same_shape = zoo.select(width=12)  # relu and tanh nets of one shape
    assert len(np.unique(same_shape.table["arch"])) == 2
    assert same_shape.weights()["layers.0.weight"].shape == (len(same_shape), 12, 64)
    with pytest.raises(UsageError, match="mixes 2 architectures"):
        zoo.select(activation="relu").weights()
    with pytest.raises(UsageError, match="mixes"):
        same_shape.spec()


def test_metadata_columns_and_split_by_run(zoo_dir):
    zoo = load(zoo_dir)
    for col in ["model_id", "run_id", "seed", "optimizer", "learning_rate", "weight_decay", "width", "depth", "activation",
                "init_scale", "dropout", "train_fraction", "label_noise", "epochs", "epoch", "step",
                "train_loss", "train_accuracy", "val_loss", "val_accuracy", "test_loss", "test_accuracy"]:
        assert col in zoo.table.columns, col
    parts = zoo.split((0.5, 0.25, 0.25), seed=1)
    runs = [set(p.table["run_id"]) for p in parts]
    assert sum(len(p) for p in parts) == len(zoo)
    assert not (runs[0] & runs[1]) and not (runs[0] & runs[2]) and not (runs[1] & runs[2])
    final = zoo.final()
    assert len(final) == 6 and all(final.table["epoch"] == final.table["epochs"])


def test_resume_trains_only_missing_runs(tmp_path):
    out = tmp_path / "z"
    first = make_zoo(out, tiny_plan(3), progress=False)
    second = make_zoo(out, tiny_plan(6), progress=False)
    third = make_zoo(out, tiny_plan(6), progress=False)
    assert (first.trained, second.trained, second.skipped, third.trained) == (3, 3, 3, 0)
    zoo = load(out)
    assert len(set(zoo.table["model_id"])) == len(zoo)
    assert sorted(np.unique(zoo.table["run_id"])) == list(range(6))


def test_workers_and_chunking_give_the_same_zoo(tmp_path, zoo_dir):
    out = tmp_path / "z2"
    make_zoo(out, tiny_plan(6), workers=2, chunk_size=2, progress=False)
    a, b = load(zoo_dir), load(out)
    assert list(a.table["model_id"]) == list(b.table["model_id"])
    for aid in np.unique(a.table["arch"]):
        wa, wb = a.select(arch=aid).weights(), b.select(arch=aid).weights()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for col in ["test_accuracy", "train_loss", "step"]:
        assert np.array_equal(a.table[col], b.table[col])


def test_cnn_zoo(tmp_path):
    out = tmp_path / "c"
    make_zoo(out, tiny_plan(2, arch="cnn", space=SearchSpace(widths=(4,), depths=(2,), activations=("relu",), epochs=(1,), dropout=(0.2,))), progress=False)
    zoo = load(out)
    data = load_dataset("digits", 0)
    i = len(zoo) - 1
    assert evaluate(zoo.model(i), data.x_test, data.y_test) == pytest.approx(zoo.row(i)["test_accuracy"], abs=1e-12)
    assert zoo.spec().name.startswith("cnn")


def test_transformer_text_zoo(tmp_path):
    out = tmp_path / "t"
    space = SearchSpace(widths=(16,), depths=(1,), activations=("gelu",), epochs=(1,), dropout=(0.0,), train_fraction=(0.25,))
    make_zoo(out, ZooPlan("transformer", "text", 2, space=space, checkpoint_epochs=(0, 1)), progress=False)
    zoo = load(out)
    data = load_dataset("text", 0)
    i = len(zoo) - 1
    with torch.no_grad():
        acc = float((zoo.model(i)(data.x_test).argmax(-1) == data.y_test).float().mean())
    assert acc == pytest.approx(zoo.row(i)["test_accuracy"], abs=1e-6)
    assert zoo.spec().name.startswith("transformer")
    with pytest.raises(UsageError, match="transformer goes with --dataset text"):
        ZooPlan("transformer", "digits", 2)


# ---- bad input ----------------------------------------------------------------------------------------
def test_bad_plans_refused():
    with pytest.raises(UsageError, match="unknown zoo architecture"):
        ZooPlan("rnn", "digits", 10)
    with pytest.raises(UsageError, match="unknown zoo dataset"):
        ZooPlan("mlp", "imagenet", 10)
    with pytest.raises(UsageError, match="--arch cnn"):
        ZooPlan("cnn", "mnist1d", 10)
    with pytest.raises(UsageError, match="at least 1"):
        ZooPlan("mlp", "digits", 0)
    with pytest.raises(UsageError, match="unknown optimizers"):
        SearchSpace(optimizers=("lbfgs",))


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_other_settings_or_foreign_folder_refused(tmp_path, zoo_dir):
    before = _snapshot(zoo_dir)
    with pytest.raises(OutputError, match="other settings"):
        make_zoo(zoo_dir, tiny_plan(6, seed=5), progress=False)
    assert _snapshot(zoo_dir) == before
    foreign = tmp_path / "f"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty"):
        make_zoo(foreign, tiny_plan(2), progress=False)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_newer_format_refused(tmp_path, zoo_dir):
    z = _copy(zoo_dir, tmp_path / "z")
    m = json.loads((z / "manifest.json").read_text())
    m["format_version"] = 99
    (z / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"manifest.json has zoo format version 99"):
        load(z)
    with pytest.raises(CheckpointError, match="version 99"):
        make_zoo(z, tiny_plan(6), progress=False)


def test_truncated_and_missing_shards_named(tmp_path, zoo_dir):
    z = _copy(zoo_dir, tmp_path / "z")
    shard = shard_paths(z)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        load(z)
    shard.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match=f"{shard.name} is truncated"):
        load(z)
    (n,) = struct.unpack("<Q", data[:8])
    shard.write_bytes(data[:8] + b"{" * n + data[8 + n :])
    with pytest.raises(CheckpointError, match=f"{shard.name} has a corrupt header"):
        load(z)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{shard.name}"):
        load(z)


def test_stale_index_rebuilt_from_shards(tmp_path, zoo_dir):
    z = _copy(zoo_dir, tmp_path / "z")
    full = load(z)
    lines = (z / "metadata.csv").read_text().splitlines()
    shard = shard_paths(z)[-1].relative_to(z)
    (z / "metadata.csv").write_text("\n".join(l for l in lines if str(shard) not in l) + "\n")
    again = load(z)
    assert list(again.table["model_id"]) == list(full.table["model_id"])


def test_concurrent_make_refused(tmp_path):
    import subprocess
    import sys
    import time

    out = tmp_path / "z"
    env = {**os.environ, "SYMM_TEST_FAULT": "zoo-before-shard:sleep30"}
    code = "from symm.zoo import make_zoo; from tests.test_zoo import tiny_plan; make_zoo(%r, tiny_plan(2), progress=False)" % str(out)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    try:
        for _ in range(300):
            if (out / "manifest.json").exists():
                break
            time.sleep(0.1)
        with pytest.raises(OutputError, match="another run is writing"):
            make_zoo(out, tiny_plan(2), progress=False)
    finally:
        proc.kill()
        proc.wait()


def test_cli_make_and_info(tmp_path, capsys):
    from symm.cli import main

    space = tmp_path / "space.json"
    space.write_text(json.dumps({"widths": [8], "depths": [1], "activations": ["relu"], "epochs": [1]}))
    out = tmp_path / "z"
    assert main(["zoo", "make", "--n-models", "2", "--out", str(out), "--space", str(space), "--workers", "1", "-q"]) == 0
    text = capsys.readouterr().out
    assert "trained 2 runs" in text and "mlp-64-8-10-relu" in text and "8 laws" in text and "IQR" in text
    assert main(["zoo", "make", "--n-models", "2", "--out", str(out), "--space", str(space), "--workers", "1", "-q"]) == 0
    assert "trained 0 runs" in capsys.readouterr().out
    space.write_text(json.dumps({"widths": [8], "optimizers": ["lbfgs"]}))
    assert main(["zoo", "make", "--out", str(tmp_path / "y"), "--space", str(space)]) == 2
    assert "unknown optimizers" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["zoo", "info", str(tmp_path / "nothing")]) == 2
    assert "is not a zoo" in capsys.readouterr().err
