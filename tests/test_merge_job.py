"""``symm merge`` end to end: three independently trained digits MLPs (merged far above the naive average), three
HF Llama folders (the merged folder loads with ``from_pretrained``), and bad input (exit 2, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from hf_models import VOCAB, build
from symm.cli import main
from symm.data import digits
from symm.evaluate import state_dict_of
from symm.io import load_state_dict, save_state_dict
from symm.models import MLP, MLPConfig
from symm.train import evaluate_classifier, train_classifier


@pytest.fixture(scope="module")
def digits_three(tmp_path_factory):
    """Three width-256 ReLU MLPs trained on digits with different seeds (init and data order)."""
    data = digits()
    folder = tmp_path_factory.mktemp("digits3")
    config = MLPConfig((64, 256, 256, 10), "relu")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        model = train_classifier(MLP(config), data.x_train, data.y_train, epochs=20, seed=seed, progress=False)
        paths.append(save_state_dict(state_dict_of(model), folder / f"m{seed}.safetensors"))
    return data, config, paths


def _snapshot(paths):
    return {str(p): (p.read_bytes() if p.is_file() else sorted(x.name for x in p.iterdir())) for p in paths}


def test_merge_three_digits_mlps(digits_three, tmp_path, capsys):
    data, config, paths = digits_three
    before = _snapshot(paths)
    out = tmp_path / "out"
    assert main(["merge", *map(str, paths), "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"merged.safetensors", "merge.png", "report.json",
                                              *(f"aligned-{i}-m{i}.safetensors" for i in range(3))}
    report = json.loads((out / "report.json").read_text())
    inputs = [m["accuracy"] for m in report["models"]]
    merged, naive = report["merged"]["accuracy"], report["naive_average"]["accuracy"]
    assert merged > naive + 0.2, (merged, naive)  # far above the naive average
    assert merged > 0.5 * min(inputs)
    assert report["rounds"] >= 1 and len(report["weights"]) == 3
    for m in report["models"]:  # each aligned copy scores exactly as its input
        assert m["aligned"]["accuracy"] == pytest.approx(m["accuracy"], abs=1e-6)
    # the merged checkpoint loads and runs, and scores what the report says
    model = MLP(config)
    model.load_state_dict(load_state_dict(out / "merged.safetensors"))
    loss, acc = evaluate_classifier(model, state_dict_of(model), data.x_test, data.y_test)
    assert acc == pytest.approx(merged, abs=1e-6)
    # every aligned copy computes its input's function
    for i, p in enumerate(paths):
        aligned = load_state_dict(out / f"aligned-{i}-m{i}.safetensors")
        orig = load_state_dict(p)
        assert evaluate_classifier(model, aligned, data.x_test, data.y_test)[1] == pytest.approx(
            evaluate_classifier(model, orig, data.x_test, data.y_test)[1], abs=1e-6)
    assert _snapshot(paths) == before
    assert "merged: loss" in capsys.readouterr().out


def test_ste_method(digits_three, tmp_path):
    _, _, paths = digits_three
    out = tmp_path / "ste"
    assert main(["merge", *map(str, paths[:2]), "--method", "ste", "--ste-steps", "5", "--rounds", "1", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "ste" and report["ste_steps"] == 5
    assert report["merged"]["accuracy"] > report["naive_average"]["accuracy"]


def test_weighted_merge_and_activation_method(digits_three, tmp_path):
    _, _, paths = digits_three
    out = tmp_path / "w"
    assert main(["merge", *map(str, paths), "--weights", "2,1,1", "--method", "activations", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["weights"] == pytest.approx([0.5, 0.25, 0.25]) and report["method"] == "activations"
    assert report["merged"]["accuracy"] > report["naive_average"]["accuracy"]


@pytest.fixture(scope="module")
def llama_three(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    paths = []
    for seed in range(3):
        model = build("llama-gqa-tied", seed=seed)
        model.save_pretrained(folder / f"llama{seed}")
        paths.append(folder / f"llama{seed}")
    return paths


def test_merge_three_hf_llama_folders(llama_three, tmp_path):
    out = tmp_path / "hf"
    before = _snapshot(llama_three)
    assert main(["merge", *map(str, llama_three), "--out", str(out), "--quiet"]) == 0
    assert {p.name for p in out.iterdir()} == {"merged_model", "merge.png", "report.json", *(f"aligned-{i}-llama{i}" for i in range(3))}
    merged = AutoModelForCausalLM.from_pretrained(out / "merged_model")
    tokens = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(merged(tokens).logits).all()
    # the aligned copy of input 1 computes input 1's logits
    ref = AutoModelForCausalLM.from_pretrained(llama_three[1])
    copy = AutoModelForCausalLM.from_pretrained(out / "aligned-1-llama1")
    with torch.no_grad():
        a, b = ref(tokens).logits, copy(tokens).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    assert _snapshot(llama_three) == before


def _fails(args, out, capsys, message):
    assert main([*args, "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_input_exits_2_and_writes_nothing(digits_three, llama_three, tmp_path, capsys):
    data, _, paths = digits_three
    out = tmp_path / "bad"
    _fails(["merge", str(paths[0])], out, capsys, "at least 2")
    other = save_state_dict(state_dict_of(MLP(MLPConfig((64, 128, 256, 10), "relu"))), tmp_path / "other.safetensors")
    _fails(["merge", str(paths[0]), str(paths[1]), str(other)], out, capsys, "other.safetensors")
    nan = load_state_dict(paths[2])
    nan["layers.0.weight"][0, 0] = float("nan")
    nan_path = tmp_path / "nan.safetensors"
    save_file(nan, str(nan_path))  # save_state_dict refuses non-finite weights; write the corrupt file directly
    _fails(["merge", str(paths[0]), str(paths[1]), str(nan_path)], out, capsys, "NaN")
    _fails(["merge", *map(str, paths), "--weights", "1,2"], out, capsys, "2 merge weights for 3")
    _fails(["merge", str(paths[0]), str(llama_three[0])], out, capsys, "Hugging Face")
    _fails(["merge", str(paths[0]), str(tmp_path / "missing.safetensors")], out, capsys, "no such file")
    _fails(["merge", *map(str, llama_three), "--method", "ste"], out, capsys, "not yet for Hugging Face")
    # an --out inside an input folder is refused
    inside = llama_three[0] / "merged"
    assert main(["merge", *map(str, llama_three), "--out", str(inside), "--quiet"]) == 2
    assert "inside the input folder" in capsys.readouterr().err and not inside.exists()
