"""Linear assignment: all backends reach scipy's optimum, the warm-started "jv" solver stays exact, bad input fails."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

import aligners.assignment as asg
from aligners.assignment import (
    AssignmentState,
    WarmAssignment,
    assignment_value,
    lapx_available,
    linear_assignment,
    resolve_backend,
    solve_warm,
)

RTOL = 1e-9


def _optimum(score: np.ndarray) -> float:
    s = np.asarray(score, dtype=np.float64)
    r, c = linear_sum_assignment(s, maximize=True)
    return float(s[r, c].sum())


def _assert_optimal(score, sigma) -> None:
    s = np.asarray(score, dtype=np.float64)
    sigma = np.asarray(sigma)
    n = s.shape[-1]
    for k, (sk, gk) in enumerate(zip(s.reshape(-1, n, n), sigma.reshape(-1, n))):
        assert sorted(gk.tolist()) == list(range(n)), f"batch entry {k} is not a permutation"
        best, got = _optimum(sk), float(sk[np.arange(n), gk].sum())
        assert abs(best - got) <= RTOL * max(1.0, abs(best)), (k, best, got)


@pytest.fixture(params=["plain", "row-reduction"])
def arr_mode(request, monkeypatch):
    """Run the jv solver with and without the augmenting row reduction (normally used from n = 1024 on)."""
    if request.param == "row-reduction":
        monkeypatch.setattr(asg, "_ARR_MIN_N", 0)
    return request.param


# ---- ported from the former tests of aligners.solvers ---------------------------------------------------------


@pytest.mark.parametrize("n", [1, 7, 64])
def test_all_backends_reach_the_same_optimum(n):
    assert lapx_available()
    score = torch.randn(3, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    a = linear_assignment(score, "scipy")
    for backend in ("lapx", "jv", "auto"):
        b = linear_assignment(score, backend)
        assert b.dtype == torch.int64 and b.shape == (3, n)
        assert torch.allclose(assignment_value(score, a), assignment_value(score, b))
    for row in a.reshape(-1, n):
        assert sorted(row.tolist()) == list(range(n))


@pytest.mark.parametrize("backend", ["auto", "scipy", "lapx", "jv"])
def test_planted_permutation_is_recovered(backend):
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(50, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    score = torch.eye(50, dtype=torch.float64)[perm] + 0.01 * noise
    assert torch.equal(linear_assignment(score, backend), perm)


@pytest.mark.parametrize("backend", ["auto", "scipy", "lapx", "jv"])
def test_bad_scores_are_refused(backend):
    with pytest.raises(ValueError, match="square"):
        linear_assignment(torch.zeros(3, 4), backend)
    with pytest.raises(ValueError, match="square"):
        linear_assignment(torch.zeros(3), backend)
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        for dtype in (torch.float32, torch.float64):
            bad = torch.zeros(2, 3, 3, dtype=dtype)
            bad[1, 2, 1] = bad_value
            with pytest.raises(ValueError, match="NaN"):
                linear_assignment(bad, backend)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cplex")


# ---- the jv solver, cold --------------------------------------------------------------------------------------


def test_auto_resolves_to_the_measured_fastest_backend():
    assert resolve_backend("auto") == asg.AUTO_BACKEND == "jv"
    assert resolve_backend("auto", asg.JV_MIN_N) == "jv"
    assert resolve_backend("auto", asg.JV_MIN_N - 1) == "scipy"


@pytest.mark.parametrize("np_dtype", [np.float64, np.float32])
def test_cold_jv_matches_scipy_on_many_random_matrices(np_dtype, arr_mode):
    rng = np.random.default_rng(0)
    for seed in range(60):
        n = 1 + seed * 200 // 60 if seed % 3 else int(rng.integers(1, 12))
        score = (rng.standard_normal((n, n)) * 10.0 ** rng.integers(-3, 4)).astype(np_dtype)
        sigma, state = solve_warm(score)
        _assert_optimal(score, sigma)
        assert sigma.dtype == np.int64 and isinstance(sigma, np.ndarray)


def test_integer_ties_and_constant_matrices(arr_mode):
    rng = np.random.default_rng(1)
    for seed in range(40):
        n = int(rng.integers(1, 120))
        score = rng.integers(0, 1 + seed % 4, (n, n)).astype(np.float64)
        _assert_optimal(score, solve_warm(score)[0])
    for n in (1, 2, 50, 200):
        constant = np.full((n, n), 3.0)
        sigma = solve_warm(constant)[0]
        assert sorted(sigma.tolist()) == list(range(n))


def test_ties_are_broken_deterministically():
    score = np.random.default_rng(2).integers(0, 2, (80, 80)).astype(np.float32)
    first = solve_warm(score)[0]
    for _ in range(3):
        assert np.array_equal(solve_warm(score.copy())[0], first)


def test_dual_certificate_proves_optimality(arr_mode):
    rng = np.random.default_rng(3)
    for n in (5, 60, 150):
        score = rng.standard_normal((n, n))
        sigma, state = solve_warm(score)
        f, g = state.row_dual, state.col_dual
        slack = f[:, None] + g[None, :] - score
        scale = np.abs(score).max() + np.abs(g).max()
        assert slack.min() >= -1e-12 * scale
        assert np.abs(slack[np.arange(n), sigma]).max() <= 1e-12 * scale
        assert f.sum() + g.sum() == pytest.approx(score[np.arange(n), sigma].sum(), rel=1e-12)


def test_float32_and_other_dtypes_are_solved_on_their_float64_values():
    rng = np.random.default_rng(4)
    s32 = rng.standard_normal((2, 40, 40)).astype(np.float32)
    _assert_optimal(s32, solve_warm(s32)[0])
    _assert_optimal(s32, linear_assignment(torch.from_numpy(s32)).numpy())
    ints = torch.randint(-5, 5, (30, 30), generator=torch.Generator().manual_seed(0))
    _assert_optimal(ints.numpy(), linear_assignment(ints).numpy())
    half = torch.randn(25, 25, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    _assert_optimal(half.double().numpy(), linear_assignment(half).numpy())
    strided = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).T
    _assert_optimal(strided.numpy(), linear_assignment(strided).numpy())


def test_batched_input_and_empty_shapes():
    rng = np.random.default_rng(5)
    score = rng.standard_normal((2, 3, 17, 17))
    sigma, state = solve_warm(torch.from_numpy(score))
    assert isinstance(sigma, torch.Tensor) and sigma.shape == (2, 3, 17)
    assert state.shape == (2, 3, 17) and state.row_dual.shape == (2, 3, 17) and state.stats.shape == (2, 3, 4)
    _assert_optimal(score, sigma.numpy())
    assert linear_assignment(torch.zeros(4, 0, 0)).shape == (4, 0)
    assert solve_warm(np.zeros((0, 3, 3)))[0].shape == (0, 3)
    assert linear_assignment(np.ones((1, 1))).tolist() == [0]


# ---- the jv solver, warm --------------------------------------------------------------------------------------


def test_warm_start_without_change_keeps_everything():
    score = np.random.default_rng(6).standard_normal((300, 300))
    sigma, state = solve_warm(score)
    again, state2 = solve_warm(score, state)
    assert np.array_equal(again, sigma)
    assert state2.stats[0] == 0 and state2.stats[2] == 0  # no free row, no Dijkstra scan
    assert np.array_equal(state.sigma, sigma)  # the input state is untouched


@pytest.mark.parametrize("rtol", [0.0, asg.WARM_RTOL])
@pytest.mark.parametrize("np_dtype", [np.float64, np.float32])
def test_warm_start_after_perturbations_is_still_optimal(rtol, np_dtype, arr_mode):
    rng = np.random.default_rng(7)
    for trial in range(12):
        n = int(rng.integers(1, 150))
        a = rng.standard_normal((n, 16))
        score = (a @ (a + rng.standard_normal((n, 16))).T).astype(np_dtype)
        sigma, state = solve_warm(score, rtol=rtol)
        for size in (1e-6, 1e-2, 1.0):
            u, v = rng.standard_normal((n, 4)), rng.standard_normal((4, n))
            new = (score + size * np.abs(score).mean() * (u @ v)).astype(np_dtype)
            sigma, state = solve_warm(new, state, rtol=rtol)
            _assert_optimal(new, sigma)
        other = rng.integers(-3, 3, (n, n)).astype(np_dtype)  # a totally different matrix, with ties
        sigma, state = solve_warm(other, state, rtol=rtol)
        _assert_optimal(other, sigma)
        scaled = (1e4 * rng.standard_normal((n, n))).astype(np_dtype)
        _assert_optimal(scaled, solve_warm(scaled, state, rtol=rtol)[0])


def test_large_matrix_uses_row_reduction_and_stays_exact():
    n = asg._ARR_MIN_N + 6
    rng = np.random.default_rng(11)
    a = rng.standard_normal((n, 64))
    score = a @ (a + 3.0 * rng.standard_normal((n, 64))).T
    sigma, state = solve_warm(score)
    _assert_optimal(score, sigma)
    new = score + 0.01 * np.abs(score).mean() * rng.standard_normal((n, 8)) @ rng.standard_normal((8, n))
    sigma, state = solve_warm(new, state)
    _assert_optimal(new, sigma)
    assert state.stats[3] > 0  # row-reduction steps were taken


def test_warm_start_recovers_a_moved_planted_permutation():
    rng = np.random.default_rng(8)
    n = 120
    perm = rng.permutation(n)
    score = np.eye(n)[perm] + 0.1 * rng.random((n, n))
    sigma, state = solve_warm(score)
    assert np.array_equal(sigma, perm)
    perm2 = perm.copy()
    perm2[:10] = np.roll(perm2[:10], 1)
    score2 = np.eye(n)[perm2] + 0.1 * rng.random((n, n))
    sigma2, _ = solve_warm(score2, state)
    assert np.array_equal(sigma2, perm2)


def test_batched_warm_start_keeps_one_state_per_entry():
    rng = np.random.default_rng(9)
    score = rng.standard_normal((4, 50, 50))
    _, state = solve_warm(score)
    score2 = score.copy()
    score2[1] += 0.3 * rng.standard_normal((50, 50))
    score2[3] = rng.standard_normal((50, 50))
    sigma2, state2 = solve_warm(score2, state)
    _assert_optimal(score2, sigma2)
    assert state2.stats[0, 0] == 0 and state2.stats[2, 0] == 0  # unchanged entries cost nothing
    with pytest.raises(ValueError, match="state"):
        solve_warm(score[:3], state)
    with pytest.raises(ValueError, match="rtol"):
        solve_warm(score, state, rtol=-1.0)
    corrupt = AssignmentState(state.sigma + 1, state.row_dual, state.col_dual, state.stats)
    with pytest.raises(ValueError, match="corrupt"):
        solve_warm(score, corrupt)
    bad = score2.copy()
    bad[2, 4, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        solve_warm(bad, state)


def test_warm_assignment_keeps_a_state_per_key():
    rng = np.random.default_rng(10)
    warm = WarmAssignment()
    a, b = torch.randn(40, 40, dtype=torch.float64), torch.randn(3, 20, 20, dtype=torch.float64)
    for step in range(3):
        a_step = a + 0.05 * step * torch.from_numpy(rng.standard_normal((40, 40)))
        _assert_optimal(a_step.numpy(), warm.solve(a_step, "a").numpy())
        _assert_optimal(b.numpy(), warm.solve(b, "b").numpy())
    assert isinstance(warm.states["a"], AssignmentState) and warm.states["b"].shape == (3, 20)
    assert warm.states["b"].stats[..., 0].sum() == 0  # re-solving b from its own state is free
    c = torch.randn(30, 30, dtype=torch.float64)
    _assert_optimal(c.numpy(), warm.solve(c, "a").numpy())  # new shape under an old key: cold solve
    warm.reset("a")
    assert "a" not in warm.states


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 12),
    high=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    rtol=st.sampled_from([0.0, asg.WARM_RTOL]),
)
def test_property_warm_chain_on_small_integer_matrices(n, high, seed, rtol):
    rng = np.random.default_rng(seed)
    state = None
    for _ in range(3):
        score = rng.integers(-high, high + 1, (n, n)).astype(np.float64)
        sigma, state = solve_warm(score, state, rtol=rtol)
        _assert_optimal(score, sigma)
        nudged = score + rng.integers(0, 2, (n, n)) * rng.choice([-1.0, 1.0])
        sigma, state = solve_warm(nudged, state, rtol=rtol)
        _assert_optimal(nudged, sigma)
