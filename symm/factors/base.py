"""The Factor interface: one group acting on one set of units.

An element acts on an axis segment as a block-diagonal matrix ``M`` (one block per unit).
Side ``"out"`` maps the axis vectors ``v -> M v`` (the units a layer produces); side ``"in"`` maps
``v -> M^{-T} v`` (the units a layer consumes), so ``W_out W_in`` is unchanged.
Elements are small tensors (index vectors, scale vectors, stacks of d x d blocks), never n x n matrices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Side = Literal["out", "in"]
SIDES: tuple[Side, ...] = ("out", "in")


@dataclass(frozen=True)
class Factor:
    """Base of all factor kinds.

    ``count`` units, each acting on ``unit_size`` consecutive entries of an axis; a factor with
    ``batch`` shape holds one independent element per unit of its parent (experts, say), which is the
    wreath-product structure: permuting the parent reorders the batch. ``parent`` names the
    permutation-like factor whose units index this factor's blocks (``None`` for a root).
    """

    name: str
    count: int
    parent: str | None = None
    batch: tuple[int, ...] = ()

    kind = "factor"
    #: True for factors that reorder units (their elements are index vectors).
    is_permutation = False
    #: True for factors with continuous (Lie-group) parameters.
    is_continuous = False
    #: True for factors that act on the producer side (``out``) only: nothing consumes their units with the inverse,
    #: a normalisation that follows absorbs them (e.g. a filter's scale before BatchNorm in training mode).
    one_sided = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a factor needs a non-empty name")
        if self.count < 1:
            raise ValueError(f"factor {self.name!r}: count must be >= 1, got {self.count}")
        object.__setattr__(self, "batch", tuple(int(b) for b in self.batch))

    # ----- sizes -------------------------------------------------------------------------------
    @property
    def unit_size(self) -> int:
        """Axis entries covered by one unit (1 for scalars, d for a d x d block)."""
        return 1

    @property
    def n_units(self) -> int:
        """Units over all batch entries."""
        n = self.count
        for b in self.batch:
            n *= b
        return n

    def level_units(self, entries: int) -> int:
        """Units an axis segment of ``entries`` units-times-unit-size holds (``count``; heads or KV groups for heads)."""
        return self.count

    @property
    def unit_shape(self) -> tuple[int, ...]:
        """Shape of one unit's element (``()`` for scalars, ``(d, d)`` for a block)."""
        return ()

    @property
    def element_shape(self) -> tuple[int, ...]:
        return (*self.batch, self.count, *self.unit_shape)

    @property
    def dimension(self) -> int:
        """Dimension of the continuous part of the factor (0 for discrete factors)."""
        return 0

    def describe(self) -> str:
        batch = "".join(f"{b} x " for b in self.batch)
        parent = f", indexed by {self.parent}" if self.parent else ""
        return f"{self.kind}({batch}{self.count}{self._describe_extra()}){parent}"

    def _describe_extra(self) -> str:
        return ""

    # ----- group structure (per unit, no reindexing: the Spec handles parents) --------------------
    def identity(self) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def compose(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Unitwise product ``a . b`` (``b`` acts first)."""
        raise NotImplementedError

    def inverse(self, a: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def is_identity(self, a: torch.Tensor, atol: float = 1e-12) -> bool:
        return bool(torch.allclose(a, self.identity().to(a.dtype), atol=atol, rtol=0))

    # ----- Lie algebra (continuous kinds; discrete kinds have none) ------------------------------
    @property
    def n_laws(self) -> int:
        """Conservation laws of gradient flow this factor implies: one per symmetric generator per unit
        (quadratic laws), or one per translation direction (linear laws). 0 for discrete kinds."""
        return 0

    def generators(self) -> torch.Tensor:
        """A basis of one unit's Lie algebra, ``(k, *unit_shape)`` in the coordinates :meth:`exp` reads."""
        return torch.zeros((0, *self.unit_shape), dtype=torch.float64)

    def symmetric_generators(self) -> torch.Tensor:
        """The basis elements whose action on a unit is a symmetric matrix (each gives a quadratic law)."""
        return self.generators()[:0]

    def exp(self, xi: torch.Tensor) -> torch.Tensor:
        """Algebra element (shaped like an element) -> group element."""
        raise TypeError(f"factor {self.name!r} ({self.kind}) is discrete: it has no Lie algebra")

    def algebra_matrix(self, xi: torch.Tensor) -> torch.Tensor:
        """``(unit_size, unit_size)``: how one unit's algebra element acts on its entries on the ``out`` side
        (the derivative of the action at the identity; the ``in`` side acts as its negative transpose)."""
        raise TypeError(f"factor {self.name!r} ({self.kind}) has no linear Lie-algebra action")

    def testing_elements(self) -> list[torch.Tensor]:
        """A few hand-picked elements, the identity first (near-identity ones for continuous kinds)."""
        return [self.identity()]

    def per_unit(self, value: torch.Tensor) -> torch.Tensor:
        """Broadcast one unit's value (``unit_shape``) to a whole element (every unit and batch entry)."""
        return value.to(torch.float64).expand(*self.batch, self.count, *self.unit_shape).clone()

    # ----- action on an axis --------------------------------------------------------------------
    def apply(self, x: torch.Tensor, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        """Act on the last axis of ``x``.

        The last axis holds ``units * repeat * unit_size * block`` entries in that nesting order
        (``repeat``: consecutive units that share one element, e.g. the query heads of one KV group;
        ``block``: entries per scalar, e.g. the ``h*w`` pixels of a flattened channel). If the factor
        is batched, ``x`` has the batch on its leading axes and ``element`` carries it too.
        """
        raise NotImplementedError

    def check_element(self, element: torch.Tensor) -> None:
        if tuple(element.shape) != self.element_shape:
            raise ValueError(
                f"factor {self.name!r}: element has shape {tuple(element.shape)}, expected {self.element_shape}"
            )


def flat_units(element: torch.Tensor, factor: Factor) -> torch.Tensor:
    """View an element as ``(n_units, *unit_shape)``."""
    return element.reshape(factor.n_units, *factor.unit_shape)


def expand_units(values: torch.Tensor, repeat: int, block: int) -> torch.Tensor:
    """Repeat each unit's value ``repeat`` times then ``block`` times along the last axis of a unit vector."""
    if repeat * block == 1:
        return values
    return values.repeat_interleave(repeat * block, dim=-1)


def broadcast_batch(values: torch.Tensor, x: torch.Tensor, n_batch: int) -> torch.Tensor:
    """Shape per-entry values ``(*batch, n)`` so they broadcast against ``x`` along its last axis."""
    middle = x.dim() - n_batch - 1
    return values.reshape(*values.shape[:n_batch], *([1] * middle), values.shape[-1])
