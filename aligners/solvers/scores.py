"""Permutation scores kept up to date incrementally: S = sum over uses of A_u B_u^T (unit rows of A and B).

Between two visits of a factor, other factors move only some columns (features) of its use matrices B_u, so
its score changes by a low-rank update: S += A_u[:, K] (B_u[:, K] - B_u_old[:, K])^T over the changed columns
K. The factor's own moves permute (and sign-flip) B_u's rows, which permutes S's columns: tracked exactly.
A score whose uses did not change at all is unchanged, so its assignment is too (:attr:`UseCache.unchanged`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from symm.views import segment_of, unit_matrix

from .state import MatchState

#: recompute a use's score from scratch when more than this fraction of its feature columns changed
DENSE_FRACTION = 0.5
#: recompute from scratch after this many incremental updates (bounds accumulated round-off)
MAX_UPDATES = 16


@dataclass
class UseCache:
    """One use ``(param, axis, offset, On)`` of a factor: A's rows, B's rows as last scored, and A_u B_u^T."""

    signed: bool
    rows_a: torch.Tensor
    rows_b: torch.Tensor
    part: torch.Tensor
    version: int = 0
    updates: int = 0


def _use_rows(state: MatchState, params: dict, use) -> torch.Tensor:
    pname, axis, offset, on = use
    size = segment_of(state.spec, pname, axis, offset).size
    return unit_matrix(state.spec, params[pname], axis, offset, size, on).to(state.score_dtype)


def _refresh(cache: UseCache, rows_b: torch.Tensor) -> bool:
    """Bring ``cache`` to the current rows of B; True if anything changed."""
    diff = rows_b != cache.rows_b
    cols = diff.reshape(-1, diff.shape[-1]).any(0).nonzero().squeeze(-1)
    if cols.numel() == 0:
        return False
    if cols.numel() > DENSE_FRACTION * diff.shape[-1] or cache.updates >= MAX_UPDATES:
        cache.part = cache.rows_a @ rows_b.transpose(-1, -2)
        cache.updates = 0
    else:
        delta = (rows_b.index_select(-1, cols) - cache.rows_b.index_select(-1, cols)).transpose(-1, -2)
        cache.part = cache.part + cache.rows_a.index_select(-1, cols) @ delta
        cache.updates += 1
    # parameters are replaced, never modified in place, so a fresh tensor (not a view) can be kept as is
    cache.rows_b = rows_b if rows_b._base is None else rows_b.clone()
    return True


def cached_scores(state: MatchState, name: str, sign: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """``(S_signed, S_plain, changed)`` for factor ``name``; ``changed`` is False if no use moved since last time."""
    uses = state.spec.uses(name)
    caches: list[UseCache] | None = state.cache.get(("scores", name))
    changed = caches is None
    if caches is None:
        caches = []
        for use in uses:
            ra, rb = _use_rows(state, state.a, use), _use_rows(state, state.b, use)
            seg = segment_of(state.spec, use[0], use[1], use[2])
            signed = sign is not None and any(o.factor == sign for o in seg.acts)
            version = state.versions.get(use[0], 0)
            caches.append(UseCache(signed, ra.contiguous(), rb.clone(), ra @ rb.transpose(-1, -2), version))
        state.cache[("scores", name)] = caches
    else:
        for use, cache in zip(uses, caches):
            version = state.versions.get(use[0], 0)
            if version != cache.version:  # the parameter was moved since: find what changed
                changed |= _refresh(cache, _use_rows(state, state.b, use))
                cache.version = version
    return _total([c.part for c in caches if c.signed]), _total([c.part for c in caches if not c.signed]), changed


def _total(parts: list[torch.Tensor]) -> torch.Tensor | None:
    """Sum of ``parts`` (a new tensor unless there is only one), or None."""
    if not parts:
        return None
    out = parts[0]
    for part in parts[1:]:
        out = out + part
    return out


def track_own_move(state: MatchState, name: str, sigma: torch.Tensor, flips: torch.Tensor | None) -> None:
    """After ``name`` moved B's units (new unit i = flips[i] * old unit sigma[i]), move its cached rows/columns alike."""
    caches: list[UseCache] | None = state.cache.get(("scores", name))
    if caches is None:
        return
    movers = {name} | {n for n, f in state.spec.factors.items() if f.parent == name}
    uses = state.spec.uses(name)
    for use, cache in zip(uses, caches):
        pname, axis = use[0], use[1]
        elsewhere = [u for n in movers for u in state.spec.uses(n) if u[0] == pname and u[1] != axis]
        if not elsewhere:  # the move changed only this use's rows, tracked below: its parameter is seen as is
            cache.version = state.versions.get(pname, 0)
        index = sigma.unsqueeze(-1).expand(*sigma.shape, cache.rows_b.shape[-1])
        rows = cache.rows_b.gather(-2, index)
        part = cache.part.gather(-1, sigma.unsqueeze(-2).expand_as(cache.part))
        if cache.signed and flips is not None:
            f = flips.to(rows.dtype)
            rows = rows * f.unsqueeze(-1)
            part = part * f.unsqueeze(-2)
        cache.rows_b, cache.part = rows, part
