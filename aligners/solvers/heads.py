"""Attention heads: matched on quantities invariant to the per-head continuous group, then the per-head GL / RoPE
factors solved in closed form.

Invariants per query head h: Q_h^T K_g(h) (scores) and V_g(h)^T O_h (value-output map), both unchanged by
Q -> M Q, K -> M^{-T} K and V -> F V, O -> F^{-T} O; under RoPE, conj(q_p)^T k_p per frequency pair p (the
rotation-scalings act pair by pair, and pair p of A can only meet pair p of B). Similarities are Frobenius inner
products computed from d_h x d_h cross-Grams (per-pair inner products under RoPE), never forming d x d matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from symm.element import GroupElement
from symm.factors import Factor, GeneralLinear, HeadPermutation, RotationScaling
from symm.factors.linear import pairs_view
from symm.views import group_gram, role_blocks

from .permutation import grouped_assignment
from .state import MatchState


def _pair_similarity(xa: torch.Tensor, xb: torch.Tensor, ya: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """<X_a^T Y_a, X_b^T Y_b>_F for all unit pairs, normalised (cosine). X, Y: (units, d_h, features)."""
    gx = torch.einsum("iar,jbr->ijab", xa, xb)
    gy = torch.einsum("iar,jbr->ijab", ya, yb)
    cross = (gx * gy).sum((-1, -2))
    na = (torch.einsum("iar,ibr->iab", xa, xa) * torch.einsum("iar,ibr->iab", ya, ya)).sum((-1, -2))
    nb = (torch.einsum("iar,ibr->iab", xb, xb) * torch.einsum("iar,ibr->iab", yb, yb)).sum((-1, -2))
    return cross / (na.clamp_min(1e-300).sqrt().unsqueeze(1) * nb.clamp_min(1e-300).sqrt().unsqueeze(0))


def _rope_pair_similarity(factor: RotationScaling, xa, xb, ya, yb) -> torch.Tensor:
    """sum_p Re <conj(q_p)^T k_p of A, the same of B>_F over RoPE frequency pairs p, normalised (cosine).

    With q_p, k_p the complex rows of pair p (q = a + ib), a rotation-scaling z per pair maps q_p -> z q_p and
    k_p -> k_p / conj(z): conj(q_p)^T k_p is invariant, pair by pair. Finer than Q^T K = sum_p Re conj(q_p)^T k_p,
    which mixes the frequencies: pair p of A can only meet pair p of B. Computed from per-pair inner products:
    <conj(q^A)^T k^A, conj(q^B)^T k^B> = (q^A . conj(q^B))^* (k^A . conj(k^B)).
    """

    def pairs(x: torch.Tensor) -> torch.Tensor:  # (units, d_h, features) -> (units, features, d_h / 2) complex
        return torch.view_as_complex(pairs_view(x.transpose(-1, -2), factor.dim, factor.layout).contiguous())

    qa, qb, ka, kb = (pairs(x) for x in (xa, xb, ya, yb))
    qq = torch.einsum("ixp,jxp->ijp", qa.conj(), qb)
    kk = torch.einsum("iyp,jyp->ijp", ka, kb.conj())
    cross = (qq * kk).sum(-1).real
    na = (qa.abs().pow(2).sum(1) * ka.abs().pow(2).sum(1)).sum(-1)
    nb = (qb.abs().pow(2).sum(1) * kb.abs().pow(2).sum(1)).sum(-1)
    return cross / (na.clamp_min(1e-300).sqrt().unsqueeze(1) * nb.clamp_min(1e-300).sqrt().unsqueeze(0))


def head_scores(factor: HeadPermutation, a: dict, b: dict, children: Mapping[str, Factor] | None = None) -> torch.Tensor:
    """(H, H) similarity of query heads of A and B from the Q/K and V/O invariants (X_out^T X_in per child; per
    frequency pair for a RoPE rotation-scaling child, given ``children``: name -> factor)."""
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
        kind = (children or {}).get(child)
        if isinstance(kind, RotationScaling) and xa.shape[1] == kind.dim:
            score += _rope_pair_similarity(kind, xa, xb, ya, yb)
        else:
            score += _pair_similarity(xa, xb, ya, yb)
    return score


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
    c_a = balancing_matrix(group_gram(out_a, out_a, n), group_gram(in_a, in_a, n))
    c_b = balancing_matrix(group_gram(out_b, out_b, n), group_gram(in_b, in_b, n))
    cross = c_a @ group_gram(out_a, out_b, n) @ c_b.transpose(-1, -2)
    cross = cross + torch.linalg.inv(c_a).transpose(-1, -2) @ group_gram(in_a, in_b, n) @ torch.linalg.inv(c_b)
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


#: child kind -> closed-form per-head solver ``(factor, out_a, out_b, in_a, in_b) -> element``
WITHIN_HEAD = {"general-linear": solve_general_linear, "rotation-scaling": solve_rotation_scaling}


def head_step(state: MatchState, name: str, within: bool = True) -> bool:
    """Match heads on invariants (unless fixed), then solve each free GL / RoPE child in closed form.

    Returns True if the head permutation moved (continuous updates do not count as a change).
    """
    spec = state.spec
    factor = spec.factors[name]
    moved = False
    if state.free(name):
        children = {c: spec.factors[c] for c in state.children(name)}
        score = head_scores(factor, role_blocks(spec, state.a, name), role_blocks(spec, state.b, name), children)
        sigma = grouped_assignment(score, factor.groups, state.backend)
        if not factor.is_identity(sigma):
            state.apply(GroupElement.identity(spec).replace(**{name: sigma}), [name])
            moved = True
    children = [c for c in state.children(name) if state.free(c) and spec.factors[c].kind in WITHIN_HEAD]
    if not within or not children:
        return moved
    blocks_a, blocks_b = role_blocks(spec, state.a, name), role_blocks(spec, state.b, name)
    values = {}
    for child in children:
        keys = ((child, "out"), (child, "in"))
        if not all(k in blocks_a for k in keys):
            continue
        sides = (blocks_a[keys[0]], blocks_b[keys[0]], blocks_a[keys[1]], blocks_b[keys[1]])
        values[child] = WITHIN_HEAD[spec.factors[child].kind](spec.factors[child], *sides)
    if values:
        state.apply(GroupElement.identity(spec).replace(**values), list(values))
    return moved

