"""Catalogue entries: small functions returning Spec fragments for components, composed into whole models."""

from .conv import batchnorm, cnn, conv2d, groupnorm
from .mlp import linear, mlp, swiglu
from .residual import layernorm, residual_cnn, residual_mlp
from .units import ACTIVATION_GROUPS, Units, activation_group, channels, neurons, stream

__all__ = [
    "ACTIVATION_GROUPS",
    "Units",
    "activation_group",
    "batchnorm",
    "channels",
    "cnn",
    "conv2d",
    "groupnorm",
    "layernorm",
    "linear",
    "mlp",
    "neurons",
    "residual_cnn",
    "residual_mlp",
    "stream",
    "swiglu",
]
