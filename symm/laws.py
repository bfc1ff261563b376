"""Conservation laws of gradient flow, derived from a Spec's continuous factors (never hand-listed per model).

If the loss is invariant under theta -> exp(t xi) . theta, then <grad L, rho(xi) theta> = 0. For a symmetric
generator (rho(xi) symmetric) the quadratic h(theta) = 1/2 <theta, rho(xi) theta> has grad h = rho(xi) theta, so
gradient flow conserves it. With xi acting as A on the ``out`` side and as -A^T on the ``in`` side of every use of
its factor, one unit's law is h = 1/2 <G_out - G_in, A>, where G_side is the Gram matrix of the unit's entries over
all its uses on that side. This one formula gives
  positive scaling   -> ||w_in||^2 + b^2 - ||w_out||^2 per unit (halved),
  GL(d_h) on Q/K, V/O -> the entries of Q^T Q - K^T K and V^T V - O^T O per KV group,
  RoPE pairs          -> ||Q^(j)||^2 - ||K^(j)||^2 per frequency pair (the scaling generator only),
  one-sided norm scale -> ||w||^2 + b^2 of the rows a normalisation reads (no consumer side: G_in = 0).
Translations act affinely: the sum of the shifted rows is a linear law. Discrete factors give none.
Computed in float64 (from any dtype) and differentiable, so trackers can take its gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch

from .factors import Factor
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
    return list(_families(spec))


@lru_cache(maxsize=64)
def _families(spec: Spec) -> tuple[LawFamily, ...]:
    out = []
    for name in spec.factor_order:
        f = spec.factors[name]
        if f.n_laws == 0:
            continue
        if f.kind == "translation":
            out.append(LawFamily(name, f.kind, True, (f.count,)))
        else:
            out.append(LawFamily(name, f.kind, False, (*f.batch, f.count, len(f.symmetric_generators()))))
    return tuple(out)


def count_laws(spec: Spec) -> int:
    """Total number of conservation laws the Spec implies."""
    return sum(fam.count for fam in law_families(spec))


def unit_rows(spec: Spec, params: Mapping[str, torch.Tensor], use) -> torch.Tensor:
    """``(*batch, units, n, u)``: every u-vector one use ``(param, axis, offset, On)`` holds per unit (over its shared
    repeats, blocks and all other axes), in float64: the vectors the unit's ``u x u`` block acts on."""
    pname, axis, offset, on = use
    u = spec.factors[on.factor].unit_size
    size = segment_of(spec, pname, axis, offset).size
    blocks = unit_blocks(spec, params[pname].to(torch.float64), axis, offset, size, on)  # (*b, units, per, rest)
    lead = blocks.shape[:-2]
    v = blocks.reshape(*lead, on.repeat, u, on.block, blocks.shape[-1]).movedim(-3, -1)  # (*b, units, r, block, rest, u)
    return v.reshape(*lead, -1, u)


def unit_cross_grams(spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C_out, C_in)``, each ``(*batch, count, u, u)`` (u = unit size): per unit, sum over every use on that side of
    X_a X_b^T over the unit's entries (shared repeats and blocks included), in float64. ``a is b`` gives Grams."""
    f = spec.factors[name]
    c_out = torch.zeros(*f.batch, f.count, f.unit_size, f.unit_size, dtype=torch.float64)
    c_in = torch.zeros_like(c_out)
    for use in spec.uses(name):
        va = unit_rows(spec, a, use)
        vb = va if b is a else unit_rows(spec, b, use)
        cross = va.transpose(-1, -2) @ vb
        if use[3].side == "out":
            c_out = c_out + cross
        else:
            c_in = c_in + cross
    return c_out, c_in


def unit_grams(spec: Spec, params: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G_out, G_in)``: per unit, the Gram matrix of its entries summed over every use on that side."""
    return unit_cross_grams(spec, params, params, name)


def _generator_matrices(spec: Spec, name: str) -> torch.Tensor:
    return _symmetric_matrices(spec.factors[name])


@lru_cache(maxsize=1024)
def _symmetric_matrices(f: Factor) -> torch.Tensor:
    """``(k, u, u)``: the symmetric generators of a factor as matrices on one unit (cached: factors are immutable)."""
    return torch.stack([f.algebra_matrix(xi) for xi in f.symmetric_generators()])


@dataclass(frozen=True)
class LawTerms:
    """Per law (flattened in :func:`law_families` order), everything a step check needs, from Grams only.

    ``value`` h(theta), ``of_grad`` h(g), ``cross`` <grad h(theta), g>, ``grad_norm2`` ||grad h(theta)||^2,
    ``scale`` the squared norm of what the law touches.
    """

    value: torch.Tensor
    of_grad: torch.Tensor
    cross: torch.Tensor
    grad_norm2: torch.Tensor
    scale: torch.Tensor


Grams = dict[str, tuple[torch.Tensor, torch.Tensor]]


def family_grams(spec: Spec, params: Mapping[str, torch.Tensor]) -> Grams:
    """``(G_out, G_in)`` of every quadratic law family (the only thing its values depend on)."""
    return {fam.factor: unit_grams(spec, params, fam.factor) for fam in law_families(spec) if not fam.linear}


def law_vector_from(spec: Spec, params: Mapping[str, torch.Tensor], grams: Grams) -> torch.Tensor:
    """:func:`law_vector` from precomputed :func:`family_grams` (linear laws read ``params``)."""
    parts = []
    for fam in law_families(spec):
        if fam.linear:
            ((pname, shift),) = spec.shifts_of(fam.factor)
            parts.append(params[pname].to(torch.float64).sum(shift.axis).reshape(-1))
        else:
            g_out, g_in = grams[fam.factor]
            parts.append(0.5 * torch.einsum("...ab,kab->...k", g_out - g_in, _generator_matrices(spec, fam.factor)).reshape(-1))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def quadratic_terms(tt, gg, tg, mats: torch.Tensor) -> dict[str, torch.Tensor]:
    """The :class:`LawTerms` fields of quadratic forms h_k = 1/2 <G_out - G_in, A_k> from per-unit ``(out, in)`` Grams
    of theta with theta (``tt``), g with g (``gg``) and theta with g (``tg``); ``mats`` ``(k, u, u)`` symmetric."""
    (to, ti), (go, gi), (co, ci) = tt, gg, tg
    pair = lambda m: torch.einsum("...ab,kab->...k", m, mats).reshape(-1)  # noqa: E731
    trace = (to + ti).diagonal(dim1=-2, dim2=-1).sum(-1, keepdim=True)
    return {
        "value": 0.5 * pair(to - ti),
        "of_grad": 0.5 * pair(go - gi),
        "cross": pair(co - ci),
        "grad_norm2": torch.einsum("...ab,kab->...k", to + ti, mats @ mats).reshape(-1),
        "scale": trace.expand(*trace.shape[:-1], mats.shape[0]).reshape(-1),
    }


def law_terms(spec: Spec, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> LawTerms:
    """:class:`LawTerms` at ``params`` for the gradient ``grads`` (missing keys count as zero gradient).

    Quadratic law with symmetric generator A: h = 1/2 <G_out - G_in, A>, <grad h, g> = <C_out - C_in, A> with C
    the cross Gram of theta and g, ||grad h||^2 = <G_out + G_in, A^2>.
    Linear law: h = sum of the shifted rows.
    """
    g = {k: (grads[k] if k in grads else torch.zeros_like(v)) for k, v in params.items()}
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("value", "of_grad", "cross", "grad_norm2", "scale")}
    for fam in law_families(spec):
        if fam.linear:
            ((pname, shift),) = spec.shifts_of(fam.factor)
            theta, grad = params[pname].to(torch.float64), g[pname].to(torch.float64)
            rows = theta.shape[shift.axis]
            parts["value"].append(theta.sum(shift.axis).reshape(-1))
            parts["of_grad"].append(grad.sum(shift.axis).reshape(-1))
            parts["cross"].append(grad.sum(shift.axis).reshape(-1))
            parts["grad_norm2"].append(torch.full((fam.count,), float(rows), dtype=torch.float64))
            parts["scale"].append(torch.full((fam.count,), float(theta.pow(2).sum()), dtype=torch.float64))
            continue
        grams = (unit_grams(spec, params, fam.factor), unit_grams(spec, g, fam.factor), unit_cross_grams(spec, params, g, fam.factor))
        for key, value in quadratic_terms(*grams, _generator_matrices(spec, fam.factor)).items():
            parts[key].append(value)
    cat = lambda xs: torch.cat(xs) if xs else torch.zeros(0, dtype=torch.float64)  # noqa: E731
    return LawTerms(**{k: cat(v) for k, v in parts.items()})


def law_values(spec: Spec, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every law's value, per factor: quadratic families ``(*batch, units, generators)``, linear ``(row entries,)``."""
    out = {}
    for fam in law_families(spec):
        if fam.linear:
            ((pname, shift),) = spec.shifts_of(fam.factor)
            out[fam.factor] = params[pname].to(torch.float64).sum(shift.axis).reshape(-1)
            continue
        g_out, g_in = unit_grams(spec, params, fam.factor)
        out[fam.factor] = 0.5 * torch.einsum("...ab,kab->...k", g_out - g_in, _generator_matrices(spec, fam.factor))
    return out


def law_vector(spec: Spec, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All law values flattened in :func:`law_families` order."""
    return law_vector_from(spec, params, family_grams(spec, params))


#: what one law of each kind measures, per unit of its factor
LAW_FORMULAS = {
    "positive-scaling": "||w_in||^2 + b^2 - ||w_out||^2 per unit (what produces it minus what reads it)",
    "general-linear": "entries of X_out^T X_out - X_in^T X_in per unit (e.g. Q^T Q - K^T K, V^T V - O^T O per KV group)",
    "rotation-scaling": "||X_out^(j)||^2 - ||X_in^(j)||^2 per unit and RoPE frequency pair j",
    "translation": "sum over the shifted rows (and biases), linear",
    "norm-scale": "||w||^2 + b^2 of the rows a normalisation reads, per unit (the norm makes them scale-invariant)",
}


def _caveat(f: Factor) -> str:
    """Why a law may hold only approximately or only in training (norm scales with eps > 0 / batch statistics)."""
    notes = []
    if getattr(f, "eps", 0.0) > 0:
        notes.append(f"approximate: the norm's eps={f.eps:g} > 0 breaks exact scale invariance")
    if getattr(f, "training_only", False):
        notes.append("training mode only (batch statistics)")
    return f" [{'; '.join(notes)}]" if notes else ""


def describe_laws(spec: Spec) -> str:
    """Human-readable list of the law families of ``spec`` with counts (zero is reported as zero)."""
    families = law_families(spec)
    lines = [f"conservation laws of gradient flow: {count_laws(spec)} in total" + (" (no continuous symmetry with a law)" if not families else "")]
    for fam in families:
        f = spec.factors[fam.factor]
        shape = " x ".join(str(s) for s in fam.shape)
        kind = "linear" if fam.linear else "quadratic"
        lines.append(f"  {fam.factor}: {fam.count} {kind} ({f.kind}, {shape}): {LAW_FORMULAS.get(fam.kind, fam.kind)}{_caveat(f)}")
    lawless = [n for n in spec.factor_order if spec.factors[n].n_laws == 0 and spec.factors[n].is_continuous]
    if lawless:
        lines.append(f"  continuous factors without a law: {', '.join(lawless)}")
    return "\n".join(lines)
