"""Reference CNN: conv -> [BatchNorm|GroupNorm] -> activation -> 2x2 average pool blocks, then a linear head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import catalogue
from ..spec import Spec
from .activations import activation_fn


@dataclass(frozen=True)
class CNNConfig:
    in_channels: int = 1
    widths: tuple[int, ...] = (8, 16)
    n_classes: int = 10
    image_size: int = 8
    activation: str = "relu"
    norm: str = "batch"  # "none" | "batch" | "group"
    groups: int = 2
    kernel: int = 3

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.image_size % (2 ** len(self.widths)):
            raise ValueError(f"image_size {self.image_size} must be divisible by 2^{len(self.widths)} (one pool per block)")
        catalogue.activation_group(self.activation)

    @property
    def head_pixels(self) -> int:
        side = self.image_size // 2 ** len(self.widths)
        return side * side


class CNN(nn.Module):
    def __init__(self, config: CNNConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        convs, norms = [], []
        for w in config.widths:
            convs.append(nn.Conv2d(c, w, config.kernel, padding=config.kernel // 2))
            if config.norm == "batch":
                norms.append(nn.BatchNorm2d(w))
            elif config.norm == "group":
                norms.append(nn.GroupNorm(config.groups, w))
            c = w
        self.convs = nn.ModuleList(convs)
        self.norms = nn.ModuleList(norms)
        self.head = nn.Linear(c * config.head_pixels, config.n_classes)
        self._act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor, *, dropout: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits; ``dropout`` holds one multiplicative mask per block output (explicit randomness, for vmap)."""
        if x.dim() == 2:
            side = self.config.image_size
            x = x.reshape(x.shape[0], self.config.in_channels, side, side)
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if self.norms:
                x = self.norms[i](x)
            x = nn.functional.avg_pool2d(self._act(x), 2)
            if dropout is not None:
                x = x * dropout[i]
        return self.head(x.flatten(1))

    def hidden_shapes(self, batch: int) -> list[tuple[int, ...]]:
        """Shapes of the block outputs (one dropout mask each)."""
        side = self.config.image_size
        shapes = []
        for w in self.config.widths:
            side //= 2
            shapes.append((batch, w, side, side))
        return shapes


def cnn_spec(config: CNNConfig, mode: str = "eval") -> Spec:
    """``mode="train"``: BatchNorm with batch statistics adds per-channel filter scales (:func:`symm.catalogue.cnn`)."""
    n = len(config.widths)
    frag = catalogue.cnn(
        conv_names=[f"convs.{i}" for i in range(n)],
        norm_names=[f"norms.{i}" for i in range(n)] if config.norm != "none" else None,
        head_name="head",
        in_channels=config.in_channels,
        widths=config.widths,
        kernel=(config.kernel, config.kernel),
        n_classes=config.n_classes,
        head_pixels=config.head_pixels,
        activation=config.activation,
        norm=config.norm,
        groups=config.groups,
        mode=mode,
    )
    suffix = "-train" if mode == "train" and config.norm == "batch" else ""
    return Spec(frag, name=f"cnn{list(config.widths)}-{config.norm}-{config.activation}{suffix}")
