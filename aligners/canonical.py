"""Canonical representatives for the scaling part of a group.

Every positive-scaling orbit holds exactly one *balanced* point, the minimiser of ||c . theta||^2 over the
scalings c: for each unit, the squared norm of what it produces equals the squared norm of what reads it
(a^4 = in^2 / out^2 per unit). The minimiser is unique and commutes with permutations, so two networks in one
orbit have balanced forms that differ by a pure permutation. Coupled layers are balanced by coordinate
descent in log-space (convex), to a tolerance on log a.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from symm.action import act_param
from symm.element import GroupElement
from symm.factors import PositiveScaling
from symm.spec import Spec

from .views import unit_matrix

log = logging.getLogger(__name__)


def _side_norms(spec: Spec, params: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    f = spec.factors[name]
    out2 = torch.zeros(f.element_shape, dtype=torch.float64)
    in2 = torch.zeros(f.element_shape, dtype=torch.float64)
    for pname, axis, offset, on in spec.uses(name):
        size = _segment_size(spec, pname, axis, offset)
        rows = unit_matrix(spec, params[pname].double(), axis, offset, size, on)
        sq = rows.pow(2).sum(-1)
        if on.side == "out":
            out2 += sq
        else:
            in2 += sq
    return out2, in2


def _segment_size(spec: Spec, pname: str, axis: int, offset: int) -> int:
    for a, o, seg in spec.params[pname].segments():
        if a == axis and o == offset:
            return seg.size
    raise KeyError((pname, axis, offset))


def balance_scalings(spec: Spec, params: Mapping[str, torch.Tensor], tol: float = 1e-13, max_sweeps: int = 2000) -> GroupElement:
    """The scaling element ``c`` (identity elsewhere) that balances ``params``; ``c . params`` is canonical."""
    names = spec.factors_of_kind(PositiveScaling)
    g = spec.identity()
    if not names:
        return g
    touched = sorted({p for n in names for p, *_ in spec.uses(n)})
    current = {p: params[p].double() for p in touched}
    values = dict(g.values)
    for sweep in range(max_sweeps):
        worst = 0.0
        for name in names:
            out2, in2 = _side_norms(spec, current, name)
            ok = (out2 > 0) & (in2 > 0)
            step = torch.where(ok, (in2.clamp_min(1e-300) / out2.clamp_min(1e-300)).pow(0.25), torch.ones_like(out2))
            worst = max(worst, float(step.log().abs().max()))
            delta = spec.identity().replace(**{name: step})
            for p in {p for p, *_ in spec.uses(name)}:
                current[p] = act_param(spec, spec.params[p], current[p], delta.values)
            values[name] = values[name] * step
        if worst < tol:
            break
    else:
        log.warning("scaling balance stopped after %d sweeps (last log-step %.2e)", max_sweeps, worst)
    log.debug("balanced %d scaling factors in %d sweeps", len(names), sweep + 1)
    return GroupElement(spec, values)
