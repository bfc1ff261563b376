"""Canonical representatives for the scaling part of a group.

Every positive-scaling orbit holds exactly one *balanced* point, the minimiser of ||c . theta||^2 over the
scalings c: for each unit, the squared norm of what it produces equals the squared norm of what reads it
(a^4 = in^2 / out^2 per unit). The minimiser is unique and commutes with permutations, so two networks in one
orbit have balanced forms that differ by a pure permutation. Coupled layers are balanced by over-relaxed
coordinate descent in log-space (convex), to a tolerance on log a. The weights are squared once; each step only reweights
those squares (no action on the weights).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from symm.element import GroupElement
from symm.factors.base import expand_units
from symm.spec import On, Spec
from symm.views import segment_of, segment_units

log = logging.getLogger(__name__)

#: over-relaxation of each exact coordinate step (log a += RELAXATION * log(in^2/out^2) / 4); 1.3 needed about
#: 40% fewer sweeps than plain coordinate descent on trained MLPs of widths 128 and 2048, at the same precision
RELAXATION = 1.3


@dataclass(frozen=True)
class _Act:
    """A scaling factor acting on one segment of a (reduced) squared parameter."""

    factor: str
    axis: int
    offset: int
    size: int
    on: On


class _Squares:
    """The squared entries of one parameter, summed over axes no scaling touches, and the scalings acting on it."""

    def __init__(self, spec: Spec, x: torch.Tensor, acts: list[tuple[int, int, int, On]]) -> None:
        active = sorted({a for a, *_ in acts} | {on.batch_axis for *_, on in acts if on.batch_axis is not None})
        dropped = [a for a in range(x.dim()) if a not in active]
        sq = x.double().pow(2)
        self.squares = sq.sum(dropped) if dropped else sq
        where = {a: i for i, a in enumerate(active)}
        self.acts = [
            _Act(on.factor, where[a], off, size, On(on.factor, on.side, on.repeat, on.block, None if on.batch_axis is None else where[on.batch_axis]))
            for a, off, size, on in acts
        ]
        self.separable = all(act.on.batch_axis is None for act in self.acts)

    def _entries(self, act: _Act, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per-entry factor a^2 (out) or a^-2 (in) of one act over its segment: ``(*batch, size)``."""
        v = values[act.factor].pow(2 if act.on.side == "out" else -2)
        return expand_units(v, act.on.repeat, act.on.block)

    def _axis_factors(self, values: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Separable case (no batched act): one per-entry factor vector per axis, the product of its acts."""
        out = [torch.ones(n, dtype=torch.float64) for n in self.squares.shape]
        for act in self.acts:
            out[act.axis][act.offset : act.offset + act.size] *= self._entries(act, values)
        return out

    def weighted(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Squares times every acting scaling's per-entry factor (the general, batched case)."""
        t = self.squares
        for act in self.acts:
            entries = self._entries(act, values)
            full = torch.ones(*entries.shape[:-1], t.shape[act.axis], dtype=torch.float64)
            full[..., act.offset : act.offset + act.size] = entries
            shape = [1] * t.dim()
            shape[act.axis] = t.shape[act.axis]
            if act.on.batch_axis is not None:
                shape[act.on.batch_axis] = t.shape[act.on.batch_axis]
                full = full if act.on.batch_axis < act.axis else full.transpose(0, 1)
            t = t * full.reshape(shape)
        return t

    def unit_sums(self, values: Mapping[str, torch.Tensor], spec: Spec, act: _Act) -> torch.Tensor:
        """``(*batch, units)``: the weighted squares summed over everything but the units of ``act``."""
        if self.separable:  # contract every other axis with its factor vector: no full-size temporaries
            factors = self._axis_factors(values)
            line = self.squares
            for i in reversed(range(self.squares.dim())):  # matrix-vector products, last axis first
                if i != act.axis:
                    line = line @ factors[i] if i == line.dim() - 1 else torch.tensordot(line, factors[i], dims=([i], [0]))
            moved = (line * factors[act.axis]).narrow(0, act.offset, act.size)
        else:
            seg = self.weighted(values).narrow(act.axis, act.offset, act.size)
            if act.on.batch_axis is None:
                moved = seg.movedim(act.axis, 0).reshape(act.size, -1).sum(-1)
            else:
                moved = seg.movedim((act.on.batch_axis, act.axis), (0, 1))
                moved = moved.reshape(moved.shape[0], act.size, -1).sum(-1)
        units = segment_units(spec, act.on, act.size)
        return moved.reshape(*moved.shape[:-1], units, act.size // units).sum(-1)


def balance_scalings(
    spec: Spec, params: Mapping[str, torch.Tensor], tol: float = 1e-13, max_sweeps: int = 5000, exclude: frozenset[str] = frozenset()
) -> GroupElement:
    """The scaling element ``c`` (identity elsewhere) that balances ``params``; ``c . params`` is canonical.

    Scalings in ``exclude`` (fixed by the caller) stay at the identity and are balanced around.
    """
    names = [n for n in spec.factor_order if spec.factors[n].kind == "positive-scaling" and n not in exclude]
    g = GroupElement.identity(spec)
    if not names:
        return g
    acts: dict[str, list[tuple[int, int, int, On]]] = {}
    for n in names:
        for p, axis, offset, on in spec.uses(n):
            acts.setdefault(p, []).append((axis, offset, segment_of(spec, p, axis, offset).size, on))
    squares = {p: _Squares(spec, params[p], a) for p, a in acts.items()}
    uses = {n: [(p, act) for p, sq in squares.items() for act in sq.acts if act.factor == n] for n in names}
    values = {n: g.values[n].clone() for n in names}
    for sweep in range(max_sweeps):
        worst = 0.0
        for name in names:
            out2 = torch.zeros(spec.factors[name].element_shape, dtype=torch.float64)
            in2 = torch.zeros_like(out2)
            for p, act in uses[name]:
                part = squares[p].unit_sums(values, spec, act)
                if act.on.side == "out":
                    out2 += part
                else:
                    in2 += part
            ok = (out2 > 0) & (in2 > 0)
            step = torch.where(ok, (in2.clamp_min(1e-300) / out2.clamp_min(1e-300)).pow(0.25 * RELAXATION), torch.ones_like(out2))
            worst = max(worst, float(step.log().abs().max()))
            values[name] = values[name] * step
        if worst < tol:
            break
    else:
        log.warning("scaling balance stopped after %d sweeps (last log-step %.2e)", max_sweeps, worst)
    log.debug("balanced %d scaling factors in %d sweeps", len(names), sweep + 1)
    return g.replace(**values)
