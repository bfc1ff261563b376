"""Spec: the declarative map ``parameter name -> per-axis factors`` that everything downstream reads.

A parameter's axis is split into concatenated :class:`Segment` s (a fused QKV axis has three); each segment
lists the factors acting on it (:class:`On`, with the side: ``out`` acts as g, ``in`` as g^{-T}).
A :class:`Shift` adds a translation to every slice along one axis (softmax router rows).
Catalogue entries build :class:`Fragment` s; ``Spec(fragment)`` validates the whole model.
A Spec is data plus validation; the operations live beside it: ``act(spec, params, g)`` (:mod:`symm.action`),
``GroupElement.identity(spec)`` / ``GroupElement.sample(spec, rng)`` (:mod:`symm.element`), ``to_networkx(spec)``
and ``describe(spec)`` (:mod:`symm.graph`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Union

import torch

from .errors import SpecError
from .factors import Factor, Side, Translation
from .validate import validate_spec


@dataclass(frozen=True)
class On:
    """Factor ``factor`` acting on an axis segment.

    ``repeat``: consecutive units sharing one element (query heads of one KV group);
    ``block``: entries per scalar unit (the ``h*w`` pixels of a flattened channel);
    ``batch_axis``: the parameter axis that indexes a batched factor's batch (experts).
    """

    factor: str
    side: Side = "out"
    repeat: int = 1
    block: int = 1
    batch_axis: int | None = None

    def __post_init__(self) -> None:
        if self.side not in ("out", "in"):
            raise SpecError(f"factor {self.factor!r}: side must be 'out' or 'in', got {self.side!r}")
        if self.repeat < 1 or self.block < 1:
            raise SpecError(f"factor {self.factor!r}: repeat and block must be >= 1")


@dataclass(frozen=True)
class Segment:
    """``size`` consecutive entries of an axis and the factors acting on them."""

    size: int
    acts: tuple[On, ...] = ()


@dataclass(frozen=True)
class Shift:
    """Translation ``factor`` added to every slice of the parameter along ``axis``."""

    factor: str
    axis: int = 0


@dataclass(frozen=True)
class ParamSpec:
    """Shape of one parameter and, per axis, the segments that split it."""

    shape: tuple[int, ...]
    axes: tuple[tuple[Segment, ...], ...]
    shifts: tuple[Shift, ...] = ()

    def segments(self) -> Iterator[tuple[int, int, Segment]]:
        """Yield ``(axis, offset, segment)``."""
        for axis, segs in enumerate(self.axes):
            offset = 0
            for seg in segs:
                yield axis, offset, seg
                offset += seg.size

    def factors(self) -> set[str]:
        names = {on.factor for _, _, seg in self.segments() for on in seg.acts}
        return names | {s.factor for s in self.shifts}


AxisArg = Union[None, On, Sequence[On], Sequence[Segment]]


def param(shape: Sequence[int], *axes: AxisArg, shifts: Sequence[Shift] = ()) -> ParamSpec:
    """Build a :class:`ParamSpec`; each axis is ``None``, an :class:`On`, a list of them, or a list of segments.

    Missing trailing axes are untouched. Example: ``param((h, d), On("h"), On("x", "in"))``.
    """
    shape = tuple(int(s) for s in shape)
    if len(axes) > len(shape):
        raise SpecError(f"{len(axes)} axis entries given for a parameter of shape {shape}")
    built = []
    for size, arg in zip(shape, list(axes) + [None] * (len(shape) - len(axes))):
        if arg is None:
            built.append(())
        elif isinstance(arg, On):
            built.append((Segment(size, (arg,)),))
        elif all(isinstance(a, Segment) for a in arg):
            built.append(tuple(arg))
        elif all(isinstance(a, On) for a in arg):
            built.append((Segment(size, tuple(arg)),))
        else:
            raise SpecError(f"axis entry {arg!r}: use None, On(...), a list of On, or a list of Segment")
    return ParamSpec(shape, tuple(built), tuple(shifts))


@dataclass(frozen=True)
class Fragment:
    """A piece of a Spec (one layer, one block). ``a + b`` merges, refusing duplicate parameters and
    conflicting factor definitions (a shared factor such as the residual stream must be defined identically)."""

    factors: Mapping[str, Factor] = field(default_factory=dict)
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @staticmethod
    def of(factors: Iterable[Factor] = (), params: Mapping[str, ParamSpec] | None = None, notes: Iterable[str] = ()) -> "Fragment":
        table: dict[str, Factor] = {}
        for f in factors:
            if f.name in table and table[f.name] != f:
                raise SpecError(f"factor {f.name!r} defined twice with different definitions")
            table[f.name] = f
        return Fragment(table, dict(params or {}), tuple(notes))

    def __add__(self, other: "Fragment") -> "Fragment":
        factors = dict(self.factors)
        for name, f in other.factors.items():
            if name in factors and factors[name] != f:
                raise SpecError(f"factor {name!r} defined twice: {factors[name]} vs {f}")
            factors[name] = f
        dup = sorted(set(self.params) & set(other.params))
        if dup:
            raise SpecError(f"parameter(s) declared twice: {', '.join(dup)}")
        notes = self.notes + tuple(n for n in other.notes if n not in self.notes)
        return Fragment(factors, {**self.params, **other.params}, notes)


def merge(fragments: Iterable[Fragment]) -> Fragment:
    out = Fragment()
    for frag in fragments:
        out = out + frag
    return out


class Spec:
    """A validated symmetry specification of a whole model (immutable).

    ``factors``: name -> :class:`~symm.factors.Factor`; ``params``: state-dict key -> :class:`ParamSpec`.
    """

    def __init__(self, fragment: Fragment, name: str = "") -> None:
        self.name = name
        self.factors: Mapping[str, Factor] = MappingProxyType(dict(fragment.factors))
        self.params: Mapping[str, ParamSpec] = MappingProxyType(dict(fragment.params))
        self.notes: tuple[str, ...] = tuple(fragment.notes)
        validate_spec(self)
        self._order = self._topological_order()
        uses: dict[str, list[tuple[str, int, int, On]]] = {name: [] for name in self.factors}
        for p, ps in self.params.items():
            for axis, offset, seg in ps.segments():
                for on in seg.acts:
                    uses.setdefault(on.factor, []).append((p, axis, offset, on))
        self._uses = {name: tuple(u) for name, u in uses.items()}

    # ----- structure -------------------------------------------------------------------------------
    def _topological_order(self) -> tuple[str, ...]:
        order: list[str] = []
        seen: set[str] = set()

        def visit(name: str) -> None:
            if name in seen:
                return
            parent = self.factors[name].parent
            if parent:
                visit(parent)
            seen.add(name)
            order.append(name)

        for name in sorted(self.factors):
            visit(name)
        return tuple(order)

    @property
    def factor_order(self) -> tuple[str, ...]:
        """Factor names, every parent before its children."""
        return self._order

    def depth(self, name: str) -> int:
        parent = self.factors[name].parent
        return 0 if parent is None else 1 + self.depth(parent)

    def uses(self, factor: str) -> list[tuple[str, int, int, On]]:
        """Every place ``factor`` acts: ``(param, axis, offset, On)`` (indexed once, at construction)."""
        return list(self._uses.get(factor, ()))

    def shifts_of(self, factor: str) -> list[tuple[str, Shift]]:
        return [(p, s) for p, ps in self.params.items() for s in ps.shifts if s.factor == factor]

    def factors_of_kind(self, *kinds: type[Factor]) -> list[str]:
        return [n for n in self._order if isinstance(self.factors[n], kinds)]

    @property
    def permutation_factors(self) -> list[str]:
        return [n for n in self._order if self.factors[n].is_permutation]

    @property
    def continuous_factors(self) -> list[str]:
        return [n for n in self._order if self.factors[n].is_continuous]

    @property
    def dimension(self) -> int:
        """Dimension of the continuous part of the group (a Lie group's dimension)."""
        return sum(f.dimension for f in self.factors.values())

    # ----- parameters ---------------------------------------------------------------------------------
    def check_params(self, params: Mapping[str, torch.Tensor], *, what: str = "parameters") -> None:
        """Raise :class:`SpecError` naming missing keys, unexpected keys and wrong shapes."""
        missing = sorted(set(self.params) - set(params))
        extra = sorted(set(params) - set(self.params))
        problems = []
        if missing:
            problems.append(f"missing keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if extra:
            problems.append(f"unexpected keys: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
        for name in sorted(set(self.params) & set(params)):
            shape = tuple(params[name].shape)
            if shape != self.params[name].shape:
                problems.append(f"{name}: shape {shape}, spec expects {self.params[name].shape}")
        if problems:
            label = f" ({self.name})" if self.name else ""
            raise SpecError(f"{what} do not match the spec{label}: " + "; ".join(problems))

    def __repr__(self) -> str:
        return f"Spec({self.name or 'unnamed'}: {len(self.factors)} factors, {len(self.params)} parameters)"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Spec) and dict(self.factors) == dict(other.factors) and dict(self.params) == dict(other.params)

    def __hash__(self) -> int:
        return hash((tuple(sorted(self.factors)), tuple(sorted(self.params))))


__all__ = ["Fragment", "On", "ParamSpec", "Segment", "Shift", "Spec", "Translation", "merge", "param"]
