"""Reference residual models: a pre-norm residual MLP and a small ResNet-style CNN."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import catalogue
from ..spec import Spec
from .activations import activation_fn


@dataclass(frozen=True)
class ResidualMLPConfig:
    d_in: int = 64
    d_model: int = 32
    d_hidden: int = 64
    n_blocks: int = 2
    n_out: int = 10
    activation: str = "relu"
    norm: bool = True


class ResidualMLPBlock(nn.Module):
    def __init__(self, c: ResidualMLPConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c.d_model) if c.norm else nn.Identity()
        self.fc1 = nn.Linear(c.d_model, c.d_hidden)
        self.fc2 = nn.Linear(c.d_hidden, c.d_model)
        self._act = activation_fn(c.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self._act(self.fc1(self.norm(x))))


class ResidualMLP(nn.Module):
    def __init__(self, config: ResidualMLPConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Linear(config.d_in, config.d_model)
        self.blocks = nn.ModuleList(ResidualMLPBlock(config) for _ in range(config.n_blocks))
        self.norm = nn.LayerNorm(config.d_model) if config.norm else nn.Identity()
        self.head = nn.Linear(config.d_model, config.n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def residual_mlp_spec(config: ResidualMLPConfig) -> Spec:
    frag = catalogue.residual_mlp(
        "", config.d_in, config.d_model, config.d_hidden, config.n_blocks, config.n_out, config.activation, config.norm
    )
    return Spec(frag, name=f"residual-mlp-d{config.d_model}x{config.n_blocks}-{config.activation}")


@dataclass(frozen=True)
class ResidualCNNConfig:
    in_channels: int = 1
    width: int = 8
    hidden: int = 16
    n_blocks: int = 2
    n_classes: int = 10
    image_size: int = 8
    activation: str = "relu"


class ResidualCNNBlock(nn.Module):
    def __init__(self, c: ResidualCNNConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c.width, c.hidden, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c.hidden)
        self.conv2 = nn.Conv2d(c.hidden, c.width, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c.width)
        self._act = activation_fn(c.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._act(x + self.norm2(self.conv2(self._act(self.norm1(self.conv1(x))))))


class ResidualCNN(nn.Module):
    def __init__(self, config: ResidualCNNConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Conv2d(config.in_channels, config.width, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(config.width)
        self.blocks = nn.ModuleList(ResidualCNNBlock(config) for _ in range(config.n_blocks))
        self.head = nn.Linear(config.width, config.n_classes)
        self._act = activation_fn(config.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            side = self.config.image_size
            x = x.reshape(x.shape[0], self.config.in_channels, side, side)
        x = self._act(self.stem_norm(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def residual_cnn_spec(config: ResidualCNNConfig) -> Spec:
    frag = catalogue.residual_cnn(
        "", config.in_channels, config.width, config.hidden, config.n_blocks, config.n_classes, config.activation
    )
    return Spec(frag, name=f"residual-cnn-w{config.width}x{config.n_blocks}-{config.activation}")
