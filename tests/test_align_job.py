"""The align job end to end: digits MLPs (barrier drops), HF Llama folders (aligned output loads and keeps B's
logits), and bad input (clear error, non-zero exit, nothing written)."""

from __future__ import annotations

import json

import pytest
import torch

from aligners import activation_matching, naive_vs_aligned, weight_matching
from hf_models import VOCAB, build
from symm.adapters import load_hf
from symm.cli import main
from symm.data import digits
from symm.evaluate import state_dict_of
from symm.io import save_state_dict
from symm.models import MLP, MLPConfig, spec_for
from symm.train import evaluate_classifier, train_classifier


@pytest.fixture(scope="module")
def digits_pair(tmp_path_factory):
    """Two width-256 ReLU MLPs trained on digits with different seeds, saved as safetensors."""
    data = digits()
    folder = tmp_path_factory.mktemp("digits")
    config = MLPConfig((64, 256, 256, 10), "relu")
    models, paths = [], []
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        model = train_classifier(MLP(config), data.x_train, data.y_train, epochs=20, seed=seed, progress=False)
        models.append(model)
        paths.append(save_state_dict(state_dict_of(model), folder / f"{name}.safetensors"))
    return data, models, paths


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_independent_digits_mlps_barrier_drops(digits_pair, method):
    data, (ma, mb), _ = digits_pair
    a, b = state_dict_of(ma), state_dict_of(mb)
    spec = spec_for(ma)
    if method == "weights":
        g = weight_matching(spec, a, b, progress=False)
    else:
        g = activation_matching(spec, ma, a, b, data.x_train, progress=False)
    report = naive_vs_aligned(lambda p: evaluate_classifier(ma, p, data.x_test, data.y_test), a, b, spec.act(b, g), progress=False)
    assert report.naive.loss_barrier > 0.05
    assert report.aligned.loss_barrier < 0.3 * report.naive.loss_barrier
    # the aligned B is the same function as B
    assert evaluate_classifier(mb, spec.act(b, g), data.x_test, data.y_test) == pytest.approx(evaluate_classifier(mb, b, data.x_test, data.y_test), abs=1e-5)


def test_cli_align_state_dicts(digits_pair, tmp_path, capsys):
    _, _, (pa, pb) = digits_pair
    before = pb.read_bytes()
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet", "--points", "9", "--repair"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["loss_barrier"]["aligned"] < 0.3 * report["loss_barrier"]["naive"]
    assert report["loss_barrier"]["aligned+REPAIR"] <= report["loss_barrier"]["aligned"] + 1e-3
    assert (out / "barrier.png").stat().st_size > 10_000
    assert (out / "B_aligned.safetensors").is_file()
    assert pb.read_bytes() == before  # input untouched
    assert "loss barrier" in capsys.readouterr().out
    # a second run refuses to overwrite outputs
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet"]) == 2


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    paths = []
    for name, seed in (("A", 0), ("B", 1)):
        model = build("llama-gqa-tied", seed=seed)
        model.save_pretrained(folder / name)
        paths.append(folder / name)
    return paths


def test_cli_align_hf_llama(llama_pair, tmp_path):
    pa, pb = llama_pair
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet", "--points", "5"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["format"] == "hf"
    aligned = load_hf(out / "aligned_model")
    original = load_hf(pb)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        la, lb = aligned(tokens).logits, original(tokens).logits
    assert ((la - lb).abs().max() / lb.abs().max()).item() < 1e-5
    moved = [k for k, v in aligned.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert moved


def _assert_fails_cleanly(args, out, capsys, needle):
    assert main(args + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not out.exists()


def test_bad_inputs_fail_cleanly(digits_pair, llama_pair, tmp_path, capsys):
    _, _, (pa, pb) = digits_pair
    out = tmp_path / "never"
    # mismatched architecture
    other = save_state_dict(state_dict_of(MLP(MLPConfig((64, 128, 10)))), tmp_path / "other.safetensors")
    _assert_fails_cleanly(["align", str(pa), str(other)], out, capsys, "not the same architecture")
    # missing key
    params = state_dict_of(MLP(MLPConfig((64, 256, 256, 10))))
    params.pop("layers.2.bias")
    missing = save_state_dict(params, tmp_path / "missing.pt")
    _assert_fails_cleanly(["align", str(pa), str(missing)], out, capsys, "layers.2.bias")
    # NaN weights
    params = state_dict_of(MLP(MLPConfig((64, 256, 256, 10))))
    params["layers.1.weight"][0, 0] = float("nan")
    nan_path = tmp_path / "nan.pt"
    torch.save(params, nan_path)
    _assert_fails_cleanly(["align", str(pa), str(nan_path)], out, capsys, "NaN")
    # corrupt file
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 100)
    _assert_fails_cleanly(["align", str(pa), str(corrupt)], out, capsys, "cannot read")
    # HF folder against a state dict
    _assert_fails_cleanly(["align", str(llama_pair[0]), str(pb)], out, capsys, "Hugging Face")
    # an output that would overwrite an input is refused, even with --overwrite
    clash = tmp_path / "clash"
    clash.mkdir()
    a_copy = clash / "B_aligned.safetensors"
    a_copy.write_bytes(pa.read_bytes())
    (clash / "B.safetensors").write_bytes(pb.read_bytes())
    before = a_copy.read_bytes()
    assert main(["align", str(a_copy), str(clash / "B.safetensors"), "--out", str(clash), "--quiet", "--overwrite"]) == 2
    assert "would overwrite input" in capsys.readouterr().err
    assert a_copy.read_bytes() == before and sorted(p.name for p in clash.iterdir()) == ["B.safetensors", "B_aligned.safetensors"]


def test_repair_restores_endpoint_statistics(digits_pair):
    """After REPAIR at alpha, each hidden unit's mean and std equal the interpolated endpoint statistics."""
    from aligners import interpolate, repair
    from aligners.repair import _unit_stats

    data, (ma, mb), _ = digits_pair
    a, b = state_dict_of(ma), state_dict_of(mb)
    spec = spec_for(ma)
    b = spec.act(b, weight_matching(spec, a, b, progress=False))
    mixed = repair(spec, ma, a, b, interpolate(a, b, 0.5), 0.5, data.x_train)
    mu, sd = _unit_stats(ma, mixed, "layers.1", data.x_train)
    mu_a, sd_a = _unit_stats(ma, a, "layers.1", data.x_train)
    mu_b, sd_b = _unit_stats(ma, b, "layers.1", data.x_train)
    assert torch.allclose(mu, (mu_a + mu_b) / 2, atol=1e-4)
    assert torch.allclose(sd, (sd_a + sd_b) / 2, rtol=1e-4)
