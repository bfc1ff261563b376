"""GroupElement: a mapping factor name -> element, with the group operations of the whole Spec.

``g.compose(h)`` is ``g . h`` (h acts first): ``g.compose(h).act(p) == g.act(h.act(p))``.
Children are indexed by their parent's units, so composing reindexes a child by the parent permutation
of the element acting first (a wreath / semidirect product); translations compose through the linear part.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from .action import act, apply_linear
from .errors import SpecError
from .factors import Translation

if TYPE_CHECKING:
    from .spec import Spec


def _generator(rng: int | torch.Generator) -> torch.Generator:
    if isinstance(rng, torch.Generator):
        return rng
    gen = torch.Generator()
    gen.manual_seed(int(rng))
    return gen


@dataclass(frozen=True, eq=False)
class GroupElement:
    spec: Spec
    values: Mapping[str, torch.Tensor]

    def __post_init__(self) -> None:
        missing = sorted(set(self.spec.factors) - set(self.values))
        extra = sorted(set(self.values) - set(self.spec.factors))
        if missing or extra:
            raise SpecError(f"group element does not match the spec: missing {missing}, unexpected {extra}")
        for name, value in self.values.items():
            try:
                self.spec.factors[name].check_element(value)
            except ValueError as exc:
                raise SpecError(str(exc)) from None
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    # ----- construction ------------------------------------------------------------------------------
    @classmethod
    def identity(cls, spec: Spec) -> "GroupElement":
        return cls(spec, {n: f.identity() for n, f in spec.factors.items()})

    @classmethod
    def sample(cls, spec: Spec, rng: int | torch.Generator, only: Iterable[str] | None = None) -> "GroupElement":
        """A random element (each factor sampled independently); ``only`` keeps other factors at identity."""
        gen = _generator(rng)
        keep = set(spec.factors) if only is None else set(only)
        unknown = keep - set(spec.factors)
        if unknown:
            raise SpecError(f"unknown factor(s) {sorted(unknown)}")
        values = {}
        for name in spec.factor_order:
            f = spec.factors[name]
            values[name] = f.sample(gen) if name in keep else f.identity()
        return cls(spec, values)

    def replace(self, **values: torch.Tensor) -> "GroupElement":
        return GroupElement(self.spec, {**self.values, **values})

    def restrict(self, names: Iterable[str]) -> "GroupElement":
        """Same element on ``names``, identity elsewhere."""
        names = set(names)
        return GroupElement(self.spec, {n: (v if n in names else self.spec.factors[n].identity()) for n, v in self.values.items()})

    # ----- group operations --------------------------------------------------------------------------
    def _chain_index(self, name: str, n_units: int) -> torch.Tensor:
        """Gather index, over ``n_units`` units, of ``name`` and all its ancestors (outermost last)."""
        factor = self.spec.factors[name]
        own = factor.gather_index(self.values[name], n_units)
        if factor.parent is None:
            return own
        return own[self._chain_index(factor.parent, n_units)]

    def _reindex(self, name: str, value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        f = self.spec.factors[name]
        flat = value.reshape(f.n_units, *f.unit_shape)
        return flat[index].reshape(value.shape)

    def compose(self, other: "GroupElement") -> "GroupElement":
        """``self . other`` (``other`` acts first)."""
        if other.spec != self.spec:
            raise SpecError("cannot compose elements of different specs")
        out: dict[str, torch.Tensor] = {}
        for name in self.spec.factor_order:
            f = self.spec.factors[name]
            if isinstance(f, Translation):
                continue
            mine = self.values[name]
            if f.parent is not None:
                index = other._chain_index(f.parent, f.n_units)
                mine = self._reindex(name, mine, torch.argsort(index))
            out[name] = f.compose(mine, other.values[name])
        translations = self._translations()
        if translations:
            other_inv = other.inverse_linear()
            for name, (pname, shift) in translations.items():
                moved = _row_transform(self.spec, pname, shift.axis, self.values[name], other_inv)
                out[name] = other.values[name] + moved
        return GroupElement(self.spec, out)

    def inverse_linear(self) -> dict[str, torch.Tensor]:
        """Inverse of the linear factors only (translations left out)."""
        out: dict[str, torch.Tensor] = {}
        for name in self.spec.factor_order:
            f = self.spec.factors[name]
            if isinstance(f, Translation):
                out[name] = f.identity()
                continue
            inv = f.inverse(self.values[name])
            if f.parent is not None:
                inv = self._reindex(name, inv, self._chain_index(f.parent, f.n_units))
            out[name] = inv
        return out

    def inverse(self) -> "GroupElement":
        out = self.inverse_linear()
        for name, (pname, shift) in self._translations().items():
            out[name] = -_row_transform(self.spec, pname, shift.axis, self.values[name], self.values)
        return GroupElement(self.spec, out)

    def _translations(self) -> dict[str, tuple[str, object]]:
        out = {}
        for name, f in self.spec.factors.items():
            if isinstance(f, Translation):
                ((pname, shift),) = self.spec.shifts_of(name)
                out[name] = (pname, shift)
        return out

    # ----- action and inspection ---------------------------------------------------------------------
    def act(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``g . params``, the same as ``act(g.spec, params, g)``."""
        return act(self.spec, params, self)

    def is_identity(self, atol: float = 1e-12) -> bool:
        return all(self.spec.factors[n].is_identity(v, atol) for n, v in self.values.items())

    def __repr__(self) -> str:
        moved = [n for n, v in self.values.items() if not self.spec.factors[n].is_identity(v)]
        return f"GroupElement({len(self.values)} factors, {len(moved)} non-identity)"


def _row_transform(spec: Spec, pname: str, axis: int, row: torch.Tensor, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Apply the linear factors of ``values`` to a translation vector viewed as one slice of ``pname``."""
    ps = spec.params[pname]
    shape = list(ps.shape)
    shape[axis] = 1
    x = row.to(torch.float64).reshape(shape)
    y = apply_linear(spec, ps, x, values, skip_axis=axis)
    return y.reshape(row.shape)
