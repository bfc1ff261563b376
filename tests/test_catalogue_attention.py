"""Attention under each positional encoding, GQA, and their negative controls (reference transformer LM)."""

from __future__ import annotations

import pytest
import torch

from symm.action import act
from symm.element import GroupElement
from symm.evaluate import functional, state_dict_of
from symm.models import TransformerConfig, TransformerLM, spec_for
from symm.testing import assert_group_axioms, assert_invariant, assert_not_invariant

CASES = {
    "none": TransformerConfig(pe="none", n_kv_heads=2),
    "sinusoidal": TransformerConfig(pe="sinusoidal", n_kv_heads=2),
    "learned": TransformerConfig(pe="learned", n_kv_heads=2, attn_bias=True),
    "rope-half": TransformerConfig(pe="rope", rope_layout="half", n_kv_heads=2),
    "rope-interleaved": TransformerConfig(pe="rope", rope_layout="interleaved", n_kv_heads=2, attn_bias=True),
    "rope-mha-tied-rms": TransformerConfig(pe="rope", tied=True, norm="rms"),
    "gqa-1kv-gelu": TransformerConfig(pe="learned", n_kv_heads=1, ffn="gelu"),
}


def _model(config: TransformerConfig, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    model = TransformerLM(config).to(dtype).eval()
    params = state_dict_of(model)
    gen = torch.Generator().manual_seed(seed + 1)
    for k, v in params.items():
        if "norm" in k:  # non-trivial norm gains/biases
            params[k] = v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    tokens = torch.randint(0, config.vocab_size, (3, 16), generator=gen)
    f = functional(model)
    return model, params, (lambda p: f(p, tokens))


@pytest.mark.parametrize("name", list(CASES))
def test_attention_function_preserved(name, dtype):
    config = CASES[name]
    model, params, f = _model(config, dtype)
    spec = spec_for(model)
    assert_invariant(f, spec, params, n_samples=20)


@pytest.mark.parametrize("name", ["none", "rope-half"])
def test_attention_group_axioms(name):
    model, params, _ = _model(CASES[name], torch.float64)
    assert_group_axioms(spec_for(model), params, n_samples=3)


@pytest.mark.parametrize("pe", ["none", "sinusoidal", "learned", "rope"])
def test_qk_dimension_matches_theory(pe):
    c = TransformerConfig(pe=pe, d_model=48, n_heads=6, n_kv_heads=3, head_dim=8)
    spec = spec_for(c)
    qk, vo = spec.factors["blocks.0.attn.qk"], spec.factors["blocks.0.attn.vo"]
    dh, kv = 8, 3
    assert qk.dimension == kv * (dh if pe == "rope" else dh * dh)
    assert vo.dimension == kv * dh * dh
    per_layer = qk.dimension + vo.dimension + c.d_ff  # + SwiGLU up/down scaling
    assert spec.dimension == c.n_layers * per_layer
    assert ("stream" in spec.factors) == (pe != "sinusoidal")


def _permute_head_dims(params, config, perm, blocks=(0, 1)):
    """Apply the same permutation of head dims to Q rows and K rows of every head (a symmetry without RoPE)."""
    out = dict(params)
    dh = config.dh
    for b in blocks:
        for key, heads in (("q_proj", config.n_heads), ("k_proj", config.kv_heads)):
            name = f"blocks.{b}.attn.{key}.weight"
            w = out[name].reshape(heads, dh, -1)
            out[name] = w[:, perm].reshape(heads * dh, -1)
    return out


def test_qk_dim_permutation_is_a_symmetry_without_rope(dtype):
    config = CASES["none"]
    _, params, f = _model(config, dtype)
    perm = torch.randperm(config.dh, generator=torch.Generator().manual_seed(3))
    moved = _permute_head_dims(params, config, perm)
    err = (f(moved) - f(params)).abs().max() / f(params).abs().max()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-10)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_qk_dim_permutation_breaks_rope(layout):
    config = TransformerConfig(pe="rope", rope_layout=layout, n_kv_heads=2)
    _, params, f = _model(config, torch.float64)
    perm = torch.randperm(config.dh, generator=torch.Generator().manual_seed(3))
    assert_not_invariant(f, params, _permute_head_dims(params, config, perm))


def test_wrong_rope_layout_breaks_function():
    """A rotation-scaling built for the other pair layout is not a symmetry."""
    model, params, f = _model(CASES["rope-half"], torch.float64)
    wrong = spec_for(TransformerConfig(pe="rope", rope_layout="interleaved", n_kv_heads=2))
    g = GroupElement.sample(wrong, 5, only=[n for n in wrong.factors if n.endswith(".qk")])
    assert_not_invariant(f, params, act(wrong, params, g))


def _swap_query_heads(params, config, a, b):
    """Swap query heads a and b in Q rows and O columns only (K and V untouched)."""
    out = dict(params)
    dh = config.dh
    idx = torch.arange(config.n_heads)
    idx[a], idx[b] = b, a
    rows = (idx.unsqueeze(1) * dh + torch.arange(dh)).reshape(-1)
    for blk in range(config.n_layers):
        q = f"blocks.{blk}.attn.q_proj.weight"
        o = f"blocks.{blk}.attn.o_proj.weight"
        out[q] = params[q][rows]
        out[o] = params[o][:, rows]
    return out


def test_query_head_moves_only_within_its_kv_group(dtype):
    config = CASES["rope-half"]  # 4 query heads, 2 KV groups: heads {0,1} and {2,3}
    _, params, f = _model(config, dtype)
    within = _swap_query_heads(params, config, 0, 1)
    err = (f(within) - f(params)).abs().max() / f(params).abs().max()
    assert err <= (1e-5 if dtype == torch.float32 else 1e-10)
    assert_not_invariant(f, params, _swap_query_heads(params, config, 0, 2))


def test_head_permutation_samples_respect_kv_groups():
    spec = spec_for(CASES["gqa-1kv-gelu"])
    heads = spec.factors["blocks.0.attn.heads"]
    assert heads.groups == 1 and heads.heads_per_group == 4
    spec2 = spec_for(CASES["rope-half"])
    factor = spec2.factors["blocks.0.attn.heads"]
    for seed in range(20):
        perm = GroupElement.sample(spec2, seed).values["blocks.0.attn.heads"]
        assert torch.equal(perm // 2, (perm // 2).reshape(2, 2)[:, :1].expand(2, 2).reshape(-1))
        factor.check_element(perm)


def test_sinusoidal_stream_cannot_be_permuted(dtype):
    """A fixed additive PE table pins the residual stream: permuting it (as learned PE allows) breaks the function."""
    _, params, f = _model(CASES["sinusoidal"], dtype)
    learned_spec = spec_for(TransformerConfig(pe="none", n_kv_heads=2))
    g = GroupElement.sample(learned_spec, 1, only=["stream"])
    assert_not_invariant(f, params, act(learned_spec, params, g))
