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


def solve_general_linear(factor: GeneralLinear, xa: torch.Tensor, xb: torch.Tensor, ridge: float = 1e-10) -> torch.Tensor:
    """Per unit M = argmin sum ||X_a - M X_b||^2 over the unit's rows: (sum X_a X_b^T)(sum X_b X_b^T)^{-1}."""
    n = factor.count
    xa = xa.reshape(n, -1, *xa.shape[-2:])  # (units, repeat, d, features)
    xb = xb.reshape(n, -1, *xb.shape[-2:])
    cross = torch.einsum("nkar,nkbr->nab", xa, xb)
    gram = torch.einsum("nkar,nkbr->nab", xb, xb)
    eye = torch.eye(factor.dim, dtype=gram.dtype)
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300).reshape(n, 1, 1)
    return torch.linalg.solve(gram + ridge * scale * eye, cross.transpose(-1, -2)).transpose(-1, -2)


def solve_rotation_scaling(factor: RotationScaling, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Per unit and frequency pair z = <q_b, q_a> / |q_b|^2 (complex least squares); returns (a, b) pairs."""
    n = factor.count
    pa = pairs_view(xa.transpose(-1, -2), factor.dim, factor.layout)  # (units, features, d/2, 2)
    pb = pairs_view(xb.transpose(-1, -2), factor.dim, factor.layout)
    za = torch.view_as_complex(pa.contiguous()).reshape(n, -1, factor.dim // 2)
    zb = torch.view_as_complex(pb.contiguous()).reshape(n, -1, factor.dim // 2)
    num = (zb.conj() * za).sum(1)
    den = (zb.abs() ** 2).sum(1).clamp_min(1e-300)
    z = num / den
    z = torch.where(den > 1e-280, z, torch.ones_like(z))
    return torch.view_as_real(z.contiguous()).to(torch.float64)
