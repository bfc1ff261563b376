"""One-sided norm scales (a following normalisation absorbs them): B's unit norms are set to A's.

The function ignores these scales, and weight matching's objective <A, g.B> grows without bound in them, so they
are not matched: each unit of B is rescaled to the norm of the A unit it is matched with (exact for B = h^{-1} . A),
so that interpolating A and B mixes directions of equal length. Runs after each sweep (the permutations move units).
Exact when no other continuous factor acts on the scaled rows (QK-norm: only the stream permutation reads them). In a
training-mode CNN spec the next ReLU scale also acts on the conv feeding the BatchNorm, and its canonical balancing does
not see the norm scale: the result is a valid element that brings B close to A, not onto it. (Aligners use eval specs,
which hold no BatchNorm scales.)
"""

from __future__ import annotations

import torch

from symm.element import GroupElement
from symm.views import unit_sq_norms

from .state import MatchState


def norm_scale_step(state: MatchState, name: str) -> bool:
    """c = ||A_u|| / ||B_u|| per unit (units with a zero norm keep 1). Never counts as a change."""
    if not state.free(name):
        return False
    a2, _ = unit_sq_norms(state.spec, state.a, name)
    b2, _ = unit_sq_norms(state.spec, state.b, name)
    ok = (a2 > 0) & (b2 > 0)
    c = torch.where(ok, (a2.clamp_min(1e-300) / b2.clamp_min(1e-300)).sqrt(), torch.ones_like(a2))
    state.apply(GroupElement.identity(state.spec).replace(**{name: c}), [name])
    return False
