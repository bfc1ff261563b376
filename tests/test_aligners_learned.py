"""Learned matching: continuous factors (and the stream O) fitted to the midpoint loss, permutations kept.

Planted problems on reference LMs whose training windows are sampled from A itself (so A's loss is low and a
misaligned midpoint is bad): starting from the wrong continuous element, learning lowers the held-out midpoint
loss and moves B towards A, and the aligned B always computes B's function (and carries A's gains)."""

from __future__ import annotations

import json

import pytest
import torch

from aligners.generated import sample_windows
from aligners.learned import learned_matching
from planted import reference_params, rel_distance
from symm.action import act, act_differentiable
from symm.cli import main
from symm.element import GroupElement
from symm.errors import SpecError
from symm.evaluate import functional
from symm.folding import act_orthogonal, fold, layout_for, random_orthogonal, unfold
from symm.models import TransformerConfig, build_model, spec_for

RMS = TransformerConfig(norm="rms", pe="rope", n_kv_heads=2, vocab_size=16, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_len=16)
LAYER = TransformerConfig(norm="layer", pe="learned", vocab_size=16, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_len=16)


def _case(config):
    model = build_model(config).double().eval()
    a = reference_params(config, 0)
    a = {k: 3 * v if v.dim() >= 2 else v for k, v in a.items()}  # larger weights: peaked predictions
    return spec_for(config), model, a, sample_windows(model, [a], 48, 12, seed=0, temperature=0.5)  # peaked


def _continuous_only(spec, seed: int, scale: float = 0.5) -> GroupElement:
    """exp(scale * xi) on every continuous factor, discrete factors at the identity."""
    gen = torch.Generator().manual_seed(seed)
    values = {}
    for n, f in spec.factors.items():
        if f.is_continuous and f.dimension > 0:
            values[n] = f.exp(scale * torch.randn(f.identity().shape, generator=gen, dtype=torch.float64))
        else:
            values[n] = f.identity()
    return GroupElement(spec, values)


def _logits(model, params, windows):
    with torch.no_grad():
        return functional(model)({k: v.double() for k, v in params.items()}, windows[:, :-1])


def test_act_differentiable_matches_act_and_has_gradients():
    spec, _, a, _ = _case(RMS)
    g = GroupElement.sample(spec, 3)
    values = {n: v.clone().requires_grad_(spec.factors[n].is_continuous) for n, v in g.values.items()}
    moved = act_differentiable(spec, a, values)
    reference = act(spec, a, g)
    assert max(float((moved[k].detach() - reference[k]).abs().max()) for k in a) <= 1e-12
    sum(v.pow(2).sum() for v in moved.values()).backward()
    grads = [values[n].grad for n in values if spec.factors[n].is_continuous]
    assert grads and all(x is not None and bool(x.abs().sum() > 0) for x in grads)


def test_learned_recovers_continuous_factors():
    """B = h . A with h continuous only; from the identity, learning lowers the midpoint loss and moves B to A."""
    spec, model, a, windows = _case(RMS)
    h = _continuous_only(spec, 1)
    b = act(spec, a, h)
    assert rel_distance(b, a) > 0.3
    result = learned_matching(spec, model, a, b, windows, init=GroupElement.identity(spec), steps=80, lr=3e-2, eval_every=10)
    aligned = result(b)
    assert float((_logits(model, aligned, windows) - _logits(model, b, windows)).abs().max()) <= 1e-9
    assert result.best_loss < result.start_loss - 0.3, (result.start_loss, result.best_loss)  # measured 1.92 -> 1.21
    assert rel_distance(aligned, a) < 0.95 * rel_distance(b, a)  # measured 0.467 -> 0.388 (the loss, not the distance, is fitted)
    for n, f in spec.factors.items():  # discrete factors untouched
        if not f.is_continuous:
            assert torch.equal(result.g.values[n], f.identity())


def test_learned_orthogonal_stream_layernorm():
    """A LayerNorm stream rotated by O (O 1 = 1) and re-gained; from O0 = I, learning rotates back towards A and
    the aligned B keeps B's function, carries A's gains and keeps O 1 = 1."""
    spec, model, a, windows = _case(LAYER)
    layout = layout_for(LAYER, a)
    O = random_orthogonal(layout.d, torch.Generator().manual_seed(4), centred=True)
    gen = torch.Generator().manual_seed(5)
    gains_b = {g: 0.5 + torch.rand(layout.d, generator=gen, dtype=torch.float64) for g in layout.gains}
    b = unfold(act_orthogonal(fold(a, layout), layout, O), layout, gains_b)
    identity = torch.eye(layout.d, dtype=torch.float64)
    result = learned_matching(
        spec, model, a, b, windows, init=GroupElement.identity(spec), layout=layout, O=identity, steps=80, lr=3e-2, eval_every=10
    )
    aligned = result(b)
    assert float((_logits(model, aligned, windows) - _logits(model, b, windows)).abs().max()) <= 1e-9
    assert all(torch.equal(aligned[k], a[k]) for k in layout.gains)
    ones = torch.ones(layout.d, dtype=torch.float64)
    assert float((result.O @ ones - ones).abs().max()) <= 1e-10
    assert result.best_loss < result.start_loss - 0.3, (result.start_loss, result.best_loss)  # measured 1.86 -> 1.00
    assert rel_distance(aligned, a) < 0.95 * rel_distance(b, a)


def test_learned_keeps_the_start_when_it_is_exact():
    """A planted full element recovered by weight matching: the kept element is never worse than the start on
    held-out windows, and learning only nudges it (a midpoint can fit the windows slightly better than A itself)."""
    from aligners import weight_matching

    spec, model, a, windows = _case(RMS)
    b = act(spec, a, GroupElement.sample(spec, 2))
    g0 = weight_matching(spec, a, b, progress=False)
    result = learned_matching(spec, model, a, b, windows, init=g0, steps=20, eval_every=5)
    assert result.best_loss <= result.start_loss  # measured 1.2465 -> 1.2409
    assert rel_distance(result(b), a) <= 0.1  # measured 0.032


def test_learned_refuses_bad_arguments():
    spec, model, a, windows = _case(RMS)
    identity = GroupElement.identity(spec)
    with pytest.raises(SpecError, match="lambda"):
        learned_matching(spec, model, a, a, windows, init=identity, lam=(0.7, 0.3))
    with pytest.raises(SpecError, match="layout"):
        learned_matching(spec, model, a, a, windows, init=identity, O=torch.eye(16))
    with pytest.raises(SpecError, match="windows"):
        learned_matching(spec, model, a, a, windows[:1], init=identity)


def _learned_on_llama_folders(tmp_path, *options: str) -> tuple:
    """``symm align --method learned OPTIONS`` on two untied Llama folders: (input folder, output folder, report)."""
    from hf_models import build

    folder = tmp_path / "in"
    for seed, name in ((0, "a"), (1, "b")):
        build("llama-mqa-untied", seed=seed).save_pretrained(folder / name)
    out = tmp_path / "learned"
    assert main(["align", str(folder / "a"), str(folder / "b"), "--method", "learned", *options, "--out", str(out),
                 "--quiet", "--points", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "learned" and report["stream"] == "orthogonal"
    assert report["learned"]["best_midpoint_loss"] <= report["learned"]["start_midpoint_loss"]
    return folder, out, report


def _check_aligned_folder(folder, out) -> None:
    """The written aligned B loads with from_pretrained, computes B's logits and carries A's norm gains exactly."""
    from transformers import AutoModelForCausalLM

    from hf_models import VOCAB

    a = AutoModelForCausalLM.from_pretrained(folder / "a")
    b = AutoModelForCausalLM.from_pretrained(folder / "b")
    aligned = AutoModelForCausalLM.from_pretrained(out / "aligned_model")
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lb, la = b(tokens).logits.double(), aligned(tokens).logits.double()
    assert float((la - lb).abs().max() / lb.abs().max()) <= 1e-5
    sa, sb = a.state_dict(), aligned.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.endswith("norm.weight"))


def test_cli_learned_on_hf_folders(tmp_path, capsys):
    """``symm align --method learned``: untied Llama folders, orthogonal stream by default; the aligned B loads,
    computes B's logits and carries A's gains; the report records the learning; bad combinations exit 2 with
    nothing written."""
    folder, out, report = _learned_on_llama_folders(tmp_path, "--learn-steps", "40")
    assert report["learned"]["windows"]["source"] == "text"
    _check_aligned_folder(folder, out)
    mlp = tmp_path / "mlp"
    mlp.mkdir()
    for name in ("a", "b"):
        torch.save({"0.weight": torch.randn(8, 64), "0.bias": torch.randn(8), "2.weight": torch.randn(10, 8), "2.bias": torch.randn(10)},
                   mlp / f"{name}.pt")
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main(["align", str(mlp / "a.pt"), str(mlp / "b.pt"), "--method", "learned", "--out", str(bad), "--quiet"]) == 2
    assert main(["align", str(mlp / "a.pt"), str(mlp / "b.pt"), "--method", "learned", "--learn-from", "generated", "--out", str(bad),
                 "--quiet"]) == 2
    assert "needs causal language models" in capsys.readouterr().err
    assert main(["align", str(folder / "a"), str(folder / "b"), "--learn-from", "generated", "--out", str(bad), "--quiet"]) == 2
    assert "does nothing with --method weights" in capsys.readouterr().err
    assert not bad.exists()


def test_cli_learned_from_generated_windows(tmp_path):
    """``--learn-from generated``: no text is read for learning (windows sampled from A and B, recorded in the
    report); the aligned B still computes B's logits and carries A's gains."""
    folder, out, report = _learned_on_llama_folders(tmp_path, "--learn-from", "generated", "--learn-steps", "30")
    windows = report["learned"]["windows"]
    assert windows["source"] == "generated" and windows["count"] >= 2 and windows["tokens"] >= 2
    _check_aligned_folder(folder, out)
