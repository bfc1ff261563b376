"""Translation: a common shift added to every row of a parameter (softmax router rows or biases).

softmax(z + c 1) = softmax(z), so adding the same vector t to every router row (and the same c to every
router bias) keeps all gate values. The action is affine, not linear on an axis: the Spec applies it
before the linear factors and composes it with them (a semidirect product).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Factor


@dataclass(frozen=True)
class Translation(Factor):
    """(R^count, +) shifting all rows of one parameter; ``count`` is the size of a row (1 for a bias)."""

    std: float = 1.0

    kind = "translation"
    is_continuous = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch or self.parent:
            raise ValueError(f"factor {self.name!r}: translations cannot be batched or have a parent")

    @property
    def dimension(self) -> int:
        return self.count

    def identity(self) -> torch.Tensor:
        return torch.zeros(self.count, dtype=torch.float64)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return self.std * torch.randn(self.count, generator=generator, dtype=torch.float64)

    @property
    def n_laws(self) -> int:
        """Linear laws: the sum over the shifted rows, one per row entry."""
        return self.count

    def generators(self) -> torch.Tensor:
        return torch.ones(1, dtype=torch.float64)

    def exp(self, xi: torch.Tensor) -> torch.Tensor:
        """(R^n, +) is its own Lie algebra."""
        return xi.to(torch.float64).clone()

    def testing_elements(self) -> list[torch.Tensor]:
        return [self.identity(), torch.full((self.count,), 1e-3, dtype=torch.float64), torch.linspace(-1.0, 1.0, self.count, dtype=torch.float64)]

    def compose(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b

    def inverse(self, a: torch.Tensor) -> torch.Tensor:
        return -a

    def is_identity(self, a: torch.Tensor, atol: float = 1e-12) -> bool:
        return bool((a.abs() <= atol).all())

    def shift(self, x: torch.Tensor, element: torch.Tensor, axis: int) -> torch.Tensor:
        """``x + t`` broadcast along ``axis`` (every slice along ``axis`` gets the same shift)."""
        row_shape = x.shape[:axis] + x.shape[axis + 1 :]
        return x + element.to(x.dtype).reshape(row_shape).unsqueeze(axis)
