"""Mixture-of-Experts by gating: expert permutation (with router rows), router translation where softmax
allows it, shared experts that stay put; routing decisions move with the experts."""

from __future__ import annotations

import pytest
import torch

from symm.action import act
from symm.element import GroupElement
from symm.evaluate import functional, state_dict_of
from symm.models import TransformerConfig, TransformerLM, spec_for
from symm.testing import assert_group_axioms, assert_invariant, assert_not_invariant


GATINGS = ["dense", "topk", "top1", "sigmoid"]


def _moe(gating: str, dtype=torch.float64, shared: bool = False, router_bias: bool = False, seed: int = 0, d_shared: int = 48):
    config = TransformerConfig(
        ffn="moe", gating=gating, top_k=2, shared_expert=shared, router_bias=router_bias, n_kv_heads=2, d_shared=d_shared
    )
    torch.manual_seed(seed)
    model = TransformerLM(config).to(dtype).eval()
    params = state_dict_of(model)
    gen = torch.Generator().manual_seed(seed + 1)
    for k in params:
        if "router" in k:  # make routing decisive and non-uniform
            params[k] = params[k] * 4
    tokens = torch.randint(0, config.vocab_size, (3, 16), generator=gen)
    f = functional(model)
    return config, model, params, (lambda p: f(p, tokens))


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("router_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("gating", GATINGS)
def test_moe_function_preserved(gating, router_bias, shared, dtype):
    _, model, params, f = _moe(gating, dtype, shared, router_bias)
    spec = spec_for(model)
    assert_invariant(f, spec, params, n_samples=20)


@pytest.mark.parametrize("gating", GATINGS)
def test_translation_only_under_softmax(gating):
    _, model, _, _ = _moe(gating, router_bias=True)
    spec = spec_for(model)
    shifts = [n for n in spec.factors if n.endswith(".shift") or n.endswith(".bias_shift")]
    assert bool(shifts) == (gating != "sigmoid")
    if shifts:
        assert spec.factors["blocks.0.ffn.router.shift"].dimension == model.config.d_model


@pytest.mark.parametrize("gating", GATINGS)
def test_router_shift_control(gating):
    """Adding one vector to every router row keeps softmax gates and changes sigmoid gates."""
    _, _, params, f = _moe(gating)
    gen = torch.Generator().manual_seed(9)
    shifted = dict(params)
    for b in (0, 1):
        key = f"blocks.{b}.ffn.router.weight"
        shifted[key] = params[key] + torch.randn(params[key].shape[1], generator=gen, dtype=params[key].dtype)
    if gating == "sigmoid":
        assert_not_invariant(f, params, shifted)
    else:
        err = (f(shifted) - f(params)).abs().max() / f(params).abs().max()
        assert err < 1e-10


def test_moe_group_axioms_with_translations():
    _, model, params, _ = _moe("topk", router_bias=True, shared=True)
    assert_group_axioms(spec_for(model), params, n_samples=4)


@pytest.mark.parametrize("gating", ["topk", "top1", "sigmoid"])
def test_routing_decision_moves_with_experts(gating):
    """Selected experts after g are exactly the permuted selection before g (router-logit hooks)."""
    config, model, params, f = _moe(gating)
    spec = spec_for(model)
    k = config.top_k

    def selections(p):
        f(p)
        return [blk.ffn.last_router_logits.topk(k, dim=-1).indices.sort(-1).values for blk in model.blocks]

    before = selections(params)
    for seed in range(20):
        g = GroupElement.sample(spec, seed)
        after = selections(act(spec, params, g))
        for b, (sel_before, sel_after) in enumerate(zip(before, after)):
            perm = g.values[f"blocks.{b}.ffn.experts"]  # new expert i is old expert perm[i]
            mapped = perm[sel_after].sort(-1).values
            assert torch.equal(mapped, sel_before)


def test_permuting_shared_expert_as_if_routed_breaks():
    """Swapping the shared expert with a routed expert (as if it were one more routed expert) is not a symmetry."""
    _, _, params, f = _moe("topk", shared=True, d_shared=64)
    swapped = dict(params)
    b = "blocks.0.ffn"
    for routed, shared in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        r, s = params[f"{b}.{routed}"], params[f"{b}.shared.{shared}.weight"]
        new_r = r.clone()
        new_r[0] = s
        swapped[f"{b}.{routed}"] = new_r
        swapped[f"{b}.shared.{shared}.weight"] = r[0].clone()
    assert_not_invariant(f, params, swapped)


def test_expert_permutation_reorders_per_expert_factors():
    """Wreath structure: composing two elements reindexes per-expert unit permutations by the expert permutation."""
    _, model, params, _ = _moe("dense")
    spec = spec_for(model)
    g, h = GroupElement.sample(spec, 1), GroupElement.sample(spec, 2)
    seq = act(spec, act(spec, params, h), g)
    comp = act(spec, params, g.compose(h))
    for key in seq:
        assert torch.allclose(seq[key], comp[key], atol=1e-12)
