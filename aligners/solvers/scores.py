"""Permutation scores kept up to date incrementally: S = sum over uses of A_u B_u^T (unit rows of A and B).

Between two visits of a factor, other factors move only some columns (features) of its use matrices B_u, so
its score changes by a low-rank update: S += A_u[:, K] (B_u[:, K] - B_u_old[:, K])^T over the changed columns
K. The factor's own moves permute (and sign-flip) B_u's rows, which permutes S's columns: tracked exactly.
A score whose uses did not change at all is unchanged, so its assignment is too.

Memory: a factor keeps one summed score per kind (signed, plain), not one per use, and its rows of A and B are
views of the parameters where the layout allows (parameters are replaced, never modified in place), so no
factor holds its own copy of either model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from symm.views import segment_of, unit_matrix

from .state import MatchState

#: a use whose changed feature columns exceed this fraction is updated by one dense product with the difference
DENSE_FRACTION = 0.5
#: recompute a factor's scores from scratch after this many incremental updates (bounds accumulated round-off)
MAX_UPDATES = 16


@dataclass
class UseCache:
    """One use ``(param, axis, offset, On)`` of a factor: A's rows and B's rows as last scored.

    Rows are views of the parameters where the layout allows (parameters are replaced, never modified in place,
    so a view keeps the version it was taken from): no copy of either model is kept per factor."""

    signed: bool
    rows_a: torch.Tensor
    rows_b: torch.Tensor
    version: int = 0


@dataclass
class FactorScores:
    """The summed scores of one factor, S_signed and S_plain (sums over its uses of A_u B_u^T), and its uses."""

    uses: list[UseCache]
    signed: torch.Tensor | None
    plain: torch.Tensor | None
    updates: int = 0

    def add(self, signed: bool, part: torch.Tensor) -> None:
        if signed:
            self.signed = part if self.signed is None else self.signed + part
        else:
            self.plain = part if self.plain is None else self.plain + part


def _use_rows(state: MatchState, params: dict, use) -> torch.Tensor:
    pname, axis, offset, on = use
    size = segment_of(state.spec, pname, axis, offset).size
    return unit_matrix(state.spec, params[pname], axis, offset, size, on).to(device=state.device, dtype=state.score_dtype)


def _rescore(scores: FactorScores) -> None:
    """Every use's product afresh (bounds the round-off of incremental updates)."""
    scores.signed = scores.plain = None
    for cache in scores.uses:
        scores.add(cache.signed, cache.rows_a @ cache.rows_b.transpose(-1, -2))
    scores.updates = 0


def _refresh(scores: FactorScores, cache: UseCache, rows_b: torch.Tensor) -> bool:
    """Bring one use to the current rows of B, updating the factor's sums; True if anything changed."""
    diff = rows_b != cache.rows_b
    cols = diff.reshape(-1, diff.shape[-1]).any(0).nonzero().squeeze(-1)
    del diff
    if cols.numel() > DENSE_FRACTION * rows_b.shape[-1]:
        scores.add(cache.signed, cache.rows_a @ (rows_b - cache.rows_b).transpose(-1, -2))
    elif cols.numel() > 0:
        delta = (rows_b.index_select(-1, cols) - cache.rows_b.index_select(-1, cols)).transpose(-1, -2)
        scores.add(cache.signed, cache.rows_a.index_select(-1, cols) @ delta)
    cache.rows_b = rows_b  # the current version (the old one is released)
    return cols.numel() > 0


def _on_cpu(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.cpu()


def cached_scores(state: MatchState, name: str, sign: str | None) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """``(S_signed, S_plain, changed)`` for factor ``name``; ``changed`` is False if no use moved since last time."""
    uses = state.spec.uses(name)
    scores: FactorScores | None = state.cache.get(("scores", name))
    changed = scores is None
    if scores is None:
        scores = FactorScores([], None, None)
        for use in uses:
            ra, rb = _use_rows(state, state.a, use), _use_rows(state, state.b, use)
            seg = segment_of(state.spec, use[0], use[1], use[2])
            signed = sign is not None and any(o.factor == sign for o in seg.acts)
            scores.uses.append(UseCache(signed, ra, rb, state.versions.get(use[0], 0)))
            scores.add(signed, ra @ rb.transpose(-1, -2))
        state.cache[("scores", name)] = scores
    else:
        for use, cache in zip(uses, scores.uses):
            version = state.versions.get(use[0], 0)
            if version != cache.version:  # the parameter was moved since: find what changed
                changed |= _refresh(scores, cache, _use_rows(state, state.b, use))
                cache.version = version
        if changed:
            scores.updates += 1
            if scores.updates >= MAX_UPDATES:
                _rescore(scores)
    return _on_cpu(scores.signed), _on_cpu(scores.plain), changed


def track_own_move(state: MatchState, name: str, sigma: torch.Tensor, flips: torch.Tensor | None) -> None:
    """After ``name`` moved B's units (new unit i = flips[i] * old unit sigma[i]), move its cached rows/columns alike."""
    scores: FactorScores | None = state.cache.get(("scores", name))
    if scores is None:
        return
    movers = {name} | {n for n, f in state.spec.factors.items() if f.parent == name}
    uses = state.spec.uses(name)
    sigma = sigma.to(state.device)
    f = None if flips is None else flips.to(device=state.device, dtype=state.score_dtype)
    for use, cache in zip(uses, scores.uses):
        pname, axis = use[0], use[1]
        elsewhere = [u for n in movers for u in state.spec.uses(n) if u[0] == pname and u[1] != axis]
        if not elsewhere:  # the move changed only this use's rows: they are the parameter's current rows
            cache.version = state.versions.get(pname, 0)
            cache.rows_b = _use_rows(state, state.b, use)
            continue
        index = sigma.unsqueeze(-1).expand(*sigma.shape, cache.rows_b.shape[-1])
        rows = cache.rows_b.gather(-2, index)
        if cache.signed and f is not None:
            rows = rows * f.unsqueeze(-1)
        cache.rows_b = rows
    for kind in ("signed", "plain"):
        total = getattr(scores, kind)
        if total is None:
            continue
        total = total.gather(-1, sigma.unsqueeze(-2).expand_as(total))
        if kind == "signed" and f is not None:
            total = total * f.unsqueeze(-2)
        setattr(scores, kind, total)
