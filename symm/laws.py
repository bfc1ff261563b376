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
Computed in float64 (from any dtype) and differentiable, so trackers can take its gradient. :class:`LawPlan`
evaluates the same quantities for repeated use (a tracker's every step) with the layers stacked and far fewer
operations (not differentiable).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import torch

from .factors import Factor
from .spec import On, Spec
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


# ----- repeated evaluation (a tracker's every step) -----------------------------------------------------------------


@dataclass
class _PlanUse:
    """One use shared by the stacked families of a group, and the float64 buffer its segments are copied into."""

    names: list[str]  # the parameter holding this use, per stacked family
    axis: int
    offset: int
    size: int
    on: On
    units: int
    unit_size: int
    out: bool
    buffer: torch.Tensor  # full: (L, *b, units, r, 2, u, M); diagonal: (L, *b, units, r, u, 2, M)
    dest: list[list[torch.Tensor]]  # [slot][family]: views of the buffer shaped like ``LawPlan._source``
    strided: tuple  # (shape, size, stride, offset): ``_source`` of a contiguous tensor of ``shape`` as one as_strided
    grad_weight: torch.Tensor | None = None  # (L,): 1 / how often each family's parameter is read (0: not derivable)


@dataclass
class _PlanGroup:
    """Quadratic families with one structure (one per layer), evaluated together."""

    uses: list[_PlanUse]
    diagonal: bool  # every generator (and its square) is diagonal on a unit: only the Grams' diagonals are needed
    rows: int  # L * prod(batch) * units
    k: int  # generators per unit
    positions: torch.Tensor  # (L * count,): where the group's laws sit in the flattened law vector
    to_terms: torch.Tensor  # sparse (3k, R): value, of_grad, cross from the out - in Grams of both slots
    to_norms: torch.Tensor  # sparse (k + 1, R): ||grad h||^2 per generator, then the trace, from out + in
    to_values: torch.Tensor  # sparse (k, R1): value from the out - in Grams of slot 0 alone


def _sparse(entries: list[list[tuple[int, float]]], width: int) -> torch.Tensor:
    """``(len(entries), width)`` sparse matrix: row j has ``value`` at column ``index`` for each ``(index, value)``."""
    rows = [j for j, e in enumerate(entries) for _ in e]
    cols = [i for e in entries for i, _ in e]
    vals = [v for e in entries for _, v in e]
    return torch.sparse_coo_tensor(torch.tensor([rows, cols], dtype=torch.long).reshape(2, -1), torch.tensor(vals, dtype=torch.float64),
                                   (len(entries), width), check_invariants=True).coalesce()


class LawPlan:
    """:func:`law_terms` and :func:`law_vector` of one Spec, for repeated evaluation (a tracker's every step).

    The same numbers up to float round-off, in far fewer operations: families with one structure (the layers of a
    model) are stacked; every use's segment is copied (converted to float64, exactly) into a preallocated buffer that
    holds theta and g side by side (two *slots*), and one batched matmul per use gives the Grams theta theta^T,
    theta g^T and g g^T together. Families whose generators are diagonal on a unit (positive scaling, RoPE pair
    scalings, norm scales) compute only the Grams' diagonals. The contractions with the generators are sparse.
    ``load(tensors, slot)`` fills a slot (0: theta, 1: g), ``values()`` evaluates slot 0 (:func:`law_vector`),
    ``terms()`` both (:func:`law_terms`). The buffers are reused: one plan serves one caller at a time.
    """

    def __init__(self, spec: Spec) -> None:
        self.spec = spec
        fams = law_families(spec)
        self.total = sum(f.count for f in fams)
        offsets, start = {}, 0
        for fam in fams:
            offsets[fam.factor] = start
            start += fam.count
        similar: dict[tuple, list[LawFamily]] = {}
        self.linear: list[tuple[str, int, torch.Tensor, torch.Tensor]] = []  # (param, summed axis, positions, buffer)
        for fam in fams:
            if fam.linear:
                ((pname, shift),) = spec.shifts_of(fam.factor)
                pos = torch.arange(offsets[fam.factor], offsets[fam.factor] + fam.count)
                self.linear.append((pname, shift.axis, pos, torch.zeros(2, *spec.params[pname].shape, dtype=torch.float64)))
            else:
                similar.setdefault(self._signature(fam), []).append(fam)
        self.groups = [self._group(group, offsets) for group in similar.values()]
        self.names = sorted({n for g in self.groups for use in g.uses for n in use.names} | {p for p, *_ in self.linear})
        self._grad_weights()
        self.grad_square = 0.0  # set by terms(): sum over ``grad_names`` of ||g||^2, from the Grams' diagonals

    def _grad_weights(self) -> None:
        """Which parameters' squared gradient norms the Grams give: those whose every entry the laws read equally
        often (c times: weight 1/c); ``grad_names`` lists them."""
        reads = {n: torch.zeros(self.spec.params[n].shape, dtype=torch.int32) for n in self.names}
        for group in self.groups:
            for use in group.uses:
                for n in use.names:
                    reads[n].narrow(use.axis, use.offset, use.size).add_(1)
        for p, *_ in self.linear:
            reads[p].add_(1)
        weight = {n: 1.0 / int(c.max()) for n, c in reads.items() if c.numel() and int(c.min()) == int(c.max()) > 0}
        self.grad_names = frozenset(weight)
        for group in self.groups:
            for use in group.uses:
                use.grad_weight = torch.tensor([weight.get(n, 0.0) for n in use.names], dtype=torch.float64)
        self._linear_grad_weight = [weight.get(p, 0.0) for p, *_ in self.linear]

    # ----- structure ----------------------------------------------------------------------------
    def _signature(self, fam: LawFamily) -> tuple:
        """Families with equal signatures (same shapes, uses and generators) are stacked into one group."""
        spec, f = self.spec, self.spec.factors[fam.factor]
        mats = _symmetric_matrices(f)
        uses = tuple(
            (spec.params[p].shape, axis, offset, segment_of(spec, p, axis, offset).size, on.side, on.repeat, on.block, on.batch_axis)
            for p, axis, offset, on in spec.uses(fam.factor)
        )
        return fam.shape, f.unit_size, tuple(mats.shape), mats.numpy().tobytes(), uses

    def _group(self, fams: list[LawFamily], offsets: dict[str, int]) -> _PlanGroup:
        spec = self.spec
        f0 = spec.factors[fams[0].factor]
        mats = _symmetric_matrices(f0)
        k, u, n_fam = mats.shape[0], f0.unit_size, len(fams)
        squares = mats @ mats
        off = ~torch.eye(u, dtype=torch.bool)
        diagonal = not bool((mats[:, off] != 0).any() or (squares[:, off] != 0).any())
        per_family = [spec.uses(fam.factor) for fam in fams]
        uses = []
        for j, (pname, axis, offset, on) in enumerate(per_family[0]):
            size = segment_of(spec, pname, axis, offset).size
            units = spec.factors[on.factor].level_units(size // (on.repeat * on.block))
            shape = spec.params[pname].shape
            lead = [shape[on.batch_axis]] if on.batch_axis is not None else []
            others = [s for a, s in enumerate(shape) if a not in (axis, on.batch_axis)]
            m = on.block * math.prod(others)
            if diagonal:  # per unit entry, its theta and g vectors side by side: (2, M)
                buf = torch.zeros(n_fam, *lead, units, on.repeat, u, 2, m, dtype=torch.float64)
                dest = [[buf[i].select(-2, w).unflatten(-1, (on.block, *others)) for i in range(n_fam)] for w in range(2)]
            else:  # per unit, its theta and g matrices stacked: (2u, M)
                buf = torch.zeros(n_fam, *lead, units, on.repeat, 2, u, m, dtype=torch.float64)
                dest = [[buf[i].select(-3, w).unflatten(-1, (on.block, *others)) for i in range(n_fam)] for w in range(2)]
            use = _PlanUse([uses_l[j][0] for uses_l in per_family], axis, offset, size, on, units, u, on.side == "out", buf, dest, ())
            view = self._source(torch.empty(shape, device="meta"), use)
            use.strided = (tuple(shape), tuple(view.shape), view.stride(), view.storage_offset())
            uses.append(use)
        rows = n_fam * math.prod(f0.batch) * f0.count
        positions = torch.cat([torch.arange(offsets[fam.factor], offsets[fam.factor] + fam.count) for fam in fams])

        def pos(width: int, w1: int, a: int, w2: int, b: int) -> int:
            """Flat index of the Gram entry (slot w1, unit entry a) x (slot w2, entry b) with ``width`` slots."""
            if diagonal:
                return (a * width + w1) * width + w2  # (u, W, W) per unit: a == b
            return (w1 * u + a) * (width * u) + (w2 * u + b)  # (W u, W u) per unit

        def nonzeros(m: torch.Tensor) -> list[tuple[int, int, float]]:
            return [(int(a), int(b), float(m[a, b])) for a, b in zip(*torch.nonzero(m, as_tuple=True))]

        terms = [[(pos(2, w1, a, w2, b), c * v) for a, b, v in nonzeros(mats[i])] for w1, w2, c in ((0, 0, 0.5), (1, 1, 0.5), (0, 1, 1.0)) for i in range(k)]
        norms = [[(pos(2, 0, a, 0, b), v) for a, b, v in nonzeros(squares[i])] for i in range(k)] + [[(pos(2, 0, a, 0, a), 1.0) for a in range(u)]]
        values = [[(pos(1, 0, a, 0, b), 0.5 * v) for a, b, v in nonzeros(mats[i])] for i in range(k)]
        r2, r1 = (u * 4, u) if diagonal else (4 * u * u, u * u)
        return _PlanGroup(uses, diagonal, rows, k, positions, _sparse(terms, r2), _sparse(norms, r2), _sparse(values, r1))

    # ----- data ---------------------------------------------------------------------------------
    @staticmethod
    def _source(x: torch.Tensor, use: _PlanUse) -> torch.Tensor:
        """``(*b, units, r, u, block, *other axes)``: a view of the segment of ``x`` a use reads."""
        if use.strided and x.is_contiguous() and x.shape == use.strided[0]:
            _, size, stride, offset = use.strided
            return x.as_strided(size, stride, x.storage_offset() + offset)
        on = use.on
        seg = x.narrow(use.axis, use.offset, use.size)
        if on.batch_axis is None:
            moved, n_lead = seg.movedim(use.axis, 0), 0
        else:
            moved, n_lead = seg.movedim((on.batch_axis, use.axis), (0, 1)), 1
        return moved.unflatten(n_lead, (use.units, on.repeat, use.unit_size, on.block))

    @torch.no_grad()
    def load(self, tensors: Mapping[str, torch.Tensor], slot: int) -> None:
        """Copy, as float64, every segment the laws read from ``tensors`` into ``slot`` (0: theta, 1: g); a missing
        name counts as zero."""
        for group in self.groups:
            for use in group.uses:
                for dest, name in zip(use.dest[slot], use.names):
                    x = tensors.get(name)
                    if x is None:
                        dest.zero_()
                    else:
                        dest.copy_(self._source(x, use))
        for pname, _, _, buf in self.linear:
            x = tensors.get(pname)
            if x is None:
                buf[slot].zero_()
            else:
                buf[slot].copy_(x)

    @staticmethod
    def _grams(group: _PlanGroup, width: int, grad_square: list | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(out, in)``: per unit, the Grams of the first ``width`` slots summed over the uses on that side (and over
        shared repeats), flattened: ``(rows, (W u)^2)``, or ``(rows, u W^2)`` for diagonal groups. ``grad_square``
        (width 2) collects the weighted squared norms of the gradient segments."""
        sides: list[torch.Tensor | None] = [None, None]
        n_fam = len(group.uses[0].names)
        for use in group.uses:
            m, u = use.buffer.shape[-1], use.unit_size
            if group.diagonal:
                mat = use.buffer.view(-1, 2, m)[:, :width]  # (rows r u, W, M)
            else:
                mat = use.buffer.view(-1, 2 * u, m)[:, : width * u]  # (rows r, W u, M)
            gram = torch.bmm(mat, mat.transpose(1, 2))
            if grad_square is not None:
                gg = gram[:, 1, 1] if group.diagonal else gram[:, u:, u:].diagonal(dim1=-2, dim2=-1)
                grad_square.append(gg.reshape(n_fam, -1).sum(1) @ use.grad_weight)
            gram = gram.view(group.rows, use.on.repeat, -1)
            gram = gram.sum(1) if use.on.repeat > 1 else gram[:, 0]
            i = 0 if use.out else 1
            sides[i] = gram if sides[i] is None else sides[i] + gram
        return sides[0], sides[1]

    @staticmethod
    def _combine(g_out: torch.Tensor | None, g_in: torch.Tensor | None, sign: float) -> torch.Tensor:
        if g_in is None:
            return g_out
        if g_out is None:
            return sign * g_in
        return g_out + sign * g_in

    @torch.no_grad()
    def values(self) -> torch.Tensor:
        """Every law's value at the tensors loaded in slot 0, as :func:`law_vector`."""
        out = torch.empty(self.total, dtype=torch.float64)
        for group in self.groups:
            d = self._combine(*self._grams(group, 1), -1.0)
            out[group.positions] = torch.sparse.mm(group.to_values, d.T).T.reshape(-1)
        for _, axis, pos, buf in self.linear:
            out[pos] = buf[0].sum(axis).reshape(-1)
        return out

    @torch.no_grad()
    def terms(self) -> LawTerms:
        """:class:`LawTerms` at the theta loaded in slot 0 for the gradient in slot 1, as :func:`law_terms`."""
        out = torch.empty(5, self.total, dtype=torch.float64)
        grad_square: list[torch.Tensor] = []
        for group in self.groups:
            g_out, g_in = self._grams(group, 2, grad_square)
            d, s = self._combine(g_out, g_in, -1.0), self._combine(g_out, g_in, 1.0)
            k, rows = group.k, group.rows
            vd = torch.sparse.mm(group.to_terms, d.T)  # (3k, rows): value, of_grad, cross
            vs = torch.sparse.mm(group.to_norms, s.T)  # (k + 1, rows): ||grad h||^2, then the trace
            out[:3, group.positions] = vd.view(3, k, rows).transpose(1, 2).reshape(3, -1)
            out[3, group.positions] = vs[:k].T.reshape(-1)
            out[4, group.positions] = vs[k:].T.expand(rows, k).reshape(-1)
        for (_, axis, pos, buf), weight in zip(self.linear, self._linear_grad_weight):
            theta, gsum = buf[0], buf[1].sum(axis).reshape(-1)
            if weight:
                grad_square.append(weight * buf[1].pow(2).sum())
            out[0, pos] = theta.sum(axis).reshape(-1)
            out[1, pos] = gsum
            out[2, pos] = gsum
            out[3, pos] = float(theta.shape[axis])
            out[4, pos] = theta.pow(2).sum()
        self.grad_square = float(torch.stack(grad_square).sum()) if grad_square else 0.0
        return LawTerms(*out.unbind(0))
