"""The Lie algebra of every factor kind: exp(0) = identity, exp(-xi) = exp(xi)^{-1}, exp of a generator acts like
the derivative of the action (finite differences, both sides), symmetric generators and law counts, and
testing_elements (identity first, valid, distinct) for every kind, discrete ones included."""

from __future__ import annotations

import pytest
import torch

from symm.factors import (
    Factor,
    GeneralLinear,
    GroupedPermutation,
    HeadPermutation,
    Permutation,
    PositiveScaling,
    RotationScaling,
    SignFlip,
    Translation,
)

CONTINUOUS = {
    "scaling": PositiveScaling("a", 5),
    "scaling-batched": PositiveScaling("a", 3, parent="p", batch=(2,)),
    "gl-1": GeneralLinear("l", 3, dim=1),
    "gl-3": GeneralLinear("l", 2, dim=3),
    "gl-batched": GeneralLinear("l", 2, dim=2, parent="p", batch=(3,)),
    "rope-half": RotationScaling("r", 2, dim=6, layout="half"),
    "rope-interleaved": RotationScaling("r", 3, dim=4, layout="interleaved"),
}
DISCRETE = {
    "permutation": Permutation("p", 5),
    "permutation-batched": Permutation("p", 4, parent="e", batch=(3,)),
    "grouped": GroupedPermutation("g", 6, groups=3),
    "heads": HeadPermutation("h", 8, groups=2, head_dim=2),
    "sign": SignFlip("s", 4),
}
ALL = {**CONTINUOUS, **DISCRETE, "translation": Translation("t", 4)}


def _random_algebra(f: Factor, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(f.element_shape, generator=gen, dtype=torch.float64)


def _unit_matrix_action(f: Factor, x: torch.Tensor, xi_unit: torch.Tensor, side: str) -> torch.Tensor:
    """rho(xi) x for one generator broadcast to every unit: x's last axis holds ``count`` units of ``unit_size``."""
    m = f.algebra_matrix(xi_unit)
    m = m if side == "out" else -m.transpose(-1, -2)
    v = x.reshape(*x.shape[:-1], f.count, f.unit_size)
    return (v @ m.transpose(-1, -2)).reshape(x.shape)


@pytest.mark.parametrize("name", list(CONTINUOUS) + ["translation"])
def test_exp_of_zero_is_identity_and_exp_of_minus_xi_is_the_inverse(name):
    f = ALL[name]
    assert torch.allclose(f.exp(torch.zeros(f.element_shape, dtype=torch.float64)), f.identity(), atol=0, rtol=0)
    for seed in range(5):
        xi = _random_algebra(f, 0.7, seed)
        g, g_minus = f.exp(xi), f.exp(-xi)
        f.check_element(g)
        assert torch.allclose(g_minus, f.inverse(g), atol=1e-12)
        assert torch.allclose(f.compose(g, g_minus), f.identity(), atol=1e-12)


@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("name", [n for n in CONTINUOUS if not CONTINUOUS[n].batch])
def test_exp_of_a_generator_acts_like_the_derivative_of_the_action(name, side):
    """(act(exp(h xi)) - act(exp(-h xi))) / 2h = rho(xi) x, with rho(xi) = xi on "out" and -xi^T on "in"."""
    f = CONTINUOUS[name]
    x = torch.randn(7, f.count * f.unit_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-5
    for xi_unit in f.generators():
        xi = f.per_unit(xi_unit)
        numeric = (f.apply(x, f.exp(h * xi), side, 1, 1) - f.apply(x, f.exp(-h * xi), side, 1, 1)) / (2 * h)
        analytic = _unit_matrix_action(f, x, xi_unit, side)
        assert torch.allclose(numeric, analytic, atol=1e-8), f"{f.kind} generator {xi_unit.tolist()} side {side}"


def test_derivative_check_fails_for_a_wrong_generator_matrix():
    """Negative control: the finite-difference check above can fail (a transposed GL generator on the out side)."""
    f = CONTINUOUS["gl-3"]
    x = torch.randn(4, f.count * f.dim, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    xi_unit = f.generators()[1]  # E_01, not symmetric
    h = 1e-5
    numeric = (f.apply(x, f.exp(h * f.per_unit(xi_unit)), "out", 1, 1) - f.apply(x, f.exp(-h * f.per_unit(xi_unit)), "out", 1, 1)) / (2 * h)
    wrong = _unit_matrix_action(f, x, xi_unit.T, "out")
    assert not torch.allclose(numeric, wrong, atol=1e-3)


@pytest.mark.parametrize("name", list(CONTINUOUS))
def test_generators_span_the_algebra_and_symmetric_ones_give_the_law_count(name):
    f = CONTINUOUS[name]
    gens = f.generators()
    per_unit_dim = f.dimension // f.n_units
    assert gens.shape == (per_unit_dim, *f.unit_shape)
    assert torch.linalg.matrix_rank(gens.reshape(len(gens), -1)) == per_unit_dim  # a basis
    sym = f.symmetric_generators()
    for xi in sym:
        m = f.algebra_matrix(xi)
        assert torch.allclose(m, m.T), f"{f.kind}: a 'symmetric' generator acts by a non-symmetric matrix"
    assert f.n_laws == len(sym) * f.n_units
    # every other basis direction is not symmetric: the symmetric part of the algebra has exactly len(sym) dims
    mats = torch.stack([f.algebra_matrix(xi).reshape(-1) for xi in gens])
    sym_parts = torch.stack([(lambda m: (m + m.T) / 2)(f.algebra_matrix(xi)).reshape(-1) for xi in gens])
    assert torch.linalg.matrix_rank(sym_parts) == len(sym)
    assert torch.linalg.matrix_rank(mats) == per_unit_dim


@pytest.mark.parametrize(
    "factor, laws",
    [
        (PositiveScaling("a", 7), 7),
        (GeneralLinear("l", 4, dim=8), 4 * 8 * 9 // 2),  # per KV group d_h(d_h+1)/2
        (RotationScaling("r", 4, dim=8), 4 * 4),  # per KV group d_h/2
        (Translation("t", 16), 16),
        (Permutation("p", 9), 0),
        (SignFlip("s", 9), 0),
        (HeadPermutation("h", 4, groups=2, head_dim=8), 0),
        (GroupedPermutation("g", 4, groups=2), 0),
    ],
    ids=lambda v: v.kind if isinstance(v, Factor) else str(v),
)
def test_law_counts_match_theory(factor, laws):
    assert factor.n_laws == laws


@pytest.mark.parametrize("name", list(DISCRETE))
def test_discrete_kinds_have_no_algebra(name):
    f = DISCRETE[name]
    assert f.n_laws == 0 and f.generators().shape[0] == 0 and f.symmetric_generators().shape[0] == 0
    with pytest.raises(TypeError, match="discrete"):
        f.exp(torch.zeros(f.element_shape))


@pytest.mark.parametrize("name", list(ALL))
def test_testing_elements_are_valid_distinct_and_start_at_the_identity(name):
    f = ALL[name]
    elements = f.testing_elements()
    assert len(elements) >= 3 or isinstance(f, (Permutation,)) and len(elements) >= 2
    assert torch.equal(elements[0].to(f.identity().dtype), f.identity())
    for e in elements:
        f.check_element(e)
        assert tuple(e.shape) == f.element_shape
    for i, e in enumerate(elements):
        for other in elements[i + 1 :]:
            assert not torch.equal(e, other), f"{f.kind}: repeated testing element"
    if f.is_continuous:  # a near-identity element, as emlp / escnn test with
        assert any(0 < float((e - f.identity()).abs().max()) < 1e-2 for e in elements)


def test_grouped_testing_elements_respect_groups():
    f = GroupedPermutation("g", 6, groups=2)
    elements = f.testing_elements()
    assert any(not torch.equal(e // 3, torch.arange(6) // 3) for e in elements)  # one moves whole groups
    assert any(torch.equal(e // 3, torch.arange(6) // 3) and not torch.equal(e, torch.arange(6)) for e in elements)  # one stays inside
