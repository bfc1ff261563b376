"""``symm metanet train`` / ``symm metanet eval`` in-process on a tiny zoo: outputs, reproducibility, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from symm.cli import main
from symm.zoo import SearchSpace, ZooPlan, make_zoo

TRANSFORMS = ("original", "permutation", "scale10", "scale1000")
QUICK = ["--epochs", "3", "--batch-size", "8", "--fractions", "0.6,0.2,0.2", "--seed", "0", "-q"]


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory) -> Path:
    space = SearchSpace(widths=(8,), depths=(1,), activations=("relu",), epochs=(1, 2))
    out = tmp_path_factory.mktemp("metanet_cli") / "zoo"
    make_zoo(out, ZooPlan(arch="mlp", dataset="digits", n_models=20, space=space), progress=False)
    return out


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(zoo_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("metanet_train") / "out"
    assert main(["metanet", "train", "--zoo", str(zoo_dir), "--model", "equivariant", "--select", "activation=relu",
                 "--final", *QUICK, "--out", str(out)]) == 0
    return out


def _check_metrics(metrics: dict) -> None:
    assert set(metrics) == {"train", "val", "test"}
    for split in metrics.values():
        assert set(split) == set(TRANSFORMS)
        for m in split.values():
            assert {"kendall_tau", "r2", "n"} <= set(m)


def test_train_writes_report_scatter_and_checkpoint(trained, zoo_dir):
    assert {p.name for p in trained.iterdir()} == {"report.json", "scatter.png", "model"}
    assert (trained / "scatter.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (trained / "model").iterdir()} == {"config.json", "state.safetensors"}
    report = json.loads((trained / "report.json").read_text())
    _check_metrics(report["metrics"])
    assert report["zoo"] == str(zoo_dir.resolve()) and report["selection"] == {"activation": "relu"} and report["final"]
    assert report["split"]["fractions"] == [0.6, 0.2, 0.2] and report["split"]["seed"] == 0
    assert sum(s["n"] for s in report["split"]["sizes"].values()) == 20  # final: one checkpoint per run
    assert report["model"]["type"] == "equivariant" and json.loads(report["model"]["config"]["arch"])["type"] == "MLPConfig"
    assert report["training"]["epochs"] == 3 and 0 <= report["training"]["best_epoch"] < 3
    assert {"load_s", "train_s", "eval_s", "total_s"} <= set(report["timings"])
    # the permutation-invariant metanet scores permuted networks like the originals
    t = report["metrics"]["test"]
    assert t["permutation"]["kendall_tau"] == pytest.approx(t["original"]["kendall_tau"], abs=1e-6)


def test_eval_reproduces_the_train_report(trained, zoo_dir, tmp_path):
    before = _snapshot(zoo_dir)
    assert main(["metanet", "eval", "--model", str(trained), "--zoo", str(zoo_dir), "--out", str(tmp_path / "ev")]) == 0
    train_report = json.loads((trained / "report.json").read_text())
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert (tmp_path / "ev" / "scatter.png").is_file()
    _check_metrics(report["metrics"])
    assert report["split"]["sizes"] == train_report["split"]["sizes"]
    for name in TRANSFORMS:
        for key in ("kendall_tau", "r2"):
            assert report["metrics"]["test"][name][key] == pytest.approx(train_report["metrics"]["test"][name][key], abs=1e-5)
    assert _snapshot(zoo_dir) == before


def test_baseline_train_and_eval(zoo_dir, tmp_path):
    out = tmp_path / "statnn"
    assert main(["metanet", "train", "--zoo", str(zoo_dir), "--model", "statnn", *QUICK, "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["class"] == "StatNN"
    assert main(["metanet", "eval", "--model", str(out / "model"), "--zoo", str(zoo_dir), "--out", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert again["metrics"]["test"]["scale10"]["kendall_tau"] == pytest.approx(report["metrics"]["test"]["scale10"]["kendall_tau"], abs=1e-5)


def test_quasi_train_and_eval_is_scale_invariant(zoo_dir, tmp_path):
    out = tmp_path / "q"
    assert main(["metanet", "train", "--zoo", str(zoo_dir), "--model", "quasi", "--hidden", "4", "--depth", "1", *QUICK,
                 "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["class"] == "ZooQuasiMetaNet" and report["model"]["config"]["hidden"] == 4
    t = report["metrics"]["test"]
    for name in ("permutation", "scale10", "scale1000"):  # invariant to permutations and scalings: same ranking
        assert t[name]["kendall_tau"] == pytest.approx(t["original"]["kendall_tau"], abs=1e-6)
    assert main(["metanet", "eval", "--model", str(out), "--zoo", str(zoo_dir), "--out", str(tmp_path / "ev")]) == 0
    again = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert again["metrics"]["test"]["scale1000"]["r2"] == pytest.approx(t["scale1000"]["r2"], abs=1e-5)


def test_bad_model_sizes_are_refused(zoo_dir, tmp_path, capsys):
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as info:  # argparse refuses it, naming the option
        main(["metanet", "train", "--zoo", str(zoo_dir), "--model", "quasi", "--hidden", "0", *QUICK, "--out", str(out)])
    assert info.value.code == 2
    assert "--hidden: must be at least 1" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_out_equal_to_or_inside_the_zoo_is_refused(zoo_dir, capsys):
    before = _snapshot(zoo_dir)
    for out in (zoo_dir, zoo_dir / "metanet"):
        assert main(["metanet", "train", "--zoo", str(zoo_dir), "--model", "hparams", *QUICK, "--out", str(out)]) == 2
        assert "input folder" in capsys.readouterr().err
    assert _snapshot(zoo_dir) == before and not (zoo_dir / "metanet").exists()


def test_bad_selections_fail_clearly(zoo_dir, tmp_path, capsys):
    assert main(["metanet", "train", "--zoo", str(zoo_dir), "--select", "colour=red", *QUICK, "--out", str(tmp_path / "a")]) == 2
    assert "no column 'colour'" in capsys.readouterr().err
    assert main(["metanet", "train", "--zoo", str(zoo_dir), "--select", "activation=tanh", *QUICK, "--out", str(tmp_path / "b")]) == 2
    assert "matches no rows" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_mixed_architectures_are_refused(tmp_path, capsys):
    space = SearchSpace(widths=(8,), depths=(1,), activations=("relu", "tanh"), epochs=(1,))
    make_zoo(tmp_path / "mixed", ZooPlan(arch="mlp", dataset="digits", n_models=6, space=space), progress=False)
    args = ["metanet", "train", "--zoo", str(tmp_path / "mixed"), *QUICK, "--fractions", "0.34,0.33,0.33"]
    assert main([*args, "--model", "equivariant", "--out", str(tmp_path / "o")]) == 2
    assert "--select activation=relu" in capsys.readouterr().err
    space = SearchSpace(widths=(4, 8), depths=(1,), activations=("relu",), epochs=(1,))
    make_zoo(tmp_path / "shapes", ZooPlan(arch="mlp", dataset="digits", n_models=6, space=space), progress=False)
    args = ["metanet", "train", "--zoo", str(tmp_path / "shapes"), *QUICK, "--fractions", "0.34,0.33,0.33"]
    assert main([*args, "--model", "statnn", "--out", str(tmp_path / "o")]) == 2
    assert "--select arch=" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
