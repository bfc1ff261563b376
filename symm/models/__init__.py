"""Reference torch models, each paired with the catalogue Spec builder for its config."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitecture
from ..spec import Spec
from .cnn import CNN, CNNConfig, cnn_spec
from .mlp import MLP, MLPConfig, mlp_spec
from .transformer import TransformerConfig, TransformerLM, transformer_spec
from .small_cnn import SmallCNN, SmallCNNConfig, small_cnn_spec
from .residual import ResidualCNN, ResidualCNNConfig, ResidualMLP, ResidualMLPConfig, residual_cnn_spec, residual_mlp_spec

SPEC_BUILDERS = {
    MLPConfig: mlp_spec,
    CNNConfig: cnn_spec,
    ResidualMLPConfig: residual_mlp_spec,
    ResidualCNNConfig: residual_cnn_spec,
    TransformerConfig: transformer_spec,
    SmallCNNConfig: small_cnn_spec,
}

MODEL_CLASSES = {
    MLPConfig: MLP,
    CNNConfig: CNN,
    ResidualMLPConfig: ResidualMLP,
    ResidualCNNConfig: ResidualCNN,
    TransformerConfig: TransformerLM,
    SmallCNNConfig: SmallCNN,
}


def spec_for(model_or_config: nn.Module | object) -> Spec:
    """The Spec of a reference model (or of its config)."""
    config = getattr(model_or_config, "config", model_or_config)
    builder = SPEC_BUILDERS.get(type(config))
    if builder is None:
        raise UnsupportedArchitecture(
            f"no spec builder for {type(model_or_config).__name__}; reference models: "
            + ", ".join(c.__name__ for c in MODEL_CLASSES.values())
        )
    return builder(config)


def build_model(config: object) -> nn.Module:
    cls = MODEL_CLASSES.get(type(config))
    if cls is None:
        raise UnsupportedArchitecture(f"no reference model for config {type(config).__name__}")
    return cls(config)


__all__ = [
    "CNN",
    "CNNConfig",
    "MLP",
    "MLPConfig",
    "ResidualCNN",
    "ResidualCNNConfig",
    "ResidualMLP",
    "ResidualMLPConfig",
    "SmallCNN",
    "SmallCNNConfig",
    "TransformerConfig",
    "TransformerLM",
    "build_model",
    "spec_for",
]
