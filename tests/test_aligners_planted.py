"""Planted-element recovery: align theta against g.theta (random g, continuous factors included) for every
catalogue entry and HF family; the aligned interpolation path is flat and permutation factors equal g^{-1}."""

from __future__ import annotations

import pytest
import torch

from aligners import MatchInfo, lmc_curve, weight_matching
from hf_models import VOCAB, build, configs, params_of
from symm.action import act
from symm.adapters import spec_from_hf
from symm.element import GroupElement
from symm.evaluate import functional, state_dict_of
from symm.models import (
    CNNConfig,
    MLPConfig,
    ResidualCNNConfig,
    ResidualMLPConfig,
    TransformerConfig,
    build_model,
    spec_for,
)

ENTRIES = {
    "mlp-relu": MLPConfig((64, 32, 32, 10), "relu"),
    "mlp-leaky": MLPConfig((64, 32, 32, 10), "leaky_relu"),
    "mlp-tanh": MLPConfig((64, 32, 32, 10), "tanh"),
    "mlp-gelu": MLPConfig((64, 32, 32, 10), "gelu"),
    "mlp-silu": MLPConfig((64, 32, 32, 10), "silu"),
    "mlp-swiglu": MLPConfig((64, 32, 32, 10), "swiglu"),
    "cnn-bn": CNNConfig(norm="batch"),
    "cnn-gn": CNNConfig(norm="group"),
    "cnn-none-tanh": CNNConfig(norm="none", activation="tanh"),
    "resmlp": ResidualMLPConfig(),
    "rescnn": ResidualCNNConfig(),
    "lm-none": TransformerConfig(pe="none", n_kv_heads=2),
    "lm-sinusoidal": TransformerConfig(pe="sinusoidal", n_kv_heads=2, ffn="relu"),
    "lm-learned": TransformerConfig(pe="learned", attn_bias=True, ffn="gelu"),
    "lm-rope-half": TransformerConfig(pe="rope", n_kv_heads=2, norm="rms", tied=True),
    "lm-rope-interleaved": TransformerConfig(pe="rope", rope_layout="interleaved", n_kv_heads=1),
    "moe-dense": TransformerConfig(ffn="moe", gating="dense", router_bias=True),
    "moe-topk-shared": TransformerConfig(ffn="moe", gating="topk", shared_expert=True),
    "moe-top1": TransformerConfig(ffn="moe", gating="top1"),
    "moe-sigmoid": TransformerConfig(ffn="moe", gating="sigmoid", shared_expert=True),
}


def _inputs(config):
    gen = torch.Generator().manual_seed(5)
    if isinstance(config, TransformerConfig):
        return torch.randint(0, config.vocab_size, (4, 16), generator=gen)
    return torch.randn(32, 64, generator=gen, dtype=torch.float64)


def _loss_fn(f, x):
    def evaluate(params):
        with torch.no_grad():
            out = f(params, x)
        return float(out.double().pow(2).mean()), 0.0

    return evaluate


def _check_recovery(spec, params, evaluate, seed=11, barrier_tol=1e-6):
    g = GroupElement.sample(spec, seed)
    planted = act(spec, params, g)
    info = MatchInfo()
    h = weight_matching(spec, params, planted, progress=False, info=info, seed=seed)
    assert info.converged
    g_inv = g.inverse()
    for name in spec.permutation_factors:
        assert torch.equal(h.values[name], g_inv.values[name]), f"factor {name} not recovered"
    aligned = act(spec, planted, h)
    curve = lmc_curve(evaluate, params, aligned, n_points=9, progress=False)
    scale = max(1.0, abs(curve.loss[0]))
    assert curve.loss_barrier <= barrier_tol * scale
    assert max(abs(v - curve.loss[0]) for v in curve.loss) <= barrier_tol * scale  # the aligned path is flat
    naive = lmc_curve(evaluate, params, planted, n_points=9, progress=False)
    assert max(abs(v - naive.loss[0]) for v in naive.loss) > 1e-4 * abs(naive.loss[0])  # the planted g moved the weights


@pytest.mark.parametrize("name", list(ENTRIES))
def test_planted_recovery_catalogue(name):
    config = ENTRIES[name]
    torch.manual_seed(0)
    model = build_model(config).double().eval()
    params = state_dict_of(model)
    gen = torch.Generator().manual_seed(1)
    for k, v in params.items():
        if "running_var" in k:
            params[k] = v + torch.rand(v.shape, generator=gen, dtype=v.dtype)
        elif torch.is_floating_point(v) and ("norm" in k or "running_mean" in k):
            params[k] = v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    _check_recovery(spec_for(model), params, _loss_fn(functional(model), _inputs(config)))


@pytest.mark.parametrize("name", list(configs()))
def test_planted_recovery_hf(name):
    model = build(name)
    params = params_of(model)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))

    def evaluate(p):
        model.load_state_dict(p)
        with torch.no_grad():
            return float(model(tokens).logits.double().pow(2).mean()), 0.0

    _check_recovery(spec_from_hf(model), params, evaluate, barrier_tol=1e-6)
