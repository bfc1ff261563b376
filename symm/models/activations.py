"""Elementwise activations by catalogue name."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UnsupportedArchitecture

_ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1),
    "tanh": torch.tanh,
    "gelu": F.gelu,
    "silu": F.silu,
}


def activation_fn(name: str):
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise UnsupportedArchitecture(f"no elementwise activation named {name!r} (known: {sorted(_ACTIVATIONS)})") from None
