"""Reference MLP: any depth, width and catalogue activation (including SwiGLU layers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import catalogue
from ..spec import Spec
from .activations import activation_fn


@dataclass(frozen=True)
class MLPConfig:
    sizes: tuple[int, ...]
    activation: str = "relu"
    bias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if len(self.sizes) < 2:
            raise ValueError("an MLP needs at least input and output sizes")
        catalogue.activation_group(self.activation)


class SwiGLULayer(nn.Module):
    """``silu(gate(x)) * up(x)``."""

    def __init__(self, d_in: int, d_out: int, bias: bool) -> None:
        super().__init__()
        self.gate = nn.Linear(d_in, d_out, bias=bias)
        self.up = nn.Linear(d_in, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(self.gate(x)) * self.up(x)


class MLP(nn.Module):
    """``layers.{i}`` dense (or SwiGLU) layers with the activation between them; the last layer is linear."""

    def __init__(self, config: MLPConfig) -> None:
        super().__init__()
        self.config = config
        s, n = config.sizes, len(config.sizes) - 1
        layers: list[nn.Module] = []
        for i in range(n):
            if config.activation == "swiglu" and i < n - 1:
                layers.append(SwiGLULayer(s[i], s[i + 1], config.bias))
            else:
                layers.append(nn.Linear(s[i], s[i + 1], bias=config.bias))
        self.layers = nn.ModuleList(layers)
        self._act = None if config.activation == "swiglu" else activation_fn(config.activation)

    def forward(self, x: torch.Tensor, *, dropout: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; ``dropout`` holds one multiplicative mask per hidden layer (explicit randomness, for vmap)."""
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                if self._act is not None:
                    x = self._act(x)
                if dropout is not None:
                    x = x * dropout[i]
        return x

    def hidden_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Shapes of the hidden activations (one dropout mask each)."""
        return [(batch, s) for s in self.config.sizes[1:-1]]


def mlp_spec(config: MLPConfig) -> Spec:
    names = [f"layers.{i}" for i in range(len(config.sizes) - 1)]
    frag = catalogue.mlp(names, config.sizes, config.activation, bias=config.bias)
    return Spec(frag, name=f"mlp{list(config.sizes)}-{config.activation}")
