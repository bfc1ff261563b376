"""Continuous block factors for attention heads: GL(d) per unit and RoPE rotation-scaling per frequency pair.

``out`` maps each block ``v -> M v``; ``in`` maps ``v -> M^{-T} v`` (e.g. Q rows by M, K rows by M^{-T}
keeps every score q.k; V rows by M, O columns by M^{-T} keeps O V).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import Factor, Side

PairLayout = Literal["interleaved", "half"]


def _check_block(block: int, name: str) -> None:
    if block != 1:
        raise ValueError(f"factor {name!r}: block factors act on whole head dims; block={block} is not supported")


@dataclass(frozen=True)
class GeneralLinear(Factor):
    """GL(dim) per unit (``count`` units, e.g. one per KV group). Dimension ``count * dim^2``."""

    dim: int = 1
    log_std: float = 0.3

    kind = "general-linear"
    is_continuous = True

    @property
    def unit_size(self) -> int:
        return self.dim

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return (self.dim, self.dim)

    @property
    def dimension(self) -> int:
        return self.n_units * self.dim * self.dim

    def _describe_extra(self) -> str:
        return f" blocks of GL({self.dim})"

    def identity(self) -> torch.Tensor:
        return torch.eye(self.dim, dtype=torch.float64).expand(self.element_shape).clone()

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """U diag(exp(s)) V with Haar-like orthogonal U, V: well conditioned, both signs of det."""
        shape = (self.n_units, self.dim, self.dim)
        u, _ = torch.linalg.qr(torch.randn(shape, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(shape, generator=generator, dtype=torch.float64))
        s = torch.exp(self.log_std * torch.randn(self.n_units, self.dim, generator=generator, dtype=torch.float64))
        # QR of a square Gaussian fixes det(Q) = (-1)^(d-1), so flip one column at random for both signs of det
        flip = 2.0 * torch.randint(0, 2, (self.n_units, 1), generator=generator, dtype=torch.float64) - 1.0
        u = torch.cat([u[..., :1] * flip.unsqueeze(-1), u[..., 1:]], dim=-1)
        return (u * s.unsqueeze(-2) @ v).reshape(self.element_shape)

    @property
    def n_laws(self) -> int:
        return self.n_units * self.dim * (self.dim + 1) // 2

    def generators(self) -> torch.Tensor:
        """The d^2 matrix units E_ij."""
        return torch.eye(self.dim * self.dim, dtype=torch.float64).reshape(-1, self.dim, self.dim)

    def symmetric_generators(self) -> torch.Tensor:
        """(E_ij + E_ji) / 2 for i <= j: d(d+1)/2 of them."""
        i, j = torch.triu_indices(self.dim, self.dim)
        out = torch.zeros(len(i), self.dim, self.dim, dtype=torch.float64)
        out[torch.arange(len(i)), i, j] += 0.5
        out[torch.arange(len(i)), j, i] += 0.5
        return out

    def exp(self, xi: torch.Tensor) -> torch.Tensor:
        """The matrix exponential per unit."""
        return torch.linalg.matrix_exp(xi.to(torch.float64))

    def algebra_matrix(self, xi: torch.Tensor) -> torch.Tensor:
        return xi.to(torch.float64)

    def testing_elements(self) -> list[torch.Tensor]:
        d = self.dim
        near = self.exp(1e-3 * torch.arange(1, d * d + 1, dtype=torch.float64).reshape(d, d).sin())
        reflect = torch.eye(d, dtype=torch.float64)
        reflect[0, 0] = -1.0  # det < 0
        out = [self.identity(), self.per_unit(near), self.per_unit(torch.diag(torch.linspace(2.0, 0.5, d, dtype=torch.float64))), self.per_unit(reflect)]
        if d >= 2:
            c, s = 0.5, 3.0**0.5 / 2  # rotation of the first coordinate plane by 60 degrees
            rot, shear = torch.eye(d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)
            rot[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
            shear[0, 1] = 1.0
            out += [self.per_unit(rot), self.per_unit(shear)]
        return out

    def compose(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    def inverse(self, a: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv(a)

    def apply(self, x: torch.Tensor, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        _check_block(block, self.name)
        m = element.to(x.dtype)
        if side == "in":
            m = torch.linalg.inv(m).transpose(-1, -2)
        lead = x.shape[:-1]
        v = x.reshape(*lead, self.count, repeat, self.dim)
        m = _align(m, x, len(self.batch), 2)
        y = torch.einsum("...crd,...ced->...cre", v, m)  # y = M v per unit, shared over repeat; no broadcast copies
        return y.reshape(x.shape)


def _align(element: torch.Tensor, x: torch.Tensor, n_batch: int, n_unit: int) -> torch.Tensor:
    """Insert singleton axes so ``(*batch, count, *unit)`` broadcasts against ``x`` without its last axis."""
    middle = x.dim() - n_batch - 1
    head, tail = element.shape[:n_batch], element.shape[n_batch:]
    return element.reshape(*head, *([1] * middle), *tail)


def pairs_view(x: torch.Tensor, dim: int, layout: PairLayout) -> torch.Tensor:
    """``(..., dim)`` -> ``(..., dim/2, 2)``: the two coordinates of each RoPE frequency pair.

    ``interleaved`` (RoFormer): pair j is dims (2j, 2j+1); ``half`` (HF ``rotate_half``): pair j is (j, j+dim/2).
    """
    if layout == "interleaved":
        return x.reshape(*x.shape[:-1], dim // 2, 2)
    return x.reshape(*x.shape[:-1], 2, dim // 2).transpose(-1, -2)


def unpairs_view(p: torch.Tensor, dim: int, layout: PairLayout) -> torch.Tensor:
    """Inverse of :func:`pairs_view`."""
    if layout == "interleaved":
        return p.reshape(*p.shape[:-2], dim)
    return p.transpose(-1, -2).reshape(*p.shape[:-2], dim)


@dataclass(frozen=True)
class RotationScaling(Factor):
    """Per unit and per RoPE frequency pair, ``a I + b J`` (J the 90-degree rotation): C^* ^(dim/2).

    These commute with every RoPE rotation, so Q -> M Q, K -> M^{-T} K keeps all scores. Element
    ``(..., count, dim/2, 2)`` holds (a, b). Dimension ``count * dim``.
    """

    dim: int = 2
    layout: PairLayout = "half"
    log_std: float = 0.3

    kind = "rotation-scaling"
    is_continuous = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim % 2:
            raise ValueError(f"factor {self.name!r}: RoPE head_dim must be even, got {self.dim}")
        if self.layout not in ("interleaved", "half"):
            raise ValueError(f"factor {self.name!r}: layout must be 'interleaved' or 'half', got {self.layout!r}")

    @property
    def unit_size(self) -> int:
        return self.dim

    @property
    def unit_shape(self) -> tuple[int, ...]:
        return (self.dim // 2, 2)

    @property
    def dimension(self) -> int:
        return self.n_units * self.dim

    def _describe_extra(self) -> str:
        return f" units x {self.dim // 2} RoPE pairs ({self.layout} layout)"

    def identity(self) -> torch.Tensor:
        e = torch.zeros(self.element_shape, dtype=torch.float64)
        e[..., 0] = 1.0
        return e

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        shape = self.element_shape[:-1]
        r = torch.exp(self.log_std * torch.randn(shape, generator=generator, dtype=torch.float64))
        theta = (2 * torch.rand(shape, generator=generator, dtype=torch.float64) - 1) * math.pi
        return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)

    @property
    def n_laws(self) -> int:
        """Only the scaling generator of each pair is symmetric: d/2 laws per unit."""
        return self.n_units * (self.dim // 2)

    def generators(self) -> torch.Tensor:
        """Per pair j, the scaling s_j (unit (1, 0) at pair j) and the rotation theta_j (unit (0, 1)): ``(d, d/2, 2)``.

        Algebra coordinates (s, theta) per pair mean s I + theta J, with exp = e^s (cos theta I + sin theta J).
        """
        half = self.dim // 2
        return torch.eye(self.dim, dtype=torch.float64).reshape(self.dim, half, 2)

    def symmetric_generators(self) -> torch.Tensor:
        return self.generators()[0::2]

    def exp(self, xi: torch.Tensor) -> torch.Tensor:
        r, theta = torch.exp(xi[..., 0].to(torch.float64)), xi[..., 1].to(torch.float64)
        return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)

    def algebra_matrix(self, xi: torch.Tensor) -> torch.Tensor:
        """``(d, d)``: s I + theta J on each pair, placed by the pair layout (J maps (x0, x1) to (-x1, x0))."""
        half = self.dim // 2
        idx = pairs_view(torch.arange(self.dim), self.dim, self.layout)  # (d/2, 2): the two dims of each pair
        m = torch.zeros(self.dim, self.dim, dtype=torch.float64)
        p, q = idx[:, 0], idx[:, 1]
        s, theta = xi[..., 0].to(torch.float64).reshape(half), xi[..., 1].to(torch.float64).reshape(half)
        m[p, p], m[q, q], m[p, q], m[q, p] = s, s, -theta, theta
        return m

    def testing_elements(self) -> list[torch.Tensor]:
        half = self.dim // 2
        pair = lambda s, t: self.per_unit(self.exp(torch.tensor([s, t], dtype=torch.float64).expand(half, 2)))  # noqa: E731
        return [self.identity(), pair(1e-3, 1e-3), pair(0.0, torch.pi / 2), pair(float(torch.log(torch.tensor(2.0))), 0.0), pair(-0.5, 2.0)]

    def compose(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(torch.view_as_complex(a.contiguous()) * torch.view_as_complex(b.contiguous()))

    def inverse(self, a: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(1.0 / torch.view_as_complex(a.contiguous()))

    def check_element(self, element: torch.Tensor) -> None:
        super().check_element(element)
        if not bool((element.pow(2).sum(-1) > 0).all()):
            raise ValueError(f"factor {self.name!r}: a rotation-scaling pair (a, b) is zero (not invertible)")

    def apply(self, x: torch.Tensor, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        _check_block(block, self.name)
        a, b = element[..., 0].to(x.dtype), element[..., 1].to(x.dtype)
        if side == "in":  # (aI + bJ)^{-T} = (aI + bJ) / (a^2 + b^2)
            r2 = a * a + b * b
            a, b = a / r2, b / r2
        lead = x.shape[:-1]
        p = pairs_view(x.reshape(*lead, self.count, repeat, self.dim), self.dim, self.layout)
        n_batch = len(self.batch)
        a = _align(a, x, n_batch, 1).unsqueeze(-2)  # broadcast over repeat
        b = _align(b, x, n_batch, 1).unsqueeze(-2)
        x0, x1 = p[..., 0], p[..., 1]
        y = torch.stack([a * x0 - b * x1, b * x0 + a * x1], dim=-1)
        return unpairs_view(y, self.dim, self.layout).reshape(x.shape)
