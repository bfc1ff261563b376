"""Controls: quantities that look like conservation laws but are not, derived from the Spec for contrast.

- the balance ||w_in||^2 + b^2 - ||w_out||^2 of units with no positive scaling (GELU, SiLU, tanh units);
- one query head's ||Q_h||^2 - ||K_g(h)||^2 under grouped-query attention (only the group's sum is a law);
- Q/K Gram entries between different RoPE frequency pairs (only the pair-diagonal scaling is a law);
- the sum of router rows under gating without a translation symmetry (sigmoid, sigmoid-raw, normsigmoid);
- Q^T Q - K^T K per KV group under per-head QK-norm (the GL(d_h) law the norm destroys).
Each comes with the same terms as a law (:class:`symm.laws.LawTerms`), so a tracker can show that they drift by far
more than their exact-step residual would allow.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .factors import GeneralLinear
from .laws import LawTerms, quadratic_terms, unit_cross_grams
from .spec import Spec
from .views import group_gram, role_blocks


@dataclass(frozen=True)
class ControlFamily:
    name: str
    factor: str
    count: int
    linear: bool = False


def _balance_factors(spec: Spec) -> list[str]:
    children: dict[str, set[str]] = {}
    for f in spec.factors.values():
        if f.parent:
            children.setdefault(f.parent, set()).add(f.kind)
    return [
        n for n in spec.factor_order
        if spec.factors[n].kind in ("permutation", "grouped-permutation") and not spec.factors[n].batch
        and "positive-scaling" not in children.get(n, set()) and not _router_params(spec, n)
        and any(on.side == "in" for *_, on in spec.uses(n)) and any(on.side == "out" for *_, on in spec.uses(n))
    ]


def _router_params(spec: Spec, name: str) -> list[tuple[str, int]]:
    """``(param, expert axis)`` of the unbatched uses of an expert permutation (router rows and biases)."""
    batched = any(f.batch and f.parent == name for f in spec.factors.values())
    if not batched:
        return []
    return [(p, axis) for p, axis, _, on in spec.uses(name) if on.batch_axis is None and not any(on2.batch_axis == axis for *_, on2 in _all_ons(spec, p))]


def _all_ons(spec: Spec, pname: str):
    return [(a, o, on) for a, o, seg in spec.params[pname].segments() for on in seg.acts]


def _gqa_heads(spec: Spec) -> list[tuple[str, str]]:
    """``(head permutation, its Q/K child)`` for attention with fewer KV groups than query heads."""
    out = []
    for n in spec.factor_order:
        f = spec.factors[n]
        if f.kind == "head-permutation" and f.groups < f.count:
            qk = [c for c, cf in spec.factors.items() if cf.parent == n and cf.kind in ("general-linear", "rotation-scaling")]
            if qk:
                out.append((n, sorted(qk)[0]))
    return out


def _qk_norm_heads(spec: Spec) -> list[tuple[str, str, str]]:
    """``(head permutation, Q norm scale, K norm scale)`` for attention with per-head QK-norm.

    Q rows carry the heads factor as ``out``, K rows as ``in``: that tells the two norm-scale children apart.
    """
    out = []
    for n in spec.factor_order:
        if spec.factors[n].kind != "head-permutation":
            continue
        kids = [c for c in spec.factor_order if spec.factors[c].parent == n]
        role = {c: _heads_side(spec, n, c) for c in kids if spec.factors[c].kind == "norm-scale"}
        q = [c for c, sides in role.items() if sides == {"out"}]
        k = [c for c, sides in role.items() if sides == {"in"}]
        if len(q) == 1 and len(k) == 1:
            out.append((n, q[0], k[0]))
    return out


def _heads_side(spec: Spec, heads: str, child: str) -> set[str]:
    """Sides of ``heads`` on the segments where ``child`` acts."""
    sides = set()
    for p, axis, offset, _ in spec.uses(child):
        for a, o, seg in spec.params[p].segments():
            if (a, o) == (axis, offset):
                sides |= {on.side for on in seg.acts if on.factor == heads}
    return sides


def _rope_children(spec: Spec) -> list[str]:
    return [n for n in spec.factor_order if spec.factors[n].kind == "rotation-scaling" and spec.factors[n].dim >= 4]


def control_families(spec: Spec) -> list[ControlFamily]:
    out = [ControlFamily(f"{n}: unit balance without a scaling symmetry", n, spec.factors[n].count) for n in _balance_factors(spec)]
    out += [ControlFamily(f"{h}: one query head's ||Q_h||^2 - ||K_g||^2 under GQA", h, spec.factors[h].count) for h, _ in _gqa_heads(spec)]
    out += [ControlFamily(f"{c}: Q/K Gram entries between RoPE pairs", c, spec.factors[c].count * (spec.factors[c].dim // 2 - 1)) for c in _rope_children(spec)]
    for n, p, axis in _unshifted_routers(spec):
        size = spec.params[p].shape[1 - axis] if len(spec.params[p].shape) == 2 else 1
        out.append(ControlFamily(f"{p}: sum of router rows without a translation symmetry", n, size, linear=True))
    for h, _, _ in _qk_norm_heads(spec):
        f = spec.factors[h]
        out.append(ControlFamily(f"{h}: Q^T Q - K^T K per KV group under QK-norm", h, f.groups * f.head_dim * (f.head_dim + 1) // 2))
    return out


def _qk_grams(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], heads: str, q: str, k: str):
    """Per KV group ``(sum over its query heads of Q_a Q_b^T, K_a K_b^T)``, each ``(groups, d_h, d_h)``."""
    n = spec.factors[heads].groups
    ba = role_blocks(spec, a, heads)
    bb = ba if b is a else role_blocks(spec, b, heads)
    return group_gram(ba[(q, "out")], bb[(q, "out")], n), group_gram(ba[(k, "out")], bb[(k, "out")], n)


def _unshifted_routers(spec: Spec) -> list[tuple[str, str, int]]:
    """``(expert permutation, router parameter, expert axis)`` for router parameters no translation shifts."""
    return [(n, p, axis) for n in spec.factor_order for p, axis in _router_params(spec, n) if not spec.params[p].shifts]


def _pair_off_diagonal(factor) -> torch.Tensor:
    """Symmetric matrices (E_ab + E_ba)/2 linking the first dims of neighbouring RoPE pairs: ``(d/2 - 1, d, d)``."""
    from .factors.linear import pairs_view

    idx = pairs_view(torch.arange(factor.dim), factor.dim, factor.layout)[:, 0]
    mats = torch.zeros(len(idx) - 1, factor.dim, factor.dim, dtype=torch.float64)
    for k in range(len(idx) - 1):
        a, b = int(idx[k]), int(idx[k + 1])
        mats[k, a, b] = mats[k, b, a] = 0.5
    return mats


def control_terms(spec: Spec, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> LawTerms:
    """:class:`LawTerms` of every control in :func:`control_families` order."""
    g = {k: (grads[k] if k in grads else torch.zeros_like(v)) for k, v in params.items()}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("value", "of_grad", "cross", "grad_norm2", "scale")}

    def quadratic(grams_tt, grams_gg, grams_tg, mats):
        for key, value in quadratic_terms(grams_tt, grams_gg, grams_tg, mats).items():
            parts[key].append(value)

    for n in _balance_factors(spec):
        one = torch.ones(1, 1, 1, dtype=torch.float64)
        quadratic(unit_cross_grams(spec, params, params, n), unit_cross_grams(spec, g, g, n), unit_cross_grams(spec, params, g, n), one)
    for heads, qk in _gqa_heads(spec):
        f = spec.factors[heads]
        r = f.count // f.groups

        def head_level(p):
            blocks = role_blocks(spec, p, heads)
            q, k = blocks[(qk, "out")], blocks[(qk, "in")]
            k = k.repeat_interleave(r, 0) if k.shape[0] == f.groups else k
            q = q.repeat_interleave(r, 0) if q.shape[0] == f.groups else q
            return q, k

        (q, k), (gq, gk) = head_level(params), head_level(g)
        dot = lambda x, y: (x * y).sum((-1, -2))  # noqa: E731
        parts["value"].append(0.5 * (dot(q, q) - dot(k, k)))
        parts["of_grad"].append(0.5 * (dot(gq, gq) - dot(gk, gk)))
        parts["cross"].append(dot(q, gq) - dot(k, gk))
        parts["grad_norm2"].append(dot(q, q) + dot(k, k))
        parts["scale"].append(dot(q, q) + dot(k, k))
    for c in _rope_children(spec):
        mats = _pair_off_diagonal(spec.factors[c])
        quadratic(unit_cross_grams(spec, params, params, c), unit_cross_grams(spec, g, g, c), unit_cross_grams(spec, params, g, c), mats)
    for _, p, axis in _unshifted_routers(spec):
        theta, grad = params[p].to(torch.float64), g[p].to(torch.float64)
        n_out = theta.sum(axis).numel()
        parts["value"].append(theta.sum(axis).reshape(-1))
        parts["of_grad"].append(grad.sum(axis).reshape(-1))
        parts["cross"].append(grad.sum(axis).reshape(-1))
        parts["grad_norm2"].append(torch.full((n_out,), float(theta.shape[axis]), dtype=torch.float64))
        parts["scale"].append(torch.full((n_out,), float(theta.pow(2).sum()), dtype=torch.float64))
    for heads, q, k in _qk_norm_heads(spec):
        mats = GeneralLinear("qk", 1, dim=spec.factors[heads].head_dim).symmetric_generators()
        grams = (_qk_grams(spec, a, b, heads, q, k) for a, b in ((params, params), (g, g), (params, g)))
        quadratic(*grams, mats)
    cat = lambda xs: torch.cat([x.reshape(-1) for x in xs]) if xs else torch.zeros(0, dtype=torch.float64)  # noqa: E731
    return LawTerms(**{k: cat(v) for k, v in parts.items()})
