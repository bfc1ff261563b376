"""Linear-assignment backends agree on the optimum; bad score matrices are refused."""

from __future__ import annotations

import pytest
import torch

from aligners.assignment import assignment_value, lapx_available, linear_assignment, resolve_backend


@pytest.mark.parametrize("n", [1, 7, 64])
def test_scipy_and_lapx_reach_the_same_optimum(n):
    assert lapx_available()
    score = torch.randn(3, n, n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    a, b = linear_assignment(score, "scipy"), linear_assignment(score, "lapx")
    assert torch.allclose(assignment_value(score, a), assignment_value(score, b))
    for row in a.reshape(-1, n):
        assert sorted(row.tolist()) == list(range(n))


def test_planted_permutation_is_recovered():
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    score = torch.eye(50, dtype=torch.float64)[perm] + 0.01 * torch.rand(50, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(linear_assignment(score), perm)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="square"):
        linear_assignment(torch.zeros(3, 4))
    bad = torch.zeros(3, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        linear_assignment(bad)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cplex")
