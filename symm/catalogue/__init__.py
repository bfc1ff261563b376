"""Catalogue entries: small functions returning Spec fragments for components, composed into whole models."""

from .attention import PE_KINDS, AttentionShape, attention, attention_factors, fused_attention_conv1d
from .conv import batchnorm, cnn, conv2d, groupnorm
from .mlp import linear, mlp, swiglu
from .moe import GATINGS, expert_factors, has_translation, router, shared_expert, stacked_swiglu_experts
from .residual import layernorm, residual_cnn, residual_mlp
from .units import ACTIVATION_GROUPS, Units, activation_group, channels, neurons, stream

__all__ = [
    "GATINGS",
    "PE_KINDS",
    "AttentionShape",
    "attention",
    "attention_factors",
    "fused_attention_conv1d",
    "expert_factors",
    "has_translation",
    "router",
    "shared_expert",
    "stacked_swiglu_experts",
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
