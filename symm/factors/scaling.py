"""Per-unit diagonal factors: positive rescaling (ReLU-like units), one-sided norm scales (a following normalisation
absorbs them) and sign flips (odd activations)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Factor, Side, broadcast_batch, expand_units


@dataclass(frozen=True)
class _Diagonal(Factor):
    is_continuous = False

    def identity(self) -> torch.Tensor:
        return torch.ones(self.element_shape, dtype=torch.float64)

    def compose(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b

    def inverse(self, a: torch.Tensor) -> torch.Tensor:
        return 1.0 / a

    def entry_values(self, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        """Per-entry multipliers over an axis segment (``out``: the element, ``in``: its inverse)."""
        values = element if side == "out" else 1.0 / element
        return expand_units(values, repeat, block)

    def apply(self, x: torch.Tensor, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        values = self.entry_values(element.to(x.dtype), side, repeat, block)
        return x * broadcast_batch(values, x, len(self.batch))


@dataclass(frozen=True)
class _PositiveDiagonal(_Diagonal):
    """(R_{>0})^n per unit: shared by the positive kinds (elements ``exp(xi)``, Lie algebra: diagonal)."""

    log_std: float = 0.5

    is_continuous = True

    @property
    def dimension(self) -> int:
        return self.n_units

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        z = torch.randn(self.element_shape, generator=generator, dtype=torch.float64)
        return torch.exp(self.log_std * z)

    @property
    def n_laws(self) -> int:
        return self.n_units

    def generators(self) -> torch.Tensor:
        return torch.ones(1, dtype=torch.float64)

    def symmetric_generators(self) -> torch.Tensor:
        return self.generators()

    def exp(self, xi: torch.Tensor) -> torch.Tensor:
        """a = e^t per unit."""
        return torch.exp(xi.to(torch.float64))

    def algebra_matrix(self, xi: torch.Tensor) -> torch.Tensor:
        return xi.to(torch.float64).reshape(1, 1)

    def testing_elements(self) -> list[torch.Tensor]:
        alternating = torch.where(torch.arange(self.count) % 2 == 0, 0.5, 2.0).to(torch.float64)
        return [
            self.identity(),
            self.exp(torch.full(self.element_shape, 1e-3, dtype=torch.float64)),
            torch.full(self.element_shape, 2.0, dtype=torch.float64),
            alternating.expand(self.element_shape).clone(),
        ]

    def check_element(self, element: torch.Tensor) -> None:
        super().check_element(element)
        if not bool((element > 0).all()):
            raise ValueError(f"factor {self.name!r}: {self.kind} needs every entry > 0")


@dataclass(frozen=True)
class PositiveScaling(_PositiveDiagonal):
    """(R_{>0})^n: ``out`` multiplies unit i by a_i, ``in`` divides by a_i. Lie algebra: diagonal."""

    kind = "positive-scaling"


@dataclass(frozen=True)
class NormScale(_PositiveDiagonal):
    """(R_{>0})^n on the producer side only: unit i's rows (and bias) times a_i, absorbed by a normalisation that follows.

    n(a x) = n(x) for a > 0 when n normalises by the unit's own statistics (BatchNorm in training mode: per channel
    over the batch; per-head QK RMSNorm: per head over head_dim). No consumer divides by a_i, so the factor only ever
    acts with side ``out``; its law is 1/2 (||w_i||^2 + b_i^2). ``norm`` names the absorbing normalisation, ``eps``
    its epsilon: with eps > 0, n(a x) != n(x) exactly, and invariance and law hold only approximately.
    ``training_only``: the invariance needs batch statistics (absent in eval mode, where running statistics are fixed).
    """

    norm: str = ""
    eps: float = 0.0
    training_only: bool = False

    kind = "norm-scale"
    one_sided = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.eps >= 0.0:
            raise ValueError(f"factor {self.name!r}: eps must be >= 0, got {self.eps}")

    def _describe_extra(self) -> str:
        mode = ", training mode only" if self.training_only else ""
        return f" absorbed by {self.norm or 'a normalisation'} (eps={self.eps:g}{mode})"

    def apply(self, x: torch.Tensor, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        if side != "out":
            raise ValueError(f"factor {self.name!r}: a norm scale acts on the producer side only (side 'out'), got {side!r}")
        return super().apply(x, element, side, repeat, block)


@dataclass(frozen=True)
class SignFlip(_Diagonal):
    """{+1,-1}^n: both sides multiply unit i by s_i (s^{-T} = s)."""

    kind = "sign-flip"

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        bits = torch.randint(0, 2, self.element_shape, generator=generator)
        return (2 * bits - 1).to(torch.float64)

    def testing_elements(self) -> list[torch.Tensor]:
        first = torch.ones(self.element_shape, dtype=torch.float64)
        first[..., 0] = -1.0
        return [self.identity(), -self.identity(), first]

    def inverse(self, a: torch.Tensor) -> torch.Tensor:
        return a.clone()

    def check_element(self, element: torch.Tensor) -> None:
        super().check_element(element)
        if not bool((element.abs() == 1).all()):
            raise ValueError(f"factor {self.name!r}: sign flips must be +1 or -1")
