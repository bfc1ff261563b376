"""Signed permutations of RMSNorm residual streams ({+-1}^d x S_d): function kept (reference model and the
transformers models' logits), gains untouched, negative controls, planted recovery, and ``symm align --stream``."""

from __future__ import annotations

import json

import pytest
import torch

from aligners import weight_matching
from aligners.job import stream_group, stream_signs
from hf_models import VOCAB, build, from_config, logits_fn, params_of
from planted import reference_params, rel_distance
from symm.action import act
from symm.adapters import spec_from_hf
from symm.cli import main
from symm.element import GroupElement
from symm.errors import UsageError
from symm.evaluate import functional
from symm.models import TransformerConfig, build_model, spec_for

RMS = TransformerConfig(pe="rope", n_kv_heads=2, norm="rms", tied=True)


def _signs_only(spec, seed: int) -> GroupElement:
    (sign,) = stream_signs(spec)
    return GroupElement.sample(spec, seed, only=[sign])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_catalogue_has_signs_for_rms_streams_only():
    assert stream_signs(spec_for(RMS)) == ["stream.sign"]
    assert stream_signs(spec_for(TransformerConfig(norm="layer"))) == []
    assert stream_signs(spec_from_hf(build("gpt2"))) == []  # LayerNorm centres the stream
    for name in ("llama-gqa-tied", "llama-mqa-untied", "mixtral", "qwen2-moe"):
        assert stream_signs(spec_from_hf(build(name))) == ["stream.sign"]


def test_reference_model_keeps_its_function_and_gains():
    spec = spec_for(RMS)
    model = build_model(RMS).double()
    f = functional(model)
    params = reference_params(RMS, 0)
    x = torch.randint(0, RMS.vocab_size, (3, 10), generator=torch.Generator().manual_seed(0))
    base = f(params, x)
    for seed in range(5):
        g = _signs_only(spec, seed)
        assert float(g.values["stream.sign"].min()) == -1.0  # the element really flips channels
        moved = act(spec, params, g)
        assert _rel(f(moved, x), base) <= 1e-12
        for k in params:
            if "norm" in k:
                assert torch.equal(moved[k], params[k])  # gains stay put
        # negative control: flipping the gains as well breaks the function
        broken = {k: (moved[k] * g.values["stream.sign"] if "norm" in k and moved[k].shape == (RMS.d_model,) else moved[k]) for k in moved}
        assert _rel(f(broken, x), base) > 1e-3


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mixtral"])
def test_transformers_logits_kept(name):
    model = build(name)
    spec = spec_from_hf(model)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    f = logits_fn(model, tokens)
    params = params_of(model)
    base = f(params)
    for seed in range(20):
        assert _rel(f(act(spec, params, _signs_only(spec, seed))), base) <= 1e-5


def _flip_by_hand(params: dict, s: torch.Tensor, d: int) -> dict:
    """Writers' rows and readers' columns of the stream times s, everything else (norms included) untouched."""
    moved = dict(params)
    for k, v in params.items():
        if k == "embed.weight" or k.endswith(("o_proj.weight", "fc2.weight", "ffn.w2", "down_proj.weight")) and v.shape[-2] == d:
            moved[k] = v * (s if k == "embed.weight" else s[:, None])
        elif k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "fc1.weight", "ffn.w1", "ffn.w3", "gate_proj.weight", "up_proj.weight")):
            moved[k] = v * s
    return moved


def test_layernorm_stream_has_no_signs():
    """Negative control: flips that keep an RMSNorm model's function change a LayerNorm model's."""
    s = _signs_only(spec_for(RMS), 3).values["stream.sign"].to(torch.float64)
    x = torch.randint(0, RMS.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for config, kept in ((RMS, True), (TransformerConfig(pe="rope", n_kv_heads=2, norm="layer", tied=True), False)):
        params = reference_params(config, 0)
        f = functional(build_model(config).double())
        moved = _flip_by_hand(params, s, config.d_model)
        assert sum(not torch.equal(moved[k], params[k]) for k in params) >= 4 * config.n_layers + 1
        err = _rel(f(moved, x), f(params, x))
        assert (err <= 1e-12) if kept else (err > 1e-3), (config.norm, err)


def test_planted_signs_need_the_signed_group():
    spec = spec_for(RMS)
    a = reference_params(RMS, 0)
    g = GroupElement.sample(spec, 9)
    b = act(spec, a, g)
    h = weight_matching(spec, a, b, progress=False)
    assert rel_distance(act(spec, b, h), a) <= 1e-6
    assert torch.equal(h.values["stream.sign"], g.inverse().values["stream.sign"])
    _, fixed = stream_group(spec, "permutation")
    h_perm = weight_matching(spec, a, b, fixed=fixed, progress=False)
    assert h_perm.values["stream.sign"].eq(1).all()
    assert rel_distance(act(spec, b, h_perm), a) > 1e-2  # permutations alone cannot undo the flips


def test_align_stream_option(tmp_path):
    folder = tmp_path / "in"
    for seed, name in ((0, "a"), (1, "b")):
        build("llama-gqa-tied", seed=seed).save_pretrained(folder / name)
    reports = {}
    for stream in ("signed", "permutation"):
        out = tmp_path / stream
        assert main(["align", str(folder / "a"), str(folder / "b"), "--stream", stream, "--out", str(out), "--quiet", "--points", "3"]) == 0
        reports[stream] = json.loads((out / "report.json").read_text())
        assert reports[stream]["stream"] == stream
    out = tmp_path / "default"
    assert main(["align", str(folder / "a"), str(folder / "b"), "--out", str(out), "--quiet", "--points", "3"]) == 0
    assert json.loads((out / "report.json").read_text())["stream"] == "signed"
    gpt = tmp_path / "gpt"
    for seed, name in ((0, "a"), (1, "b")):
        build("gpt2", seed=seed).save_pretrained(gpt / name)
    bad = tmp_path / "bad"
    assert main(["align", str(gpt / "a"), str(gpt / "b"), "--stream", "signed", "--out", str(bad), "--quiet"]) == 2
    assert not bad.exists()
    with pytest.raises(UsageError):
        stream_group(spec_from_hf(build("gpt2")), "signed")


def _untied_gpt2(seed: int):
    from transformers import GPT2Config

    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB, tie_word_embeddings=False)
    return from_config(config, seed)


def _is_gain(key: str) -> bool:
    return key.endswith(("layernorm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")) or key == "model.norm.weight"


@pytest.mark.parametrize("family", ["llama-mqa-untied", "gpt2-untied"])
def test_align_stream_orthogonal(tmp_path, family):
    """Untied Llama / GPT-2 folders: the aligned B loads, computes B's logits and carries A's gains; it is the
    default there; tied ones exit 2."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "in"
    for seed, name in ((0, "a"), (1, "b")):
        (_untied_gpt2(seed) if family == "gpt2-untied" else build(family, seed=seed)).save_pretrained(folder / name)
    out = tmp_path / "ortho"
    assert main(["align", str(folder / "a"), str(folder / "b"), "--out", str(out), "--quiet", "--points", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["stream"] == "orthogonal" and report["orthogonal"]["rounds"] >= 1  # the default when allowed
    a = AutoModelForCausalLM.from_pretrained(folder / "a")
    b = AutoModelForCausalLM.from_pretrained(folder / "b")
    aligned = AutoModelForCausalLM.from_pretrained(out / "aligned_model")
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert _rel(aligned(tokens).logits, b(tokens).logits) <= 1e-5
    sa, sb = a.state_dict(), aligned.state_dict()
    gains = [k for k in sa if _is_gain(k)]
    assert len(gains) == 5
    for k in gains:
        assert torch.equal(sa[k], sb[k]), k  # A's gains exactly
    if family == "gpt2-untied":
        return
    tied = tmp_path / "tied"
    for seed, name in ((0, "a"), (1, "b")):
        build("llama-gqa-tied", seed=seed).save_pretrained(tied / name)
    bad = tmp_path / "bad"
    assert main(["align", str(tied / "a"), str(tied / "b"), "--stream", "orthogonal", "--out", str(bad), "--quiet"]) == 2
    assert not bad.exists()
    assert main(["align", str(folder / "a"), str(folder / "b"), "--stream", "orthogonal", "--method", "activations",
                 "--out", str(bad), "--quiet", "--points", "3"]) == 0  # the stream O from activations
    assert json.loads((bad / "report.json").read_text())["stream"] == "orthogonal"
