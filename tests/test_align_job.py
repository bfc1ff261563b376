"""The align job end to end: digits MLPs (barrier drops), HF Llama folders (aligned output loads and keeps B's
logits), and bad input (clear error, non-zero exit, nothing written)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from aligners import activation_matching, naive_vs_aligned, weight_matching
from hf_models import VOCAB, build
from symm.action import act
from symm.adapters import load_hf
from symm.cli import main
from symm.data import digits
from symm.element import GroupElement
from symm.evaluate import functional, state_dict_of
from symm.io import load_state_dict, save_state_dict
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
    report = naive_vs_aligned(lambda p: evaluate_classifier(ma, p, data.x_test, data.y_test), a, b, act(spec, b, g), progress=False)
    assert report.naive.loss_barrier > 0.05
    assert report.aligned.loss_barrier < 0.3 * report.naive.loss_barrier
    # the aligned B is the same function as B
    assert evaluate_classifier(mb, act(spec, b, g), data.x_test, data.y_test) == pytest.approx(evaluate_classifier(mb, b, data.x_test, data.y_test), abs=1e-5)


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
    b = act(spec, b, weight_matching(spec, a, b, progress=False))
    mixed = repair(spec, ma, a, b, interpolate(a, b, 0.5), 0.5, data.x_train)
    mu, sd = _unit_stats(ma, mixed, "layers.1", data.x_train)
    mu_a, sd_a = _unit_stats(ma, a, "layers.1", data.x_train)
    mu_b, sd_b = _unit_stats(ma, b, "layers.1", data.x_train)
    assert torch.allclose(mu, (mu_a + mu_b) / 2, atol=1e-4)
    assert torch.allclose(sd, (sd_a + sd_b) / 2, rtol=1e-4)


# ---- silent wrong answers (issue 11, items 4-6) -------------------------------------------------------------


def _save_sequential(folder, name: str, act: nn.Module, sizes=(64, 32, 32, 10), seed: int = 0, fmt: str = "safetensors", dtype=torch.float32):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(act)
    model = nn.Sequential(*layers).to(dtype).eval()
    path = folder / f"{name}.{fmt}"
    params = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(params, path) if fmt == "safetensors" else torch.save(params, path)
    return model, path


def _relative_output_error(model: nn.Module, params_a, params_b) -> float:
    """max |f(a) - f(b)| / max |f(b)| on digits, evaluated in float64."""
    x = digits().x_test[:200].double()
    m = model.double()
    with torch.no_grad():
        ya = functional(m)({k: v.double() for k, v in params_a.items()}, x)
        yb = functional(m)({k: v.double() for k, v in params_b.items()}, x)
    return float((ya - yb).abs().max() / yb.abs().max())


@pytest.mark.parametrize("act", [nn.GELU(), nn.Tanh(), nn.SiLU()], ids=["gelu", "tanh", "silu"])
def test_unknown_activation_uses_permutations_only(tmp_path, capsys, act):
    """A bare state dict of a non-ReLU chain: the written B_aligned is B's function (no ReLU scalings assumed)."""
    model, pa = _save_sequential(tmp_path, "A", act, seed=0)
    _, pb = _save_sequential(tmp_path, "B", act, seed=1)
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet", "--points", "3"]) == 0
    printed = capsys.readouterr().out
    assert "permutations only" in printed and "barrier evaluated with relu" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["continuous_dimension"] == 0 and report["spec"]["name"].endswith("-any")
    aligned = load_state_dict(out / "B_aligned.safetensors")
    b = load_state_dict(pb)
    assert any(not torch.equal(aligned[k], b[k]) for k in b)  # B was moved ...
    assert _relative_output_error(model, aligned, b) < 1e-6  # ... and is still B's function


@pytest.mark.parametrize("flag,kind", [("relu", "positive-scaling"), ("tanh", "sign-flip")])
def test_activation_flag_adds_its_group(tmp_path, flag, kind):
    act = {"relu": nn.ReLU(), "tanh": nn.Tanh()}[flag]
    model, pa = _save_sequential(tmp_path, "A", act, seed=0)
    _, pb = _save_sequential(tmp_path, "B", act, seed=1)
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet", "--points", "3", "--activation", flag]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["spec"]["name"].endswith(f"-{flag}") and "barrier evaluated with relu" not in report["models"]["architecture"]
    assert _relative_output_error(model, load_state_dict(out / "B_aligned.safetensors"), load_state_dict(pb)) < 1e-5


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("sizes", [(64, 32, 32, 32, 32, 32, 10), (64, 10, 10, 10, 10, 10, 10)], ids=["w32", "w10"])
def test_six_layer_sequential_keeps_its_layer_order(tmp_path, capsys, fmt, sizes):
    """safetensors stores 10.weight before 2.weight; the chain (and the aligned B's function) must not care.

    w32 was refused with a wrong diagnosis; w10 chains in the string order too and was silently mis-aligned."""
    model, pa = _save_sequential(tmp_path, "A", nn.ReLU(), sizes, seed=0, fmt=fmt)
    _, pb = _save_sequential(tmp_path, "B", nn.ReLU(), sizes, seed=1, fmt=fmt)
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet", "--points", "3", "--activation", "relu"]) == 0
    assert "layer order 0, 2, 4, 6, 8, 10" in capsys.readouterr().out
    aligned = load_state_dict(out / f"B_aligned.{fmt}")
    assert _relative_output_error(model, aligned, load_state_dict(pb)) < 1e-5


def test_planted_wrong_spec_is_refused_before_writing(tmp_path, capsys, monkeypatch):
    """A tanh chain aligned with a ReLU spec (scalings are not a tanh symmetry): exit 2, nothing written."""
    import dataclasses

    from aligners import job

    real_infer = job.infer_spec
    monkeypatch.setattr(job, "infer_spec", lambda params, activation=None: dataclasses.replace(real_infer(params, "relu"), activation="tanh"))
    _, pa = _save_sequential(tmp_path, "A", nn.Tanh(), seed=0)
    _, pb = _save_sequential(tmp_path, "B", nn.Tanh(), seed=1)
    before = pb.read_bytes()
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet", "--points", "3", "--activation", "tanh"]) == 2
    err = capsys.readouterr().err
    assert "does not compute B's function" in err and "worst output error" in err and "Nothing was written" in err
    assert not out.exists() and pb.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A.safetensors", "B.safetensors"]


def test_planted_spec_that_forgets_a_parameter_is_refused_for_hf(llama_pair, tmp_path, capsys, monkeypatch):
    """An action that leaves one consumer untouched (a typical catalogue bug): the HF folder is not written."""
    from aligners import job

    forget = "model.layers.0.mlp.down_proj.weight"
    monkeypatch.setattr(job, "act", lambda spec, params, g: {**act(spec, params, g), forget: params[forget].clone()})
    monkeypatch.setattr(job, "_match", lambda method, spec, *args: GroupElement.sample(spec, 0))
    out = tmp_path / "out"
    assert main(["align", str(llama_pair[0]), str(llama_pair[1]), "--out", str(out), "--quiet", "--points", "3"]) == 2
    assert "does not compute B's function" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ---- dtypes, names, paths, messages --------------------------------------------------------------------------


@pytest.mark.parametrize("precision", [torch.float16, torch.bfloat16, torch.float64], ids=["float16", "bfloat16", "float64"])
def test_low_and_high_precision_pairs(tmp_path, precision):
    dtype = precision
    model, pa = _save_sequential(tmp_path, "A", nn.ReLU(), dtype=dtype, seed=0)
    _, pb = _save_sequential(tmp_path, "B", nn.ReLU(), dtype=dtype, seed=1)
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet", "--points", "3", "--activation", "relu"]) == 0
    aligned = load_state_dict(out / "B_aligned.safetensors")
    assert {v.dtype for v in aligned.values()} == {dtype}
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["dtype"] == str(dtype)[6:]
    assert report["function_check"]["evaluated_in"] == ("float64" if dtype == torch.float64 else "float32")
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}[dtype]
    assert _relative_output_error(model, aligned, load_state_dict(pb)) < tol


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_outputs_respect_the_umask(llama_pair, digits_pair, tmp_path, mask):
    old = os.umask(mask)
    try:
        hf_out, sd_out = tmp_path / "hf", tmp_path / "sd"
        assert main(["align", str(llama_pair[0]), str(llama_pair[1]), "--out", str(hf_out), "--quiet", "--points", "3"]) == 0
        assert main(["align", *map(str, digits_pair[2]), "--out", str(sd_out), "--quiet", "--points", "3"]) == 0
    finally:
        os.umask(old)
    for root in (hf_out, sd_out):
        for p in [root, *root.rglob("*")]:
            want = (0o777 if p.is_dir() else 0o666) & ~mask
            assert p.stat().st_mode & 0o777 == want, f"{p}: {oct(p.stat().st_mode & 0o777)} != {oct(want)}"
