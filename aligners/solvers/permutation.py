"""Solvers for unit permutations: plain, grouped (GroupNorm channels), batched (units inside experts), experts.

Score of unit i of A against unit j of B: the summed correlation of their rows over every use of the factor.
With a free sign-flip child, uses that carry the sign (s_j x_j) and uses that do not (x_j) are scored apart,
S_signed and S_plain; the best sign of a pair gives |S_signed| + S_plain, assigned by one LAP, and each unit's
sign is then sign(S_signed[i, sigma(i)]). Experts (a permutation with batched child permutations) are scored on
quantities invariant to their units' own permutations: centred router rows and, per expert pair, the value of the
best assignment of their units.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from symm.element import GroupElement
from symm.views import segment_of, unit_matrix

from ..assignment import AssignmentState, linear_assignment, resolve_backend, solve_warm
from .scores import cached_scores, track_own_move
from .state import MatchState

Assign = Callable[[MatchState, str, torch.Tensor], torch.Tensor]


def plain_assignment(state: MatchState, name: str, score: torch.Tensor) -> torch.Tensor:
    """One LAP; with the "jv" backend warm-started from this factor's previous solve (exact either way)."""
    if resolve_backend(state.backend, score.shape[-1]) != "jv":
        return linear_assignment(score, state.backend)
    sigma, solved = solve_warm(score, state.cache.get(("lap", name)))
    # the step moves B's units by sigma: in the new coordinates the assignment is the identity and column j's
    # dual is that of old column sigma[j]
    index = sigma.numpy()
    state.cache[("lap", name)] = AssignmentState(
        sigma=np.broadcast_to(np.arange(index.shape[-1]), index.shape).copy(),
        row_dual=solved.row_dual,
        col_dual=np.take_along_axis(solved.col_dual, index, axis=-1),
        stats=solved.stats,
    )
    return sigma


def grouped_assignment(score: torch.Tensor, groups: int, backend: str = "auto") -> torch.Tensor:
    """Best permutation of ``n`` units in ``groups`` consecutive blocks that maps blocks to blocks.

    Exact: the best inner assignment per (block of A, block of B) pair, then the best matching of blocks on
    those values.
    """
    n = score.shape[-1]
    r = n // groups
    if groups == n or r == n:
        return linear_assignment(score, backend)
    blocks = score.reshape(groups, r, groups, r).permute(0, 2, 1, 3)  # (block A, block B, unit A, unit B)
    inner = linear_assignment(blocks, backend)
    value = blocks.gather(-1, inner.unsqueeze(-1)).squeeze(-1).sum(-1)
    block_perm = linear_assignment(value, backend)
    within = inner[torch.arange(groups), block_perm]
    return (block_perm.unsqueeze(-1) * r + within).reshape(-1)


def channel_group_assignment(state: MatchState, name: str, score: torch.Tensor) -> torch.Tensor:
    return grouped_assignment(score, state.spec.factors[name].groups, state.backend)


def batched_descendants(state: MatchState, name: str) -> set[str]:
    """Batched permutations indexed (directly or not) by ``name``: the units inside each expert."""
    spec, out = state.spec, set()
    for n, f in spec.factors.items():
        p = f.parent
        while p is not None and p != name:
            p = spec.factors[p].parent
        if p == name and f.batch and f.is_permutation:
            out.add(n)
    return out


def _expert_rows(state: MatchState, params: dict, pname: str, unit_axis: int, inner: set[str]) -> list[tuple[bool, torch.Tensor]]:
    """``(signed, (E, I, features))`` per segment carrying an inner (batched) permutation with batch axis ``unit_axis``;
    ``signed``: the segment also carries the units' sign flips (SwiGLU up rows and down columns)."""
    out = []
    for axis, offset, seg in state.spec.params[pname].segments():
        if any(on.factor in inner and on.batch_axis == unit_axis for on in seg.acts):
            part = params[pname].narrow(axis, offset, seg.size).movedim((unit_axis, axis), (0, 1))
            signed = any(state.spec.factors[on.factor].kind == "sign-flip" for on in seg.acts)
            out.append((signed, part.reshape(part.shape[0], part.shape[1], -1)))
    return out


def _paired_unit_score(plain: tuple[torch.Tensor, torch.Tensor] | None, signed: tuple[torch.Tensor, torch.Tensor] | None,
                       backend: str) -> torch.Tensor:
    """S[e, f] = value of the best assignment between the units of expert e of A and expert f of B (normalised);
    each pair of units scores plain + |signed| (its best sign), as for unbatched units."""
    parts = [x for x in (plain, signed) if x is not None]
    n = parts[0][0].shape[0]
    score = torch.empty(n, n, dtype=torch.float64)
    for e in range(n):
        corr = torch.einsum("ir,fjr->fij", plain[0][e], plain[1]) if plain is not None else 0.0
        if signed is not None:
            corr = corr + torch.einsum("ir,fjr->fij", signed[0][e], signed[1]).abs()
        sigma = linear_assignment(corr, backend)
        score[e] = corr.gather(-1, sigma.unsqueeze(-1)).squeeze(-1).sum(-1).double()
    norm_a = sum(float(x[0].pow(2).sum()) for x in parts) ** 0.5
    norm_b = sum(float(x[1].pow(2).sum()) for x in parts) ** 0.5
    return score / max(norm_a * norm_b, 1e-300)


def expert_scores(state: MatchState, name: str, inner: set[str]) -> torch.Tensor:
    """Expert-pair similarity, invariant to each expert's unit permutations and to router translations."""
    spec, dtype = state.spec, state.score_dtype
    score = torch.zeros(spec.factors[name].count, spec.factors[name].count, dtype=torch.float64)
    rows: dict[bool, tuple[list[torch.Tensor], list[torch.Tensor]]] = {False: ([], []), True: ([], [])}
    for pname, axis, offset, on in spec.uses(name):
        found = _expert_rows(state, state.a, pname, axis, inner)
        if found:
            for (signed, ra), (_, rb) in zip(found, _expert_rows(state, state.b, pname, axis, inner)):
                rows[signed][0].append(ra.to(dtype))
                rows[signed][1].append(rb.to(dtype))
            continue
        seg = segment_of(spec, pname, axis, offset)
        ra = unit_matrix(spec, state.a[pname], axis, offset, seg.size, on).to(dtype)
        rb = unit_matrix(spec, state.b[pname], axis, offset, seg.size, on).to(dtype)
        ra, rb = ra - ra.mean(0), rb - rb.mean(0)  # router rows: centring removes the translation
        score += ((ra @ rb.transpose(-1, -2)) / (ra.norm() * rb.norm()).clamp_min(1e-300)).double()
    if rows[False][0] or rows[True][0]:
        plain, signed = ((torch.cat(rows[k][0], -1), torch.cat(rows[k][1], -1)) if rows[k][0] else None for k in (False, True))
        score += _paired_unit_score(plain, signed, state.backend)
    return score


def permutation_step(state: MatchState, name: str, assign: Assign = plain_assignment) -> bool:
    """One block-coordinate step on permutation ``name`` (and its free sign child); True if anything moved."""
    spec = state.spec
    factor = spec.factors[name]
    signs = state.children(name, "sign-flip")
    sign = signs[0] if signs and state.free(signs[0]) else None
    inner = batched_descendants(state, name)
    if inner:
        signed, plain = None, expert_scores(state, name, inner)
    else:
        signed, plain, changed = cached_scores(state, name, sign)
        if not changed:  # same score as when this factor was last solved: its assignment stands
            return False
    if signed is None:
        effective = plain
    else:  # the best sign of each pair: |S_signed| + S_plain
        effective = signed.abs() if plain is None else signed.abs() + plain
    effective = effective.reshape(*factor.batch, factor.count, factor.count)
    sigma = factor.identity() if not state.free(name) else assign(state, name, effective)
    values: dict[str, torch.Tensor] = {}
    if not factor.is_identity(sigma):
        values[name] = sigma
    flips = None
    if sign is not None and signed is not None:
        matched = signed.reshape(effective.shape).gather(-1, sigma.unsqueeze(-1)).squeeze(-1)
        flips = torch.where(matched < 0, -1.0, 1.0).to(torch.float64)
        if bool((flips < 0).any()):
            element = torch.ones_like(flips)
            element.scatter_(-1, sigma, flips)  # normal form: flip B's unit sigma[i], then permute
            values[sign] = element
    if not values:
        return False
    state.apply(GroupElement.identity(spec).replace(**values), [name, *([sign] if sign else [])])
    if not inner:
        track_own_move(state, name, sigma, flips)
    return True


def grouped_permutation_step(state: MatchState, name: str) -> bool:
    return permutation_step(state, name, channel_group_assignment)
