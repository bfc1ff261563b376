"""Conservation laws of gradient flow, derived from a Spec's continuous factors (never hand-listed per model).

If the loss is invariant under theta -> exp(t xi) . theta, then <grad L, rho(xi) theta> = 0. For a symmetric
generator (rho(xi) symmetric) the quadratic h(theta) = 1/2 <theta, rho(xi) theta> has grad h = rho(xi) theta, so
gradient flow conserves it. With xi acting as A on the ``out`` side and as -A^T on the ``in`` side of every use of
its factor, one unit's law is h = 1/2 <G_out - G_in, A>, where G_side is the Gram matrix of the unit's entries over
all its uses on that side. This one formula gives
  positive scaling   -> ||w_in||^2 + b^2 - ||w_out||^2 per unit (halved),
  GL(d_h) on Q/K, V/O -> the entries of Q^T Q - K^T K and V^T V - O^T O per KV group,
  RoPE pairs          -> ||Q^(j)||^2 - ||K^(j)||^2 per frequency pair (the scaling generator only).
Translations act affinely: the sum of the shifted rows is a linear law. Discrete factors give none.
Computed in float64 (from any dtype) and differentiable, so trackers can take its gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .spec import Spec
from .views import segment_of, unit_blocks


@dataclass(frozen=True)
class LawFamily:
    """The laws of one factor: ``count`` per unit (one per symmetric generator), or linear laws of a translation."""

    factor: str
    kind: str  # factor kind
    linear: bool
    shape: tuple[int, ...]  # shape of the values: (*batch, units, generators) or (row entries,)

    @property
    def count(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def law_families(spec: Spec) -> list[LawFamily]:
    """One family per factor with laws, in factor order (factors with ``n_laws == 0`` are left out)."""
    out = []
    for name in spec.factor_order:
        f = spec.factors[name]
        if f.n_laws == 0:
            continue
        if f.kind == "translation":
            out.append(LawFamily(name, f.kind, True, (f.count,)))
        else:
            out.append(LawFamily(name, f.kind, False, (*f.batch, f.count, len(f.symmetric_generators()))))
    return out


def count_laws(spec: Spec) -> int:
    """Total number of conservation laws the Spec implies."""
    return sum(fam.count for fam in law_families(spec))


def unit_grams(spec: Spec, params: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_out, G_in)``, each ``(*batch, count, u, u)`` (u = unit size): per unit, the Gram matrix of its entries
    summed over every use on that side (shared repeats and blocks included), in float64."""
    f = spec.factors[name]
    u = f.unit_size
    g_out = torch.zeros(*f.batch, f.count, u, u, dtype=torch.float64)
    g_in = torch.zeros_like(g_out)
    for pname, axis, offset, on in spec.uses(name):
        size = segment_of(spec, pname, axis, offset).size
        blocks = unit_blocks(spec, params[pname].to(torch.float64), axis, offset, size, on)  # (*b, units, per, rest)
        lead = blocks.shape[:-2]
        v = blocks.reshape(*lead, on.repeat, u, on.block, blocks.shape[-1]).movedim(-3, -1)  # (*b, units, r, rest, block, u)
        v = v.reshape(*lead, -1, u)
        gram = v.transpose(-1, -2) @ v
        if on.side == "out":
            g_out = g_out + gram
        else:
            g_in = g_in + gram
    return g_out, g_in


def law_values(spec: Spec, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every law's value, per factor: quadratic families ``(*batch, units, generators)``, linear ``(row entries,)``."""
    out = {}
    for fam in law_families(spec):
        f = spec.factors[fam.factor]
        if fam.linear:
            ((pname, shift),) = spec.shifts_of(fam.factor)
            out[fam.factor] = params[pname].to(torch.float64).sum(shift.axis).reshape(-1)
            continue
        g_out, g_in = unit_grams(spec, params, fam.factor)
        mats = torch.stack([f.algebra_matrix(xi) for xi in f.symmetric_generators()])  # (k, u, u)
        out[fam.factor] = 0.5 * torch.einsum("...ab,kab->...k", g_out - g_in, mats)
    return out


def law_vector(spec: Spec, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All law values flattened in :func:`law_families` order."""
    values = law_values(spec, params)
    parts = [values[fam.factor].reshape(-1) for fam in law_families(spec)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


#: what one law of each kind measures, per unit of its factor
LAW_FORMULAS = {
    "positive-scaling": "||w_in||^2 + b^2 - ||w_out||^2 per unit (what produces it minus what reads it)",
    "general-linear": "entries of X_out^T X_out - X_in^T X_in per unit (e.g. Q^T Q - K^T K, V^T V - O^T O per KV group)",
    "rotation-scaling": "||X_out^(j)||^2 - ||X_in^(j)||^2 per unit and RoPE frequency pair j",
    "translation": "sum over the shifted rows (and biases), linear",
}


def describe_laws(spec: Spec) -> str:
    """Human-readable list of the law families of ``spec`` with counts (zero is reported as zero)."""
    families = law_families(spec)
    lines = [f"conservation laws of gradient flow: {count_laws(spec)} in total" + (" (no continuous symmetry with a law)" if not families else "")]
    for fam in families:
        f = spec.factors[fam.factor]
        shape = " x ".join(str(s) for s in fam.shape)
        kind = "linear" if fam.linear else "quadratic"
        lines.append(f"  {fam.factor}: {fam.count} {kind} ({f.kind}, {shape}): {LAW_FORMULAS.get(fam.kind, fam.kind)}")
    lawless = [n for n in spec.factor_order if spec.factors[n].n_laws == 0 and spec.factors[n].is_continuous]
    if lawless:
        lines.append(f"  continuous factors without a law: {', '.join(lawless)}")
    return "\n".join(lines)
