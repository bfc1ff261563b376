"""MLP catalogue entries: every activation's group preserves the function; wrong groups do not."""

from __future__ import annotations

import pytest
import torch

from symm import Fragment, GroupElement, On, Permutation, PositiveScaling, SignFlip, Spec, param, testing
from symm.action import act
from symm.catalogue import mlp as mlp_fragment
from symm.models import MLPConfig, spec_for
from symm.models.mlp import mlp_spec

SIZES = (64, 32, 16, 10)
ACTIVATIONS = ["relu", "leaky_relu", "tanh", "gelu", "silu", "swiglu"]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_group_preserves_function(make_case, check_preserved, activation, dtype):
    case = make_case(MLPConfig(SIZES, activation), dtype)
    check_preserved(case)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_mlp_group_axioms(make_case, check_axioms, activation, dtype):
    case = make_case(MLPConfig(SIZES, activation), dtype)
    check_axioms(case.spec, case.params, dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_mlp_without_bias_and_deeper(make_case, check_preserved, activation, bias):
    case = make_case(MLPConfig((64, 24, 24, 12, 10), activation, bias=bias), torch.float64)
    assert all(k.endswith("weight") for k in case.params) != bias
    check_preserved(case, n=5)


@pytest.mark.parametrize(
    "activation, dimension, kinds",
    [
        ("relu", 48, {"permutation", "positive-scaling"}),
        ("leaky_relu", 48, {"permutation", "positive-scaling"}),
        ("swiglu", 48, {"permutation", "positive-scaling", "sign-flip"}),
        ("tanh", 0, {"permutation", "sign-flip"}),
        ("gelu", 0, {"permutation"}),
        ("silu", 0, {"permutation"}),
    ],
)
def test_mlp_group_dimension(activation, dimension, kinds):
    spec = spec_for(MLPConfig(SIZES, activation))
    assert spec.dimension == dimension
    assert {f.kind for f in spec.factors.values()} == kinds
    assert sorted(spec.permutation_factors) == ["layers.0.units", "layers.1.units"]
    assert {spec.factors[n].count for n in spec.permutation_factors} == {32, 16}


def test_swiglu_scaling_sits_on_up_rows_not_gate_rows():
    spec = spec_for(MLPConfig((64, 32, 10), "swiglu"))
    on = lambda p: {o.factor for seg in spec.params[p].axes[0] for o in seg.acts}  # noqa: E731
    assert on("layers.0.up.weight") == {"layers.0.units", "layers.0.units.scale", "layers.0.units.sign"}
    assert on("layers.0.gate.weight") == {"layers.0.units"}


def test_swiglu_sign_flip_of_up_and_down_preserves_and_of_gate_breaks(make_case):
    """silu(B x) * (A x): negating A's row and C's column is a symmetry (the up branch is linear); negating B's row
    and C's column is not (silu is not odd)."""
    case = make_case(MLPConfig((64, 32, 10), "swiglu"), torch.float64)
    signs = case.spec.factors_of_kind(SignFlip)
    assert signs == ["layers.0.units.sign"]
    for seed in range(5):
        g = GroupElement.sample(case.spec, seed, only=signs)
        assert not g.is_identity()
        assert testing.invariance_error(case.f, case.spec, case.params, g) < 1e-10
    s = torch.ones(32, dtype=torch.float64)
    s[::3] = -1.0
    gate_flipped = dict(case.params)
    for k in ("layers.0.gate.weight", "layers.0.gate.bias"):
        gate_flipped[k] = case.params[k] * s.reshape(-1, *([1] * (case.params[k].dim() - 1)))
    gate_flipped["layers.1.weight"] = case.params["layers.1.weight"] * s
    testing.assert_not_invariant(case.f, case.params, gate_flipped)


# ----- negative controls ------------------------------------------------------------------------------


def _scale_only(spec: Spec, seed: int) -> GroupElement:
    names = spec.factors_of_kind(PositiveScaling)
    assert names
    return GroupElement.sample(spec, seed, only=names)


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_relu_scaling_breaks_non_homogeneous_activation(make_case, activation):
    relu_spec = mlp_spec(MLPConfig(SIZES, "relu"))
    broken = make_case(MLPConfig(SIZES, activation), torch.float64)
    fine = make_case(MLPConfig(SIZES, "relu"), torch.float64)
    for seed in range(5):
        g = _scale_only(relu_spec, seed)
        assert all(relu_spec.factors[n].is_identity(v) for n, v in g.values.items() if n.endswith("units"))
        testing.assert_not_invariant(broken.f, broken.params, act(relu_spec, broken.params, g))
        # the same element is a symmetry of the ReLU model: only the activation differs
        assert testing.invariance_error(fine.f, relu_spec, fine.params, g) < 1e-10


def _swiglu_gate_scaled_spec() -> Spec:
    """Like the catalogue's SwiGLU (64 -> 32 -> 10) but the scaling acts on the gate rows instead of the up rows."""
    h, s = Permutation("h", 32), PositiveScaling("h.scale", 32, parent="h")
    scaled, plain, consume = [On("h"), On("h.scale")], On("h"), [On("h", "in"), On("h.scale", "in")]
    params = {
        "layers.0.gate.weight": param((32, 64), scaled),
        "layers.0.gate.bias": param((32,), scaled),
        "layers.0.up.weight": param((32, 64), plain),
        "layers.0.up.bias": param((32,), plain),
        "layers.1.weight": param((10, 32), None, consume),
        "layers.1.bias": param((10,)),
    }
    return Spec(Fragment.of([h, s], params), name="swiglu-gate-scaled")


def test_scaling_swiglu_gate_row_breaks_function(make_case):
    case = make_case(MLPConfig((64, 32, 10), "swiglu"), torch.float64)
    wrong = _swiglu_gate_scaled_spec()
    for seed in range(5):
        g = GroupElement.sample(wrong, seed, only=["h.scale"])
        testing.assert_not_invariant(case.f, case.params, act(wrong, case.params, g))
    # permutations alone are still fine in the hand-built spec: the break is the gate scaling
    for seed in range(3):
        g = GroupElement.sample(wrong, seed, only=["h"])
        assert testing.invariance_error(case.f, wrong, case.params, g) < 1e-10
    # and the catalogue spec (scaling the up rows) is a symmetry
    assert testing.assert_invariant(case.f, case.spec, case.params, n_samples=5) < 1e-10


def test_sign_flips_break_relu(make_case):
    case = make_case(MLPConfig(SIZES, "relu"), torch.float64)
    tanh_spec = mlp_spec(MLPConfig(SIZES, "tanh"))
    signs = tanh_spec.factors_of_kind(SignFlip)
    assert len(signs) == 2
    for seed in range(5):
        g = GroupElement.sample(tanh_spec, seed, only=signs)
        assert not g.is_identity()
        testing.assert_not_invariant(case.f, case.params, act(tanh_spec, case.params, g))
    tanh_case = make_case(MLPConfig(SIZES, "tanh"), torch.float64)
    g = GroupElement.sample(tanh_spec, 0, only=signs)
    assert testing.invariance_error(tanh_case.f, tanh_spec, tanh_case.params, g) < 1e-10


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_permuting_one_side_of_a_layer_breaks_function(make_case, activation):
    case = make_case(MLPConfig(SIZES, activation), torch.float64)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(perm, torch.arange(32))
    rows = [k for k in case.params if k.startswith("layers.0.")]  # weight/bias (gate and up for SwiGLU)
    one_sided = dict(case.params)
    for k in rows:
        one_sided[k] = case.params[k][perm]
    testing.assert_not_invariant(case.f, case.params, one_sided)
    # permuting the consumer's columns as well restores the function (the hand-made permutation is right)
    both = dict(one_sided)
    consumers = [k for k in case.params if k.startswith("layers.1.") and k.endswith("weight")]
    assert consumers
    for k in consumers:
        both[k] = case.params[k][:, perm]
    assert testing.relative_error(case.f(both), case.f(case.params)) < 1e-10


def test_permuting_gate_without_up_breaks_swiglu(make_case):
    case = make_case(MLPConfig((64, 32, 10), "swiglu"), torch.float64)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    moved = dict(case.params)
    moved["layers.0.gate.weight"] = case.params["layers.0.gate.weight"][perm]
    moved["layers.0.gate.bias"] = case.params["layers.0.gate.bias"][perm]
    moved["layers.1.weight"] = case.params["layers.1.weight"][:, perm]
    testing.assert_not_invariant(case.f, case.params, moved)


def test_catalogue_mlp_with_custom_names_validates():
    frag = mlp_fragment(["a", "b", "c"], [5, 7, 6, 3], "relu")
    spec = Spec(frag, name="abc")
    assert set(spec.params) == {f"{n}.{w}" for n in "abc" for w in ("weight", "bias")}
    assert spec.dimension == 7 + 6
