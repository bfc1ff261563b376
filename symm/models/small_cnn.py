"""The Small CNN Zoo architecture (Unterthiner et al. 2020): strided convs, global average pooling, a dense head.

``n_layers`` x [Conv2d(width, 3x3, stride 2, no padding) -> activation], then the mean over H and W, then
Linear(width, n_classes). Spatial sizes 28 -> 13 -> 6 -> 2 (MNIST, Fashion-MNIST), 32 -> 15 -> 7 -> 3 (CIFAR-10-GS,
SVHN-GS). Dropout only acts in training and is left out. Its group: a channel permutation per conv layer x positive
per-channel scaling (ReLU) or sign flips (tanh); the head reads one pooled value per channel.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from .. import catalogue
from ..spec import Spec
from .activations import activation_fn

KERNEL = 3
STRIDE = 2


@dataclass(frozen=True)
class SmallCNNConfig:
    in_channels: int = 1
    width: int = 16
    n_layers: int = 3
    n_classes: int = 10
    image_size: int = 28
    activation: str = "relu"

    def __post_init__(self) -> None:
        for name in ("in_channels", "width", "n_layers", "n_classes", "image_size"):
            value = getattr(self, name)
            try:
                value = operator.index(value)
            except TypeError:
                value = 0
            if value < 1:
                raise ValueError(f"SmallCNNConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        if self.spatial_sizes[-1] < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for {self.n_layers} stride-{STRIDE} {KERNEL}x{KERNEL} convs "
                f"(spatial sizes {self.spatial_sizes})"
            )
        catalogue.activation_group(self.activation)
        activation_fn(self.activation)

    @property
    def spatial_sizes(self) -> tuple[int, ...]:
        """Side of the input and of each conv's output: s -> floor((s - 3) / 2) + 1 (VALID padding)."""
        sides = [self.image_size]
        for _ in range(self.n_layers):
            sides.append((sides[-1] - KERNEL) // STRIDE + 1)
        return tuple(sides)


class SmallCNN(nn.Module):
    """``convs.{i}`` strided 3x3 convs with the activation, global average pooling, ``head`` dense logits."""

    def __init__(self, config: SmallCNNConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        convs = []
        for _ in range(config.n_layers):
            convs.append(nn.Conv2d(c, config.width, KERNEL, stride=STRIDE, padding=0))
            c = config.width
        self.convs = nn.ModuleList(convs)
        self.head = nn.Linear(c, config.n_classes)
        self._act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of images (N, C, H, W), or of flattened images (N, C*H*W) of side ``image_size``."""
        if x.dim() == 2:
            side = self.config.image_size
            x = x.reshape(x.shape[0], self.config.in_channels, side, side)
        for conv in self.convs:
            x = self._act(conv(x))
        return self.head(x.mean(dim=(2, 3)))


def small_cnn_spec(config: SmallCNNConfig) -> Spec:
    """The catalogue CNN with no norm and a head of one pooled value per channel (``head_pixels=1``)."""
    n = config.n_layers
    frag = catalogue.cnn(
        conv_names=[f"convs.{i}" for i in range(n)],
        norm_names=None,
        head_name="head",
        in_channels=config.in_channels,
        widths=(config.width,) * n,
        kernel=(KERNEL, KERNEL),
        n_classes=config.n_classes,
        head_pixels=1,
        activation=config.activation,
        norm="none",
    )
    return Spec(frag, name=f"small-cnn-{config.width}x{n}-{config.activation}")
