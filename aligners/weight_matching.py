"""Weight matching over every factor of a Spec: find g with g . theta_B close to theta_A.

1. Scalings are fixed canonically (balanced forms, :mod:`aligners.canonical`).
2. Block-coordinate ascent over the permutation factors in random order: each step is one linear assignment on
   the summed correlation of every tensor axis the factor touches (signed when a sign-flip child rides along);
   a permutation with batched children (experts) is matched on invariant scores (centred router rows, and
   per expert pair the value of the best assignment of their units); head permutations are matched on per-head invariants, then their GL / RoPE children are
   solved in closed form; translations by centring. Each step yields an update Delta applied to the current
   B, and the running element is ``Delta . g`` (so composition does the bookkeeping).
3. Stop when a full sweep changes no permutation or does not raise the objective sum <theta_A, g.theta_B>
   (steps matched on invariants can cycle); the best element seen is returned.
Result: ``c_A^{-1} . g . c_B``, applied with ``spec.act`` like every element.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from symm.action import act_param
from symm.element import GroupElement
from symm.errors import SpecError
from symm.factors import GeneralLinear, HeadPermutation, Permutation, RotationScaling, SignFlip, Translation
from symm.spec import Spec

from .canonical import balance_scalings
from .heads import grouped_assignment, head_scores, role_blocks, solve_general_linear, solve_rotation_scaling
from .solvers import linear_assignment
from .views import unit_matrix

log = logging.getLogger(__name__)


@dataclass
class MatchInfo:
    """Diagnostics filled in by :func:`weight_matching`."""

    sweeps: int = 0
    objective: list[float] = field(default_factory=list)
    converged: bool = False


def _to64(params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach().double() if torch.is_floating_point(v) else v) for k, v in params.items()}


def _apply(spec: Spec, current: dict[str, torch.Tensor], delta: GroupElement, names: Iterable[str]) -> None:
    touched = {p for n in names for p, *_ in spec.uses(n)} | {p for n in names for p, _ in spec.shifts_of(n)}
    for p in touched:
        current[p] = act_param(spec, spec.params[p], current[p], delta.values)


def _objective(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return float(sum((a[k] * b[k]).sum() for k in a if torch.is_floating_point(a[k])))


def _descendants(spec: Spec, name: str) -> set[str]:
    out = set()
    for n, f in spec.factors.items():
        p = f.parent
        while p is not None:
            if p == name:
                out.add(n)
                break
            p = spec.factors[p].parent
    return out


def _segment(spec: Spec, pname: str, axis: int, offset: int):
    for a, o, seg in spec.params[pname].segments():
        if a == axis and o == offset:
            return seg
    raise KeyError((pname, axis, offset))


def _batched_rows(spec: Spec, pname: str, x: torch.Tensor, unit_axis: int, children: set[str]) -> list[torch.Tensor]:
    """``(E, I, features)`` per segment carrying a batched child permutation along ``unit_axis`` (experts)."""
    out = []
    for axis, offset, seg in spec.params[pname].segments():
        for on in seg.acts:
            if on.factor in children and on.batch_axis == unit_axis:
                part = x.narrow(axis, offset, seg.size).movedim((unit_axis, axis), (0, 1))
                out.append(part.reshape(part.shape[0], part.shape[1], -1))
    return out


def _paired_unit_score(xa: torch.Tensor, xb: torch.Tensor, backend: str) -> torch.Tensor:
    """S[e, f] = best assignment value between the units of expert e of A and expert f of B (normalised)."""
    n = xa.shape[0]
    score = torch.empty(n, n, dtype=torch.float64)
    for e in range(n):
        corr = torch.einsum("ir,fjr->fij", xa[e], xb)
        sigma = linear_assignment(corr, backend)
        score[e] = corr.gather(-1, sigma.unsqueeze(-1)).squeeze(-1).sum(-1).double()
    return score / (xa.norm() * xb.norm()).clamp_min(1e-300).double()


def permutation_score(
    spec: Spec,
    a: Mapping[str, torch.Tensor],
    b: Mapping[str, torch.Tensor],
    name: str,
    dtype: torch.dtype = torch.float64,
    backend: str = "auto",
) -> torch.Tensor:
    """Summed correlation ``S[i, j]`` of unit i of A with unit j of B over every use of factor ``name``.

    The matmuls run in ``dtype`` (float32 for float32 checkpoints: the assignment needs no more). For experts
    (a factor with batched child permutations) the score of a pair is the value of the best assignment of their
    units, plus the correlation of centred router rows (translation-invariant).
    """
    factor = spec.factors[name]
    batched = {d for d in _descendants(spec, name) if spec.factors[d].batch and spec.factors[d].is_permutation}
    score = None
    rows_a: list[torch.Tensor] = []
    rows_b: list[torch.Tensor] = []
    for pname, axis, offset, on in spec.uses(name):
        seg = _segment(spec, pname, axis, offset)
        batched_rows = _batched_rows(spec, pname, a[pname], axis, batched) if batched else []
        if batched_rows:  # expert weights: compared after matching their own units (invariant to those)
            rows_a += [r.to(dtype) for r in batched_rows]
            rows_b += [r.to(dtype) for r in _batched_rows(spec, pname, b[pname], axis, batched)]
            continue
        else:
            ra = unit_matrix(spec, a[pname], axis, offset, seg.size, on).to(dtype)
            rb = unit_matrix(spec, b[pname], axis, offset, seg.size, on).to(dtype)
            if batched:  # e.g. router rows: centre (translation-invariant) and normalise
                ra, rb = ra - ra.mean(0), rb - rb.mean(0)
                part = (ra @ rb.transpose(-1, -2)) / (ra.norm() * rb.norm()).clamp_min(1e-300)
            else:
                part = ra @ rb.transpose(-1, -2)
        part = part.double()
        score = part if score is None else score + part
    if rows_a:
        part = _paired_unit_score(torch.cat(rows_a, -1), torch.cat(rows_b, -1), backend)
        score = part if score is None else score + part
    assert score is not None
    return score.reshape(*factor.batch, factor.count, factor.count)


def _sign_child(spec: Spec, name: str) -> str | None:
    for n, f in spec.factors.items():
        if f.parent == name and isinstance(f, SignFlip):
            return n
    return None


def _permutation_step(spec: Spec, a, b, name: str, backend: str, dtype: torch.dtype) -> GroupElement | None:
    score = permutation_score(spec, a, b, name, dtype, backend)
    sign = _sign_child(spec, name)
    sigma = linear_assignment(score.abs() if sign else score, backend)
    factor = spec.factors[name]
    if factor.is_identity(sigma) and (sign is None or bool((score.gather(-1, sigma.unsqueeze(-1)) >= 0).all())):
        return None
    values = {name: sigma}
    if sign:
        matched = score.gather(-1, sigma.unsqueeze(-1)).squeeze(-1)
        signs = torch.where(matched < 0, -1.0, 1.0).to(torch.float64)
        element = torch.ones_like(signs)
        element.scatter_(-1, sigma, signs)  # normal form: flip B's unit sigma[i] before permuting
        values[sign] = element
    return spec.identity().replace(**values)


def _head_step(spec: Spec, a, b, name: str, backend: str, within: bool = True) -> tuple[GroupElement | None, GroupElement]:
    factor = spec.factors[name]
    assert isinstance(factor, HeadPermutation)
    sigma = grouped_assignment(factor, head_scores(factor, role_blocks(spec, a, name), role_blocks(spec, b, name)), backend)
    perm_delta = None if factor.is_identity(sigma) else spec.identity().replace(**{name: sigma})
    if perm_delta is not None:
        _apply(spec, b, perm_delta, [name])
    if not within:
        return perm_delta, spec.identity()
    blocks_a, blocks_b = role_blocks(spec, a, name), role_blocks(spec, b, name)
    values = {}
    for child, f in spec.factors.items():
        if f.parent != name or (child, "out") not in blocks_a:
            continue
        if (child, "in") not in blocks_a:
            continue
        sides = (blocks_a[(child, "out")], blocks_b[(child, "out")], blocks_a[(child, "in")], blocks_b[(child, "in")])
        if isinstance(f, GeneralLinear):
            values[child] = solve_general_linear(f, *sides)
        elif isinstance(f, RotationScaling):
            values[child] = solve_rotation_scaling(f, *sides)
    cont_delta = spec.identity().replace(**values)
    _apply(spec, b, cont_delta, list(values))
    return perm_delta, cont_delta


def _translation_step(spec: Spec, a, b, name: str) -> GroupElement:
    ((pname, shift),) = spec.shifts_of(name)
    t = (a[pname] - b[pname]).mean(shift.axis).reshape(-1)
    return spec.identity().replace(**{name: t})


def weight_matching(
    spec: Spec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
    backend: str = "auto",
    fixed: Mapping[str, torch.Tensor] | None = None,
    within_heads: bool = True,
    progress: bool = True,
    info: MatchInfo | None = None,
) -> GroupElement:
    """The element g of ``spec``'s group with ``g . params_b`` matched to ``params_a``.

    ``fixed``: factor values decided elsewhere (e.g. by activation matching, or the identity to switch a factor
    off), kept as given. ``within_heads=False`` matches heads but skips the per-head GL / RoPE alignment.
    """
    spec.check_params(params_a, what="checkpoint A")
    spec.check_params(params_b, what="checkpoint B")
    fixed = dict(fixed or {})
    unknown = set(fixed) - set(spec.factors)
    if unknown:
        raise SpecError(f"fixed values for unknown factors: {sorted(unknown)}")
    a64, b64 = _to64(params_a), _to64(params_b)
    exact = any(v.dtype == torch.float64 for v in (*params_a.values(), *params_b.values()))
    score_dtype = torch.float64 if exact else torch.float32
    canon_a, canon_b = balance_scalings(spec, a64), balance_scalings(spec, b64)
    a_hat = spec.act(a64, canon_a)
    b_cur = spec.act(b64, canon_b)
    g = spec.identity()
    if fixed:
        g = spec.identity().replace(**fixed)
        b_cur = spec.act(b_cur, g)
    info = info if info is not None else MatchInfo()
    movable = [n for n in spec.factor_order if n not in fixed and isinstance(spec.factors[n], (Permutation, HeadPermutation))]
    translations = [n for n in spec.factor_order if n not in fixed and isinstance(spec.factors[n], Translation)]
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, GroupElement] | None = None
    bar = tqdm(range(max_sweeps), desc="weight matching", unit="sweep", disable=not progress or not movable, leave=False)
    for sweep in bar:
        changed = 0
        for i in torch.randperm(len(movable), generator=gen).tolist():
            name = movable[i]
            if isinstance(spec.factors[name], HeadPermutation):
                perm_delta, cont_delta = _head_step(spec, a_hat, b_cur, name, backend, within_heads)
                if perm_delta is not None:
                    g, changed = perm_delta.compose(g), changed + 1
                g = cont_delta.compose(g)
                continue
            delta = _permutation_step(spec, a_hat, b_cur, name, backend, score_dtype)
            if delta is not None:
                _apply(spec, b_cur, delta, [name] + [n for n in delta.spec.factors if spec.factors[n].parent == name])
                g, changed = delta.compose(g), changed + 1
        for name in translations:
            delta = _translation_step(spec, a_hat, b_cur, name)
            _apply(spec, b_cur, delta, [name])
            g = delta.compose(g)
        objective = _objective(a_hat, b_cur)
        info.objective.append(objective)
        info.sweeps = sweep + 1
        bar.set_postfix(changed=changed, objective=f"{objective:.4g}")
        if best is None or objective > best[0]:
            best = (objective, g)
        no_progress = len(info.objective) > 1 and objective <= info.objective[-2] + 1e-12 * abs(info.objective[-2])
        if changed == 0 or no_progress:
            info.converged = True
            break
    log.info("weight matching: %d sweeps, converged=%s", info.sweeps, info.converged)
    g = best[1] if best is not None else g
    return canon_a.inverse().compose(g).compose(canon_b)
