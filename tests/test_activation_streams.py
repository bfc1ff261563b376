"""Activation matching of residual streams and attention heads (no fallback to weight matching for them).

Planted elements on the transformers models: the stream permutation (and its signs) and every head permutation
are decided from activations alone and equal the planted ones; the orthogonal stream from activations
(Procrustes on the normalised streams of the folded models) recovers a planted O; heads are scored by canonical
correlations, which no per-head GL changes."""

from __future__ import annotations

import json

import pytest
import torch

from aligners.activation_matching import (
    _Covariance,
    activation_matching,
    collect_activations,
    decide_from_activations,
    head_hooks,
    head_similarity,
    hookable_factors,
    stream_hooks,
    unit_hooks,
)
from aligners.orthogonal_stream import match_orthogonal_activations
from hf_models import VOCAB, build, params_of
from planted import rel_distance
from symm.action import act
from symm.adapters import spec_from_hf
from symm.cli import main
from symm.element import GroupElement
from test_orthogonal_stream import _hf, _hf_case, _plant, _rel


def _tokens(n: int = 32, length: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mixtral", "gpt2", "qwen2-moe"])
def test_streams_and_heads_decided_by_activations(name):
    model = build(name)
    spec, a = spec_from_hf(model), params_of(model)
    streams, heads = stream_hooks(spec, model), head_hooks(spec, model)
    assert list(streams) == ["stream"] and len(streams["stream"]) == 2 * 2 + 1  # every norm reads the stream
    assert len(heads) == 2
    g = GroupElement.sample(spec, 3)
    b = act(spec, a, g)
    acts = collect_activations(spec, model, a, b, _tokens(), progress=False)
    decided = decide_from_activations(spec, acts, {})
    want = g.inverse().values
    for factor in ["stream", *heads] + (["stream.sign"] if "stream.sign" in spec.factors else []):
        assert torch.equal(decided[factor], want[factor]), factor
    h = activation_matching(spec, model, a, b, _tokens(), progress=False)
    assert rel_distance(act(spec, b, h), a) <= 1e-6  # measured <= 2.2e-8


def test_gated_units_are_read_where_they_are_consumed():
    """SwiGLU units: the gate rows carry neither the scaling nor the sign, so the units are read at the down
    projection's input, silu(gate) * up, where a planted sign flip shows; the unit's own sign is decided from it."""
    model = build("llama-mqa-untied")
    spec, a = spec_from_hf(model), params_of(model)
    assert hookable_factors(spec, model)["model.layers.0.mlp.units"] == "model.layers.0.mlp.gate_proj"
    assert unit_hooks(spec, model)["model.layers.0.mlp.units"] == "in:model.layers.0.mlp.down_proj"
    g = GroupElement.sample(spec, 5, only=["model.layers.0.mlp.units", "model.layers.0.mlp.units.sign"])
    assert bool((g.values["model.layers.0.mlp.units.sign"] < 0).any())
    acts = collect_activations(spec, model, a, act(spec, a, g), _tokens(), progress=False)
    decided = decide_from_activations(spec, acts, {})
    want = g.inverse().values
    for name in ("model.layers.0.mlp.units", "model.layers.0.mlp.units.sign"):
        assert torch.equal(decided[name], want[name]), name


def test_head_similarity_is_gl_invariant():
    """Heads of B = heads of A permuted and mixed by random GL(d_h): the matched pairs score d_h (all canonical
    correlations 1); a plain correlation of the same channels does not see the match."""
    gen = torch.Generator().manual_seed(0)
    n, h, dh = 2000, 4, 3
    za = torch.randn(n, h, dh, generator=gen, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    mix = torch.randn(h, dh, dh, generator=gen, dtype=torch.float64)
    zb = torch.einsum("nhd,hed->nhe", za[:, perm], mix)
    cov = _Covariance()
    cov.add(za.reshape(n, -1), zb.reshape(n, -1))
    s = head_similarity(cov, h)
    assert torch.equal(s.argmax(0), perm)  # B's head j is A's head perm[j]
    assert torch.allclose(s[perm, torch.arange(h)], torch.full((h,), float(dh), dtype=torch.float64), atol=1e-8)
    assert float(s.max(0).values.min()) > 2 * float(s.masked_fill(torch.nn.functional.one_hot(perm, h).T.bool(), 0).max())


@pytest.mark.parametrize("name", ["llama-gqa-untied", "gpt2-untied", "mixtral"])
def test_orthogonal_stream_from_activations_planted(name):
    spec, layout, a, f = _hf_case(name)
    b = _plant(spec, layout, a, seed=7)
    result = match_orthogonal_activations(spec, layout, _hf(name), a, b, _tokens())
    aligned = result(b)
    assert _rel(f(aligned), f(b)) <= 1e-5
    assert all(torch.equal(aligned[k], a[k]) for k in layout.gains)
    assert rel_distance(aligned, a) <= 1e-4  # measured <= 1.6e-5 (GPT-2), 3.8e-6 (Mixtral)


def test_cli_orthogonal_activations(tmp_path):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "in"
    for seed, name in ((0, "a"), (1, "b")):
        build("llama-mqa-untied", seed=seed).save_pretrained(folder / name)
    out = tmp_path / "out"
    assert main(["align", str(folder / "a"), str(folder / "b"), "--method", "activations", "--out", str(out), "--quiet", "--points", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "activations" and report["stream"] == "orthogonal"  # the default where allowed
    b = AutoModelForCausalLM.from_pretrained(folder / "b")
    aligned = AutoModelForCausalLM.from_pretrained(out / "aligned_model")
    with torch.no_grad():
        assert _rel(aligned(_tokens(2, 10)).logits, b(_tokens(2, 10)).logits) <= 1e-5
