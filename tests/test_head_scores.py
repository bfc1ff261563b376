"""Head similarity under RoPE: per frequency pair, invariant to the rotation-scalings, blind to nothing Q^T K sees."""

from __future__ import annotations

import pytest
import torch

from symm.factors import HeadPermutation, RotationScaling
from symm.factors.linear import pairs_view, unpairs_view

from aligners.solvers.heads import _pair_similarity, head_scores

H, DH, FEATURES = 4, 8, 24


def _rotate(factor: RotationScaling, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Multiply pair p of every unit's rows by the complex number z[unit, p] (q = a + ib)."""
    view = pairs_view(x.transpose(-1, -2), factor.dim, factor.layout)  # (units, features, d_h / 2, 2)
    c = torch.view_as_complex(view.contiguous()) * z.unsqueeze(1)
    return unpairs_view(torch.view_as_real(c), factor.dim, factor.layout).transpose(-1, -2)


def _heads(seed: int):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(H, DH, FEATURES, generator=gen, dtype=torch.float64)
    k = torch.randn(H, DH, FEATURES, generator=gen, dtype=torch.float64)
    z = torch.complex(torch.randn(H, DH // 2, generator=gen, dtype=torch.float64), torch.randn(H, DH // 2, generator=gen, dtype=torch.float64))
    return q, k, z


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_head_similarity_recovers_heads_moved_by_rotation_scalings(layout):
    """B = heads of A permuted, each pair of Q times z and of K times 1 / conj(z): the matched pairs score 1."""
    factor, heads = RotationScaling("qk", H, parent="heads", dim=DH, layout=layout), HeadPermutation("heads", H, groups=H, head_dim=DH)
    q, k, z = _heads(0)
    perm = torch.tensor([2, 0, 3, 1])
    qb, kb = _rotate(factor, q[perm], z), _rotate(factor, k[perm], 1 / z.conj())
    # the rotated heads are a symmetry: Q^T K is unchanged
    assert torch.allclose(qb.transpose(-1, -2) @ kb, (q.transpose(-1, -2) @ k)[perm], atol=1e-10)
    s = head_scores(heads, {("qk", "out"): q, ("qk", "in"): k}, {("qk", "out"): qb, ("qk", "in"): kb}, {"qk": factor})
    assert torch.equal(s.argmax(0), perm)  # B's head j is A's head perm[j]
    assert torch.allclose(s[perm, torch.arange(H)], torch.ones(H, dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rope_head_similarity_sees_pairs_moved_across_frequencies(layout):
    """Exchanging two frequency pairs in both Q and K keeps Q^T K (the plain score is 1) but changes the function
    under RoPE: the per-pair similarity drops, and a negative control without the factor still scores 1."""
    factor, heads = RotationScaling("qk", H, parent="heads", dim=DH, layout=layout), HeadPermutation("heads", H, groups=H, head_dim=DH)
    q, k, _ = _heads(1)
    rows = torch.arange(DH).reshape(-1, 2) if layout == "interleaved" else torch.stack([torch.arange(DH // 2), torch.arange(DH // 2) + DH // 2], 1)
    swap = torch.arange(DH)
    swap[rows[0]], swap[rows[1]] = rows[1], rows[0]  # pair 0 <-> pair 1
    qb, kb = q[:, swap], k[:, swap]
    assert torch.allclose(qb.transpose(-1, -2) @ kb, q.transpose(-1, -2) @ k, atol=1e-10)
    plain = _pair_similarity(q, qb, k, kb)
    assert torch.allclose(plain.diagonal(), torch.ones(H, dtype=torch.float64), atol=1e-10)
    a, b = {("qk", "out"): q, ("qk", "in"): k}, {("qk", "out"): qb, ("qk", "in"): kb}
    per_pair = head_scores(heads, a, b, {"qk": factor})
    assert float(per_pair.diagonal().max()) < 0.95
    assert torch.allclose(head_scores(heads, a, b), plain)  # without the factor: the plain score
