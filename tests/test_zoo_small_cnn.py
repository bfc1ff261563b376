"""Small CNN Zoo: the reference model and its Spec, and the loader of the published format (on a synthetic folder).

The folder is written by ``tests/small_cnn_fixture.py`` in the exact published format, with every row's recorded
accuracy computed by an independent numpy implementation of the TF forward pass.
"""

from __future__ import annotations

import gzip
import logging
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from symm import GroupElement, PositiveScaling, SignFlip, testing
from symm.action import act
from symm.errors import CheckpointError, UsageError
from symm.evaluate import functional, state_dict_of
from symm.models import SmallCNN, SmallCNNConfig, build_model, spec_for
from symm.zoo.small_cnn import (
    group_runs,
    load_small_cnn_zoo,
    read_layout,
    standard_layout,
    standard_split,
    tf_to_torch,
    to_published_row,
    torch_to_tf,
)

import small_cnn_fixture as fx

ACTIVATIONS = ["relu", "tanh"]


# ---- the reference model and its Spec ----------------------------------------------------------------------
def _case(activation: str, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(SmallCNNConfig(activation=activation)).to(dtype).eval()
    with torch.no_grad():  # larger weights: the activations' nonlinearity matters
        for p in model.parameters():
            p.mul_(2.0)
    x, _ = fx.digits_nhwc()
    gen = torch.Generator().manual_seed(seed + 1)
    images = torch.from_numpy(x[:24]).permute(0, 3, 1, 2).to(torch.float64)
    images = torch.cat([images, torch.randn(8, 1, 28, 28, generator=gen, dtype=torch.float64)]).to(dtype)
    f = lambda params: functional(model)(params, images)  # noqa: E731
    return model, spec_for(model), state_dict_of(model), f


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_small_cnn_group_preserves_logits(activation, dtype):
    model, spec, params, f = _case(activation, dtype)
    assert f(params).abs().max() > 0
    testing.assert_invariant(f, spec, params, n_samples=20)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_small_cnn_testing_elements_preserve_logits(activation, dtype):
    model, spec, params, f = _case(activation, dtype)
    rtol = testing.tolerance_for(params)
    for name, factor in spec.factors.items():
        for k, element in enumerate(factor.testing_elements()):
            g = GroupElement.identity(spec).replace(**{name: element})
            err = testing.invariance_error(f, spec, params, g)
            assert err <= rtol, f"{name} testing element {k}: relative error {err:.3e}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_small_cnn_group_axioms(activation, dtype):
    _, spec, params, _ = _case(activation, dtype)
    testing.assert_group_axioms(spec, params, atol=1e-5 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("activation, dimension, child", [("relu", 48, PositiveScaling), ("tanh", 0, SignFlip)])
def test_small_cnn_spec_structure(activation, dimension, child):
    config = SmallCNNConfig(activation=activation)
    spec = spec_for(config)
    spec.check_params(build_model(config).state_dict())
    assert spec.dimension == dimension
    assert sorted(spec.permutation_factors) == [f"convs.{i}.channels" for i in range(3)]
    assert len(spec.factors_of_kind(child)) == 3
    head = spec.params["head.weight"].axes[1][0].acts  # global average pooling: one column per channel
    assert {o.factor for o in head} == {"convs.2.channels", f"convs.2.channels.{'scale' if activation == 'relu' else 'sign'}"}
    assert {o.block for o in head} == {1}
    assert SmallCNNConfig(image_size=32).spatial_sizes == (32, 15, 7, 3)
    assert SmallCNNConfig().spatial_sizes == (28, 13, 6, 2)
    assert sum(p.numel() for p in build_model(config).parameters()) == 4970


def test_small_cnn_config_refuses_bad_values():
    with pytest.raises(ValueError, match="too small"):
        SmallCNNConfig(image_size=6)
    with pytest.raises(ValueError, match="width"):
        SmallCNNConfig(width=0)
    with pytest.raises(Exception, match="activation"):
        SmallCNNConfig(activation="softplus")


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_uncoupled_permutation_changes_logits(activation):
    """Negative control: permuting conv 1's out-channels without conv 2's in-channels is not a symmetry."""
    _, spec, params, f = _case(activation, torch.float64)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    broken = dict(params)
    broken["convs.0.weight"], broken["convs.0.bias"] = params["convs.0.weight"][perm], params["convs.0.bias"][perm]
    testing.assert_not_invariant(f, params, broken)
    broken["convs.1.weight"] = params["convs.1.weight"][:, perm]  # coupled: a symmetry again
    assert testing.relative_error(f(broken), f(params)) < 1e-10


def test_sign_flips_break_relu_and_scaling_breaks_tanh():
    _, _, relu_params, f_relu = _case("relu", torch.float64)
    _, _, tanh_params, f_tanh = _case("tanh", torch.float64)
    tanh_spec, relu_spec = spec_for(SmallCNNConfig(activation="tanh")), spec_for(SmallCNNConfig())
    for seed in range(3):
        g = GroupElement.sample(tanh_spec, seed, only=tanh_spec.factors_of_kind(SignFlip))
        testing.assert_not_invariant(f_relu, relu_params, act(tanh_spec, relu_params, g))
        h = GroupElement.sample(relu_spec, seed, only=relu_spec.factors_of_kind(PositiveScaling))
        testing.assert_not_invariant(f_tanh, tanh_params, act(relu_spec, tanh_params, h))


# ---- the published-format folder ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs() -> list[fx.Run]:
    return fx.make_runs()


@pytest.fixture(scope="module")
def written(runs, tmp_path_factory) -> fx.Written:
    return fx.write_zoo(tmp_path_factory.mktemp("zoo") / "mnist", runs)


@pytest.fixture(scope="module")
def zoo(written):
    return load_small_cnn_zoo(written.folder)


@pytest.fixture(scope="module")
def holdout_images() -> tuple[torch.Tensor, np.ndarray]:
    x, y = fx.digits_nhwc()
    return torch.from_numpy(x[-fx.N_TEST:]).permute(0, 3, 1, 2).contiguous(), y[-fx.N_TEST:]


def test_loaded_models_reproduce_every_recorded_accuracy(zoo, written, holdout_images):
    x, y = holdout_images
    assert len(zoo) == len(written.epochs) == 9 * len(written.runs)
    recorded = zoo.table["test_accuracy"]
    assert 0.7 < recorded.max() <= 1.0  # trained: a wrong conversion cannot match by chance
    for i in range(len(zoo)):
        model = zoo.model(i)
        assert isinstance(model, SmallCNN) and model.config.image_size == 28
        with torch.no_grad():
            pred = model(x).argmax(dim=1).numpy()
        row = int(zoo.table["row"][i])
        np.testing.assert_array_equal(pred, written.predictions[row], err_msg=f"row {row}: predictions differ")
        assert float(np.mean(pred == y)) == recorded[i], f"row {row}: accuracy differs from the record"


def test_loaded_logits_match_the_numpy_tf_forward(zoo, written, runs, holdout_images):
    x, _ = holdout_images
    xn = x.permute(0, 2, 3, 1).numpy()
    for i in (8, 17, 30):
        run, epoch = written.runs[written.run_index[i]], written.epochs[i]
        want = fx.numpy_forward(run.checkpoints[epoch], xn, run.config["activation"])
        with torch.no_grad():
            got = zoo.model(i).double()(x.double()).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_layout_conversion_round_trips(zoo, written):
    weights = np.load(written.folder / "weights.npy")
    shapes = {k: tuple(v.shape) for k, v in SmallCNN(SmallCNNConfig()).state_dict().items()}
    for activation in ACTIVATIONS:
        view = zoo.select(activation=activation)
        stacked = view.weights()
        for i in range(len(view)):
            state = view.state_dict(i)
            assert all(v.dtype == torch.float32 for v in state.values())
            assert {k: tuple(v.shape) for k, v in state.items()} == shapes
            np.testing.assert_array_equal(to_published_row(state), weights[view.table["row"][i]])
            for k, v in state.items():
                assert torch.equal(stacked[k][i], v)
    rng = np.random.default_rng(0)
    for shape in [(2, 3, 3, 1, 16), (2, 16, 10), (2, 16)]:
        a = rng.standard_normal(shape)
        np.testing.assert_array_equal(torch_to_tf(tf_to_torch(a)), a)
    assert tf_to_torch(np.zeros((1, 3, 3, 4, 16))).shape == (1, 16, 4, 3, 3)


def test_layout_file_is_the_published_layout(written):
    assert read_layout(written.folder / "layout.csv") == standard_layout()
    assert [(s.varname, s.start, s.end, s.tf_shape) for s in standard_layout()] == list(fx.LAYOUT)


def test_table_columns_and_architectures(zoo, written):
    t = zoo.table
    for col in ("run_id", "epoch", "arch", "test_accuracy", "test_loss", "train_accuracy", "train_loss", "row",
                "activation", "learning_rate", "random_seed", "optimizer", "dataset", "epochs", "laststep"):
        assert col in t.columns, col
    assert not any(n.startswith("config.") or n == "" for n in t.names)
    assert t["epoch"].tolist() == written.epochs
    assert t["row"].tolist() == list(range(len(written.epochs)))
    assert set(zoo.architectures) == {"small-cnn-relu", "small-cnn-tanh"}
    assert zoo.architectures["small-cnn-tanh"] == SmallCNNConfig(activation="tanh", image_size=28)
    assert all(a == f"small-cnn-{b}" for a, b in zip(t["arch"], t["activation"]))
    for i, run in enumerate(written.runs):
        rows = t["run_id"] == np.unique(t["run_id"])[i]
        assert np.allclose(t["learning_rate"][rows], run.config["learning_rate"])
    final = zoo.final()
    assert len(final) == len(written.runs) and set(final.table["epoch"]) == {86}
    assert "6 runs" in zoo.describe()


def test_dataset_keyword_sets_the_image_size(written):
    z = load_small_cnn_zoo(written.folder, dataset="cifar10", check_finite=False)
    assert {c.image_size for c in z.architectures.values()} == {32}
    with pytest.raises(UsageError, match="unknown Small CNN Zoo dataset"):
        load_small_cnn_zoo(written.folder, dataset="imagenet")


def test_activation_filter(zoo, written):
    for activation in ACTIVATIONS:
        sub = load_small_cnn_zoo(written.folder, activation=activation)
        assert set(sub.table["activation"]) == {activation}
        assert list(sub.architectures) == [f"small-cnn-{activation}"] and sub.arch == f"small-cnn-{activation}"
        n_runs = sum(r.config["activation"] == activation for r in written.runs)
        assert len(sub) == 9 * n_runs
        full = zoo.select(activation=activation)  # same rows, same run ids as filtering the full zoo
        assert sub.table["row"].tolist() == full.table["row"].tolist()
        assert sub.table["run_id"].tolist() == full.table["run_id"].tolist()
        assert isinstance(sub.model(0), SmallCNN) and sub.model(0).config.activation == activation
    with pytest.raises(UsageError, match="activation"):
        load_small_cnn_zoo(written.folder, activation="gelu")


def test_epochs_filter(written):
    z = load_small_cnn_zoo(written.folder, epochs=[86])
    assert set(z.table["epoch"]) == {86} and len(z) == len(written.runs)
    assert z.table["row"].tolist() == [9 * k + 8 for k in range(len(written.runs))]


def test_run_grouping(zoo, written):
    """Runs 4 and 5 share every hyperparameter (and all seeds are 0): a repeated step starts a new run."""
    assert written.runs[4].config == written.runs[5].config
    run_id = zoo.table["run_id"]
    assert run_id.tolist() == written.run_index
    for r in np.unique(run_id):
        assert sorted(zoo.table["epoch"][run_id == r].tolist()) == sorted(fx.EPOCH_ORDER)


def test_group_runs_on_hyperparameters_and_repeated_steps():
    nan = float("nan")
    lr = np.array([nan, nan, nan, 0.1, 0.1, 0.2])
    opt = np.array(["adam"] * 6, dtype=object)
    steps = np.array([0, 1, 0, 0, 1, 1])
    assert group_runs([lr, opt], steps).tolist() == [0, 0, 1, 2, 2, 3]  # NaN == NaN; a repeated step; a new value
    assert group_runs([], np.zeros(0, dtype=np.int64)).tolist() == []


def test_zoo_pickles_without_the_mapped_weights(zoo):
    view = zoo.select(activation="tanh")
    view.weights()  # maps weights.npy
    blob = pickle.dumps(view)
    assert len(blob) < np.load(view.info["source"] + "/weights.npy", mmap_mode="r").nbytes / 4
    copy = pickle.loads(blob)
    assert copy.read._weights is None
    for k, v in copy.weights().items():
        assert torch.equal(v, view.weights()[k])


def test_missing_runs_leave_whole_runs(runs, tmp_path, caplog):
    w = fx.write_zoo(tmp_path / "mnist", runs, drop_runs=(1, 3))
    with caplog.at_level(logging.WARNING):
        z = load_small_cnn_zoo(w.folder)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(np.unique(z.table["run_id"])) == len(runs) - 2
    assert z.table["run_id"].tolist() == w.run_index


def test_partial_run_is_grouped_and_reported(runs, tmp_path, caplog):
    w = fx.write_zoo(tmp_path / "mnist", runs)
    keep = np.r_[0:12, 13:len(w.epochs)]  # drop one checkpoint of run 1
    _rewrite(w.folder, keep)
    with caplog.at_level(logging.WARNING, logger="symm.zoo.small_cnn"):
        z = load_small_cnn_zoo(w.folder)
    assert np.bincount(z.table["run_id"]).tolist() == [9, 8, 9, 9, 9, 9]
    assert any("do not have 9 checkpoints" in r.getMessage() for r in caplog.records)


def _rewrite(folder: Path, keep: np.ndarray) -> None:
    """Keep only the given rows of weights.npy and metrics.csv.gz."""
    np.save(folder / "weights.npy", np.load(folder / "weights.npy")[keep])
    with gzip.open(folder / "metrics.csv.gz", "rt") as f:
        lines = f.read().splitlines()
    with gzip.open(folder / "metrics.csv.gz", "wt") as f:
        f.write("\n".join([lines[0]] + [lines[1 + i] for i in keep]) + "\n")


def test_non_finite_rows_are_skipped_with_a_warning(runs, tmp_path, caplog):
    w = fx.write_zoo(tmp_path / "mnist", runs)
    weights = np.load(w.folder / "weights.npy")
    weights[5, 100], weights[20, 4900] = np.nan, np.inf
    np.save(w.folder / "weights.npy", weights)
    with caplog.at_level(logging.WARNING, logger="symm.zoo.small_cnn"):
        z = load_small_cnn_zoo(w.folder)
    assert len(z) == len(w.epochs) - 2 and not {5, 20} & set(z.table["row"].tolist())
    assert any("non-finite" in r.getMessage() and "weights.npy" in r.getMessage() for r in caplog.records)
    assert z.table["run_id"].tolist() == [w.run_index[r] for r in z.table["row"]]  # run ids unchanged


# ---- the standard split --------------------------------------------------------------------------------------
def test_standard_split(zoo, written, tmp_path):
    perm = fx.write_split_csv(tmp_path / "mnist_split.csv", len(zoo))
    assert (tmp_path / "mnist_split.csv").read_text().startswith("0\n")
    train, val, test = standard_split(zoo, tmp_path / "mnist_split.csv")
    final_in_order = [r for r in perm if written.epochs[r] == 86]
    n = len(final_in_order)
    assert (len(train), len(val), len(test)) == (int(0.8 * (n // 2)), n // 2 - int(0.8 * (n // 2)), n - n // 2)
    assert test.table["row"].tolist() == final_in_order[n // 2 :]  # the last 50%, in split order
    assert sorted(train.table["row"].tolist() + val.table["row"].tolist()) == sorted(final_in_order[: n // 2])
    runs = [set(p.table["run_id"].tolist()) for p in (train, val, test)]
    assert not (runs[0] & runs[1] or runs[0] & runs[2] or runs[1] & runs[2])  # no run straddles two parts
    for part in (train, val, test):
        assert set(part.table["epoch"]) == {86}
    again = standard_split(zoo, tmp_path / "mnist_split.csv")
    assert [p.table["row"].tolist() for p in again] == [p.table["row"].tolist() for p in (train, val, test)]


def test_standard_split_relu_subset_after_split(zoo, written, tmp_path):
    fx.write_split_csv(tmp_path / "split.csv", len(zoo), seed=1)
    full = standard_split(zoo, tmp_path / "split.csv")
    relu = standard_split(load_small_cnn_zoo(written.folder, activation="relu"), tmp_path / "split.csv")
    for a, b in zip(full, relu):  # ScaleGMN: split every final row, then keep the ReLU ones
        assert b.table["row"].tolist() == [r for r, act_ in zip(a.table["row"], a.table["activation"]) if act_ == "relu"]
    relu_zoo = load_small_cnn_zoo(written.folder, activation="relu")
    first = standard_split(relu_zoo, tmp_path / "split.csv", filter_first=True)
    n = len(relu_zoo.final())
    assert [len(p) for p in first] == [int(0.8 * (n // 2)), n // 2 - int(0.8 * (n // 2)), n - n // 2]


def test_standard_split_refuses_a_bad_split_file(zoo, tmp_path):
    (tmp_path / "bad.csv").write_text("0\n" + "\n".join(str(i) for i in [0] * len(zoo)) + "\n")
    with pytest.raises(CheckpointError, match="bad.csv"):
        standard_split(zoo, tmp_path / "bad.csv")
    with pytest.raises(CheckpointError, match="missing file"):
        standard_split(zoo, tmp_path / "absent.csv")


# ---- bad input: clear errors naming the file, and nothing in the folder changes --------------------------------
def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _layout_shifted(folder: Path) -> None:
    """Every slice 10 values later: consistent with itself, not with the 4970 columns of weights.npy."""
    lines = (folder / "layout.csv").read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        name, start, end, rest = line.split(",", 3)
        out.append(f"{name},{int(start) + 10},{int(end) + 10},{rest}")
    (folder / "layout.csv").write_text("\n".join(out) + "\n")


def _layout_gap(folder: Path) -> None:
    text = (folder / "layout.csv").read_text().replace("sequential/conv2d/kernel:0,16,160,", "sequential/conv2d/kernel:0,15,159,")
    (folder / "layout.csv").write_text(text)


def _layout_short(folder: Path) -> None:
    lines = (folder / "layout.csv").read_text().splitlines()
    (folder / "layout.csv").write_text("\n".join(lines[:-1]) + "\n")


def _layout_unknown_name(folder: Path) -> None:
    (folder / "layout.csv").write_text((folder / "layout.csv").read_text().replace("dense/bias", "dense_1/bias"))


def _layout_wrong_shape(folder: Path) -> None:
    (folder / "layout.csv").write_text((folder / "layout.csv").read_text().replace('"(3, 3, 1, 16)"', '"(3, 3, 16, 1)"'))


def _truncate_weights(folder: Path) -> None:
    data = (folder / "weights.npy").read_bytes()
    (folder / "weights.npy").write_bytes(data[: len(data) - 4 * 4970 * 2 - 3])


def _weights_wrong_width(folder: Path) -> None:
    np.save(folder / "weights.npy", np.zeros((54, 4971), dtype=np.float32))


def _metrics_short(folder: Path) -> None:
    with gzip.open(folder / "metrics.csv.gz", "rt") as f:
        lines = f.read().splitlines()
    with gzip.open(folder / "metrics.csv.gz", "wt") as f:
        f.write("\n".join(lines[:-1]) + "\n")


def _metrics_corrupt(folder: Path) -> None:
    data = (folder / "metrics.csv.gz").read_bytes()
    (folder / "metrics.csv.gz").write_bytes(data[: len(data) // 2])


def _metrics_unknown_activation(folder: Path) -> None:
    with gzip.open(folder / "metrics.csv.gz", "rt") as f:
        text = f.read()
    with gzip.open(folder / "metrics.csv.gz", "wt") as f:
        f.write(text.replace(",tanh,", ",elu,"))


def _delete(name: str):
    return lambda folder: (folder / name).unlink()


BAD_INPUTS = {
    "layout-shifted": (_layout_shifted, "layout.csv"),
    "layout-gap": (_layout_gap, "layout.csv"),
    "layout-missing-variable": (_layout_short, "layout.csv"),
    "layout-unknown-variable": (_layout_unknown_name, "layout.csv"),
    "layout-wrong-shape": (_layout_wrong_shape, "layout.csv"),
    "weights-truncated": (_truncate_weights, "weights.npy"),
    "weights-wrong-width": (_weights_wrong_width, "weights.npy"),
    "metrics-row-count": (_metrics_short, "metrics.csv.gz"),
    "metrics-corrupt-gzip": (_metrics_corrupt, "metrics.csv.gz"),
    "metrics-unknown-activation": (_metrics_unknown_activation, "metrics.csv.gz"),
    "missing-weights": (_delete("weights.npy"), "weights.npy"),
    "missing-layout": (_delete("layout.csv"), "layout.csv"),
    "missing-metrics": (_delete("metrics.csv.gz"), "metrics.csv.gz"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_folder_raises_naming_the_file_and_changes_nothing(case, written, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(written.folder, folder)
    damage, name = BAD_INPUTS[case]
    damage(folder)
    before = _snapshot(folder)
    with pytest.raises(CheckpointError) as info:
        load_small_cnn_zoo(folder)
    assert name in str(info.value), str(info.value)
    assert _snapshot(folder) == before


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_small_cnn_zoo(tmp_path / "nowhere")


def test_zoo_info_cli_reads_the_published_format(written, capsys):
    from symm.cli import main

    assert main(["zoo", "info", str(written.folder)]) == 0
    out = capsys.readouterr().out
    assert "Small CNN Zoo format" in out and "small-cnn-relu" in out and "positive-scaling" in out
