"""The parameter-sharing plan of a permutation-equivariant linear map between weight spaces, derived from a Spec.

Every sub-axis of the normal form is either **permuted** (a ``unit`` sub-axis of a plain permutation factor: the
factor's symbol) or **fixed** (input features, classes, kernel taps, pixels of a flattened channel: the group does
not move its indices). A linear map ``T: x_p -> y_q`` between virtual tensors commutes with every permutation iff it
is a sum of terms, one per subset ``tied`` of the symbols shared by ``p`` and ``q``: tied symbols keep their index,
the other symbols of ``p`` are averaged out and the other symbols of ``q`` are broadcast, while fixed axes of ``p``
and ``q`` (and the channels) are mixed by a free weight (NFN's NP sharing, Zhou et al. 2023, enumerated from the
labels instead of written per architecture). This holds when each symbol occurs at most once per tensor, which the
plan checks; kinds whose sharing is not derived yet (head and grouped permutations, batched expert permutations,
GL blocks) are refused with a clear error.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from symm.errors import UsageError
from symm.normal_form import NormalForm

#: permutation kinds whose sharing this plan derives (the others are refused, never silently ignored)
SUPPORTED = frozenset({"permutation"})
#: kinds that do not constrain a permutation-equivariant map (continuous parts are the quasi-equivariant alpha's job)
IGNORED = frozenset({"positive-scaling", "sign-flip", "norm-scale"})


@dataclass(frozen=True)
class TensorAxes:
    """One virtual tensor: per sub-axis, the permutation symbol acting on it (None: a fixed axis) and its size."""

    name: str
    symbols: tuple[str | None, ...]
    sizes: tuple[int, ...]

    @property
    def permuted(self) -> tuple[str, ...]:
        return tuple(s for s in self.symbols if s is not None)

    @property
    def fixed_sizes(self) -> tuple[int, ...]:
        return tuple(n for s, n in zip(self.symbols, self.sizes) if s is None)


@dataclass(frozen=True)
class Term:
    """``y_q += W . mean_{p's untied symbols} x_p``, tied symbols sharing an index, untied ones of q broadcast."""

    src: str
    dst: str
    tied: tuple[str, ...]


@dataclass(frozen=True)
class SharingPlan:
    tensors: tuple[TensorAxes, ...]
    terms: tuple[Term, ...]

    @property
    def by_name(self) -> dict[str, TensorAxes]:
        return {t.name: t for t in self.tensors}

    def describe(self) -> str:
        lines = [f"{len(self.terms)} sharing terms between {len(self.tensors)} virtual tensors"]
        for t in self.tensors:
            axes = " x ".join(f"{n}<{s}>" if s else str(n) for s, n in zip(t.symbols, t.sizes))
            lines.append(f"  {t.name}: {axes}")
        return "\n".join(lines)


def tensor_axes(nf: NormalForm) -> tuple[TensorAxes, ...]:
    """Label every sub-axis of every virtual tensor with its permutation symbol (or None), refusing what we cannot share."""
    out = []
    for vp in nf.virtual:
        symbols: list[str | None] = []
        for i, ax in enumerate(vp.axes):
            perms = [lab for lab in ax.labels if lab.kind not in IGNORED]
            for lab in perms:
                if lab.kind not in SUPPORTED:
                    raise UsageError(
                        f"equivariant layers: factor {lab.factor!r} of kind {lab.kind!r} on {vp.name} axis {i} is not supported "
                        f"yet (supported: plain permutations, with {', '.join(sorted(IGNORED))} ignored)"
                    )
            units = [lab.factor for lab in perms if lab.role == "unit"]
            if len(units) > 1:
                raise UsageError(f"equivariant layers: {vp.name} axis {i} is permuted by several factors {units}")
            symbols.append(units[0] if units else None)
        present = [s for s in symbols if s]
        if len(present) != len(set(present)):
            raise UsageError(f"equivariant layers: {vp.name} carries one permutation on two axes ({present}); not supported yet")
        if any(u.batch for u in vp.uses):
            raise UsageError(f"equivariant layers: {vp.name} holds batched (per-expert) factors; not supported yet")
        out.append(TensorAxes(vp.name, tuple(symbols), vp.shape))
    return tuple(out)


def sharing_plan(nf: NormalForm) -> SharingPlan:
    """Every equivariant term between every pair of virtual tensors (all subsets of their shared symbols)."""
    return plan_from_axes(tensor_axes(nf))


def plan_from_axes(tensors: tuple[TensorAxes, ...]) -> SharingPlan:
    """The terms for given axis labels (exposed so tests can build deliberately mislabelled plans)."""
    terms = []
    for dst in tensors:
        for src in tensors:
            shared = sorted(set(dst.permuted) & set(src.permuted))
            for k in range(len(shared) + 1):
                for tied in itertools.combinations(shared, k):
                    terms.append(Term(src.name, dst.name, tied))
    return SharingPlan(tensors, tuple(terms))


def term_fan_in(plan: SharingPlan, dst: str) -> int:
    """Number of fixed input entries feeding ``dst`` over all its terms (for initialisation)."""
    by = plan.by_name
    return sum(math.prod(by[t.src].fixed_sizes) for t in plan.terms if t.dst == dst)
