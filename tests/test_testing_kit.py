"""symm.testing: the assertion helpers must pass on true symmetries and fail (clearly) on broken ones."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from symm import Fragment, On, Permutation, PositiveScaling, Spec, param, testing
from symm.action import act
from symm.element import GroupElement
from symm.evaluate import functional, state_dict_of
from symm.models import MLPConfig, build_model, spec_for
from symm.models.mlp import mlp_spec

SIZES = (64, 32, 16, 10)


def _mlp(activation: str, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(MLPConfig(SIZES, activation)).to(dtype).eval()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype)
    f = functional(model)
    return state_dict_of(model), (lambda p: f(p, x)), x


def test_assert_invariant_passes_on_a_true_symmetry():
    params, f, _ = _mlp("relu")
    worst = testing.assert_invariant(f, spec_for(MLPConfig(SIZES, "relu")), params)
    assert 0.0 <= worst <= 1e-10


def test_assert_invariant_draws_n_samples():
    params, f, _ = _mlp("relu")
    calls = []

    def counting(p):
        calls.append(1)
        return f(p)

    testing.assert_invariant(counting, spec_for(MLPConfig(SIZES, "relu")), params, n_samples=7)
    assert len(calls) == 2 * 7  # f(g.theta) and f(theta) per sample


@pytest.mark.parametrize("activation", ["gelu", "silu", "tanh"])
def test_assert_invariant_raises_on_a_broken_symmetry_and_names_a_factor(activation):
    params, f, _ = _mlp(activation)
    relu_spec = mlp_spec(MLPConfig(SIZES, "relu"))  # scaling is not a symmetry of these activations
    with pytest.raises(AssertionError) as info:
        testing.assert_invariant(f, relu_spec, params)
    message = str(info.value)
    assert "f(g.theta) != f(theta)" in message and "sample 0" in message
    named = [n for n in relu_spec.factors if f"worst factor {n!r}" in message]
    assert named and named[0].endswith(".scale"), message
    assert "positive-scaling" in message
    assert f"{named[0].rsplit('.units', 1)[0]}.weight" in message  # the parameters it acts on


def test_assert_invariant_blames_the_factor_that_breaks():
    """ReLU after layer 0, GELU after layer 1: only layers.1's scaling is broken, and the message says so."""
    params, _, x = _mlp("relu")

    def hybrid(p):
        h = F.relu(F.linear(x, p["layers.0.weight"], p["layers.0.bias"]))
        h = F.gelu(F.linear(h, p["layers.1.weight"], p["layers.1.bias"]))
        return F.linear(h, p["layers.2.weight"], p["layers.2.bias"])

    spec = spec_for(MLPConfig(SIZES, "relu"))
    kept = [spec.factors[n] for n in ("layers.0.units", "layers.0.units.scale", "layers.1.units")]
    partial = Spec(Fragment.of(kept, {k: _drop(ps, "layers.1.units.scale") for k, ps in spec.params.items()}), name="partial")
    assert testing.assert_invariant(hybrid, partial, params) < 1e-10  # everything but that factor is fine
    with pytest.raises(AssertionError, match=r"worst factor 'layers\.1\.units\.scale' \(positive-scaling"):
        testing.assert_invariant(hybrid, spec, params)


def _drop(ps, factor):
    """A ParamSpec without ``factor`` (used to build the sub-spec that excludes the broken factor)."""
    from symm.spec import ParamSpec, Segment

    axes = tuple(tuple(Segment(s.size, tuple(o for o in s.acts if o.factor != factor)) for s in segs) for segs in ps.axes)
    return ParamSpec(ps.shape, axes, ps.shifts)


def test_assert_invariant_rtol_is_respected():
    params, f, _ = _mlp("relu", dtype=torch.float32)
    spec = spec_for(MLPConfig(SIZES, "relu"))
    worst = testing.assert_invariant(f, spec, params, n_samples=3)
    assert 0.0 < worst <= 1e-5  # float32 rounding is visible but small
    with pytest.raises(AssertionError, match="relative error"):
        testing.assert_invariant(f, spec, params, n_samples=3, rtol=worst / 1e3)


def test_tolerance_and_relative_error():
    t32, t64 = torch.zeros(2, dtype=torch.float32), torch.zeros(2, dtype=torch.float64)
    assert testing.tolerance_for({"a": t32}) == 1e-5
    assert testing.tolerance_for({"a": t64}) == 1e-10
    assert testing.tolerance_for({"a": t64, "b": t32, "n": torch.zeros(1, dtype=torch.long)}) == 1e-5
    assert testing.tolerance_for({"a": torch.zeros(1, dtype=torch.float16)}) == 1e-3
    assert testing.tolerance_for({"n": torch.zeros(1, dtype=torch.long)}) == 1e-10
    a, b = torch.tensor([1.0, 2.0, -4.0]), torch.tensor([1.0, 2.5, -4.0])
    assert testing.relative_error(a, b) == pytest.approx(0.5 / 4.0)
    assert testing.relative_error(b, b) == 0.0
    assert testing.max_param_difference({"x": a, "y": b}, {"x": b, "y": b}) == (pytest.approx(0.5), "x")


def test_invariance_error_of_identity_is_zero():
    params, f, _ = _mlp("gelu")
    spec = spec_for(MLPConfig(SIZES, "gelu"))
    same = act(spec, params, GroupElement.identity(spec))
    assert all(torch.equal(same[k], params[k]) for k in params)
    # bitwise-equal weights; only the memory layout of act's output may change the matmul's rounding
    assert testing.invariance_error(f, spec, params, GroupElement.identity(spec)) < 1e-15
    assert testing.invariance_error(f, spec, params, GroupElement.sample(spec, 0)) < 1e-10


def test_assert_not_invariant():
    params, f, _ = _mlp("relu")
    with pytest.raises(AssertionError, match="negative control did not change the function"):
        testing.assert_not_invariant(f, params, {k: v.clone() for k, v in params.items()})
    moved = dict(params)
    moved["layers.2.bias"] = params["layers.2.bias"] + 1.0
    err = testing.assert_not_invariant(f, params, moved)
    assert err > 1e-3
    with pytest.raises(AssertionError):
        testing.assert_not_invariant(f, params, moved, min_error=10 * err)


# ----- assert_group_axioms -----------------------------------------------------------------------------------


def test_assert_group_axioms_passes_on_catalogue_spec():
    params, _, _ = _mlp("swiglu")
    testing.assert_group_axioms(spec_for(MLPConfig(SIZES, "swiglu")), params, atol=1e-12)


class _NoCompose(PositiveScaling):
    """A broken factor: composing forgets the second element."""

    def compose(self, a, b):
        return a


class _WrongInverse(PositiveScaling):
    def inverse(self, a):
        return a


def _two_layer_spec(scale_cls) -> tuple[Spec, dict]:
    h, s = Permutation("h", 5), scale_cls("h.s", 5, parent="h")
    frag = Fragment.of(
        [h, s],
        {"w1": param((5, 3), [On("h"), On("h.s")]), "w2": param((2, 5), None, [On("h", "in"), On("h.s", "in")]), "b2": param((2,))},
    )
    g = torch.Generator().manual_seed(0)
    return Spec(frag), {k: torch.randn(ps.shape, generator=g, dtype=torch.float64) for k, ps in frag.params.items()}


@pytest.mark.parametrize("cls, match", [(_NoCompose, r"\(g g\^-1\)"), (_WrongInverse, r"\(g g\^-1\)")], ids=["no-compose", "wrong-inverse"])
def test_assert_group_axioms_catches_broken_factors(cls, match):
    spec, params = _two_layer_spec(PositiveScaling)
    testing.assert_group_axioms(spec, params, atol=1e-12)
    spec, params = _two_layer_spec(cls)
    with pytest.raises(AssertionError, match=match):
        testing.assert_group_axioms(spec, params)


def test_assert_group_axioms_catches_mutation(monkeypatch):
    spec, params = _two_layer_spec(PositiveScaling)
    target = params

    def mutating(s, p, g):
        if p is target:
            p["b2"].zero_()  # idempotent: invisible to every comparison but the final snapshot
        return act(s, p, g)

    monkeypatch.setattr(testing, "act", mutating)
    with pytest.raises(AssertionError, match="act mutated its input"):
        testing.assert_group_axioms(spec, params)
