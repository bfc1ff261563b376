"""Attention heads: matching on quantities invariant to the per-head continuous group, then the per-head
continuous alignment in closed form.

Invariants per query head h: Q_h^T K_g(h) (scores) and V_g(h)^T O_h (value-output map), both unchanged by
Q -> M Q, K -> M^{-T} K and V -> F V, O -> F^{-T} O. Similarities are Frobenius inner products computed from
d_h x d_h cross-Grams, never forming the d x d matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from symm.factors import GeneralLinear, HeadPermutation, RotationScaling
from symm.factors.linear import pairs_view
from symm.spec import Spec

from .solvers import linear_assignment
from .views import unit_blocks


def role_blocks(spec: Spec, params: Mapping[str, torch.Tensor], heads: str) -> dict[tuple[str, str], torch.Tensor]:
    """Per (child factor, side): ``(units, d_h, features)`` stacked over the parameters where both act.

    For the Q/K child, side ``out`` holds Q and ``in`` holds K; for the V/O child, V and O.
    """
    children = {n for n, f in spec.factors.items() if f.parent == heads}
    parts: dict[tuple[str, str], list[torch.Tensor]] = {}
    for pname, ps in sorted(spec.params.items()):
        for axis, offset, seg in ps.segments():
            acts = {on.factor: on for on in seg.acts}
            if heads not in acts:
                continue
            for child in children & set(acts):
                blocks = unit_blocks(spec, params[pname].double(), axis, offset, seg.size, acts[heads])
                parts.setdefault((child, acts[child].side), []).append(blocks)
    return {key: torch.cat(b, dim=-1) for key, b in parts.items()}


def _pair_similarity(xa: torch.Tensor, xb: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """<X_a^T Y_a, X_b^T Y_b>_F for all unit pairs, normalised (cosine). X, Y: (units, d_h, features)."""
    gx = torch.einsum("iar,jbr->ijab", xa, xb)
    gy = torch.einsum("iar,jbr->ijab", ya, yb)
    cross = (gx * gy).sum((-1, -2))
    na = (torch.einsum("iar,ibr->iab", xa, xa) * torch.einsum("iar,ibr->iab", ya, ya)).sum((-1, -2))
    nb = (torch.einsum("iar,ibr->iab", xb, xb) * torch.einsum("iar,ibr->iab", yb, yb)).sum((-1, -2))
    return cross / (na.clamp_min(1e-300).sqrt().unsqueeze(1) * nb.clamp_min(1e-300).sqrt().unsqueeze(0))


def head_scores(factor: HeadPermutation, a: dict, b: dict) -> torch.Tensor:
    """(H, H) similarity of query heads of A and B from the Q/K and V/O invariants (X_out^T X_in per child)."""
    r = factor.heads_per_group
    score = torch.zeros(factor.count, factor.count, dtype=torch.float64)
    for child in sorted({c for c, _ in a}):
        x, y = (child, "out"), (child, "in")
        if x not in a or y not in a:
            continue
        xa, xb, ya, yb = a[x], b[x], a[y], b[y]
        # bring both roles to the query-head level (K and V live per KV group)
        if xa.shape[0] == factor.groups and factor.groups != factor.count:
            xa, xb = xa.repeat_interleave(r, 0), xb.repeat_interleave(r, 0)
        if ya.shape[0] == factor.groups and factor.groups != factor.count:
            ya, yb = ya.repeat_interleave(r, 0), yb.repeat_interleave(r, 0)
        score += _pair_similarity(xa, xb, ya, yb)
    return score


def grouped_assignment(factor: HeadPermutation, score: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Best head permutation that maps KV groups to KV groups: inner assignments per group pair, then groups."""
    g, r = factor.groups, factor.heads_per_group
    if g == factor.count or r == 1:
        return linear_assignment(score, backend)
    blocks = score.reshape(g, r, g, r).permute(0, 2, 1, 3)  # (group A, group B, head A, head B)
    inner = linear_assignment(blocks, backend)  # (g, g, r)
    value = blocks.gather(-1, inner.unsqueeze(-1)).squeeze(-1).sum(-1)
    group_perm = linear_assignment(value, backend)
    within = inner[torch.arange(g), group_perm]  # (g, r)
    return (group_perm.unsqueeze(-1) * r + within).reshape(-1)


def _group_sum(xa: torch.Tensor, xb: torch.Tensor, n: int) -> torch.Tensor:
    """sum over the units of each of ``n`` groups of X_a X_b^T: (n, d, d)."""
    xa = xa.reshape(n, -1, *xa.shape[-2:])
    xb = xb.reshape(n, -1, *xb.shape[-2:])
    return torch.einsum("nkar,nkbr->nab", xa, xb)


def _spd_power(m: torch.Tensor, p: float, eps: float = 1e-12) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    w = w.clamp_min(eps * w.abs().amax(-1, keepdim=True).clamp_min(1e-300))
    return (v * w.pow(p).unsqueeze(-2)) @ v.transpose(-1, -2)


def balancing_matrix(g_out: torch.Tensor, g_in: torch.Tensor) -> torch.Tensor:
    """C with C G_out C^T = C^{-T} G_in C^{-1} (balanced out/in Grams): C = (G_out^{-1} # G_in)^{1/2}.

    ``#`` is the matrix geometric mean; C . X is the unique balanced point of the GL orbit up to O(d).
    """
    root = _spd_power(g_out, 0.5)
    inv_root = _spd_power(g_out, -0.5)
    mean = inv_root @ _spd_power(root @ g_in @ root, 0.5) @ inv_root
    return _spd_power(mean, 0.5)


def _procrustes(cross: torch.Tensor) -> torch.Tensor:
    """Orthogonal R maximising tr(R^T cross)."""
    u, _, vh = torch.linalg.svd(cross)
    return u @ vh


def solve_general_linear(factor: GeneralLinear, out_a, out_b, in_a, in_b) -> torch.Tensor:
    """Per unit M (out side; the in side moves by M^{-T}) aligning B's heads to A's.

    Balance both (canonical up to O(d)), then orthogonal Procrustes on out and in rows together:
    M = C_A^{-1} R C_B. Exact for B = g . A; never inflates one side to fit the other.
    """
    n = factor.count
    c_a = balancing_matrix(_group_sum(out_a, out_a, n), _group_sum(in_a, in_a, n))
    c_b = balancing_matrix(_group_sum(out_b, out_b, n), _group_sum(in_b, in_b, n))
    cross = c_a @ _group_sum(out_a, out_b, n) @ c_b.transpose(-1, -2)
    cross = cross + torch.linalg.inv(c_a).transpose(-1, -2) @ _group_sum(in_a, in_b, n) @ torch.linalg.inv(c_b)
    return torch.linalg.solve(c_a, _procrustes(cross) @ c_b)


def _complex_pairs(factor: RotationScaling, x: torch.Tensor) -> torch.Tensor:
    p = pairs_view(x.transpose(-1, -2), factor.dim, factor.layout)  # (units, features, d/2, 2)
    return torch.view_as_complex(p.contiguous()).reshape(factor.count, -1, factor.dim // 2)


def solve_rotation_scaling(factor: RotationScaling, out_a, out_b, in_a, in_b) -> torch.Tensor:
    """Per unit and frequency pair z = (c_B / c_A) e^{i theta}: balance |q|^2 c^2 = |k|^2 / c^2, then the best
    common rotation of Q and K pairs (a rotation moves both sides alike). Returns (a, b) pairs."""
    qa, qb, ka, kb = (_complex_pairs(factor, x) for x in (out_a, out_b, in_a, in_b))

    def balance(q, k):
        nq, nk = (q.abs() ** 2).sum(1), (k.abs() ** 2).sum(1)
        ok = (nq > 0) & (nk > 0)
        return torch.where(ok, (nk.clamp_min(1e-300) / nq.clamp_min(1e-300)).pow(0.25), torch.ones_like(nq))

    c_a, c_b = balance(qa, ka), balance(qb, kb)
    w = (qb.conj() * qa).sum(1) * c_a * c_b + (kb.conj() * ka).sum(1) / (c_a * c_b)
    phase = torch.where(w.abs() > 0, w / w.abs().clamp_min(1e-300), torch.ones_like(w))
    z = phase * (c_b / c_a)
    return torch.view_as_real(z.contiguous()).to(torch.float64)
