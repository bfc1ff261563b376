"""Residual catalogue entries: one stream permutation shared by every writer/reader, norms moving with it."""

from __future__ import annotations

import pytest
import torch

from symm import Fragment, GroupElement, Permutation, PositiveScaling, Spec, coupled_factors, testing
from symm.action import act
from symm.catalogue import layernorm, linear, mlp
from symm.catalogue.units import Units
from symm.models import ResidualCNNConfig, ResidualMLPConfig, spec_for

MLP_CASES = {
    "ln-relu": ResidualMLPConfig(norm=True, activation="relu"),
    "noln-relu": ResidualMLPConfig(norm=False, activation="relu"),
    "ln-tanh": ResidualMLPConfig(norm=True, activation="tanh"),
    "noln-gelu": ResidualMLPConfig(norm=False, activation="gelu"),
    "ln-leaky_relu-3blocks": ResidualMLPConfig(d_model=16, d_hidden=24, n_blocks=3, norm=True, activation="leaky_relu"),
}
CNN_CASES = {
    "relu": ResidualCNNConfig(activation="relu"),
    "tanh": ResidualCNNConfig(activation="tanh"),
    "relu-1block-wide": ResidualCNNConfig(width=6, hidden=12, n_blocks=1, activation="relu"),
}


@pytest.mark.parametrize("config", list(MLP_CASES.values()), ids=list(MLP_CASES))
def test_residual_mlp_preserves_function(make_case, check_preserved, config, dtype):
    case = make_case(config, dtype)
    if config.norm:
        assert not torch.allclose(case.params["blocks.0.norm.weight"], torch.ones(config.d_model, dtype=dtype))
    check_preserved(case)


@pytest.mark.parametrize("config", list(MLP_CASES.values()), ids=list(MLP_CASES))
def test_residual_mlp_group_axioms(make_case, check_axioms, config, dtype):
    case = make_case(config, dtype)
    check_axioms(case.spec, case.params, dtype)


@pytest.mark.parametrize("config", list(CNN_CASES.values()), ids=list(CNN_CASES))
def test_residual_cnn_preserves_function(make_case, check_preserved, config, dtype):
    case = make_case(config, dtype)
    assert not torch.allclose(case.params["blocks.0.norm2.running_mean"], torch.zeros(config.width, dtype=dtype))
    check_preserved(case)


@pytest.mark.parametrize("config", list(CNN_CASES.values()), ids=list(CNN_CASES))
def test_residual_cnn_group_axioms(make_case, check_axioms, config, dtype):
    case = make_case(config, dtype)
    check_axioms(case.spec, case.params, dtype)


def test_residual_group_dimensions():
    assert spec_for(ResidualMLPConfig(d_hidden=64, n_blocks=2, activation="relu")).dimension == 128
    assert spec_for(ResidualMLPConfig(activation="gelu")).dimension == 0
    assert spec_for(ResidualCNNConfig(hidden=16, n_blocks=2, activation="relu")).dimension == 32
    assert spec_for(ResidualCNNConfig(activation="tanh")).dimension == 0


@pytest.mark.parametrize("norm", [True, False], ids=["ln", "noln"])
def test_stream_is_one_shared_permutation(norm):
    spec = spec_for(ResidualMLPConfig(norm=norm))
    assert type(spec.factors["stream"]) is Permutation and spec.factors["stream"].parent is None
    users = {p for p, *_ in spec.uses("stream")}
    expected = {"embed.weight", "embed.bias", "head.weight"}
    for i in range(2):
        expected |= {f"blocks.{i}.fc1.weight", f"blocks.{i}.fc2.weight", f"blocks.{i}.fc2.bias"}
        if norm:
            expected |= {f"blocks.{i}.norm.weight", f"blocks.{i}.norm.bias"}
    if norm:
        expected |= {"norm.weight", "norm.bias"}
    assert users == expected
    # no child factor hangs under the stream: the stream carries only the permutation
    assert not [n for n, f in spec.factors.items() if f.parent == "stream"]
    (component,) = coupled_factors(spec)
    assert "stream" in component and "blocks.1.fc1.units.scale" in component


# ----- negative controls ------------------------------------------------------------------------------


def test_stream_permuted_without_layernorm_gain_breaks(make_case):
    case = make_case(ResidualMLPConfig(norm=True), torch.float64)
    g = GroupElement.sample(case.spec, 0, only=["stream"])
    moved = act(case.spec, case.params, g)
    assert testing.relative_error(case.f(moved), case.f(case.params)) < 1e-10
    for k in ("blocks.0.norm.weight", "blocks.1.norm.bias", "norm.weight"):
        broken = dict(moved)
        broken[k] = case.params[k]
        testing.assert_not_invariant(case.f, case.params, broken)


def test_stream_permuted_without_a_reader_breaks(make_case):
    case = make_case(ResidualMLPConfig(norm=False), torch.float64)
    moved = act(case.spec, case.params, GroupElement.sample(case.spec, 1, only=["stream"]))
    broken = dict(moved)
    broken["blocks.1.fc1.weight"] = case.params["blocks.1.fc1.weight"]
    testing.assert_not_invariant(case.f, case.params, broken)


def _stream_scaled_spec(c: ResidualMLPConfig) -> Spec:
    """The residual MLP with a per-unit positive scaling added to the stream (a wrong symmetry under LayerNorm)."""
    s = Units(Permutation("stream", c.d_model), (PositiveScaling("stream.scale", c.d_model, parent="stream"),))
    frag = Fragment.of(s.factors) + linear("embed", c.d_model, c.d_in, s.out(), None)
    for i in range(c.n_blocks):
        if c.norm:
            frag = frag + layernorm(f"blocks.{i}.norm", s)
        frag = frag + mlp([f"blocks.{i}.fc1", f"blocks.{i}.fc2"], [c.d_model, c.d_hidden, c.d_model], c.activation,
                          input_units=s, output_units=s)
    if c.norm:
        frag = frag + layernorm("norm", s)
    return Spec(frag + linear("head", c.n_out, c.d_model, None, s.inn()), name="stream-scaled")


def test_stream_scaling_breaks_layernorm_but_not_a_norm_free_stream(make_case):
    with_ln = make_case(ResidualMLPConfig(norm=True), torch.float64)
    spec = _stream_scaled_spec(with_ln.model.config)
    assert set(spec.params) == set(with_ln.params)
    for seed in range(3):
        g = GroupElement.sample(spec, seed, only=["stream.scale"])
        testing.assert_not_invariant(with_ln.f, with_ln.params, act(spec, with_ln.params, g))
    # without LayerNorm the stream is linear: a per-unit scaling of it is a symmetry (the catalogue keeps only
    # the permutation, a subgroup)
    no_ln = make_case(ResidualMLPConfig(norm=False), torch.float64)
    spec = _stream_scaled_spec(no_ln.model.config)
    assert testing.assert_invariant(no_ln.f, spec, no_ln.params, n_samples=5) < 1e-10


def test_residual_cnn_stream_norm_stats_left_behind_break(make_case):
    case = make_case(ResidualCNNConfig(), torch.float64)
    moved = act(case.spec, case.params, GroupElement.sample(case.spec, 0, only=["stream"]))
    assert testing.relative_error(case.f(moved), case.f(case.params)) < 1e-10
    for k in ("stem_norm.running_var", "blocks.0.norm2.running_mean", "blocks.1.norm2.weight"):
        broken = dict(moved)
        broken[k] = case.params[k]
        testing.assert_not_invariant(case.f, case.params, broken)


def test_residual_cnn_stream_scaling_is_not_a_symmetry(make_case):
    """Scaling the stream after the stem, compensated in the first block's conv1, is broken by the skip path."""
    case = make_case(ResidualCNNConfig(), torch.float64)
    moved = dict(case.params)
    a = torch.exp(0.5 * torch.randn(8, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    moved["stem_norm.weight"] = case.params["stem_norm.weight"] * a
    moved["stem_norm.bias"] = case.params["stem_norm.bias"] * a
    moved["blocks.0.conv1.weight"] = case.params["blocks.0.conv1.weight"] / a[None, :, None, None]
    testing.assert_not_invariant(case.f, case.params, moved)
