"""Reference torch models, each paired with the catalogue Spec builder for its config."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitecture
from ..catalogue.conv import check_mode
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


#: builders that take ``mode`` (their models have batch statistics or mode-aware entries)
MODE_AWARE = (CNNConfig, TransformerConfig)
#: models without batch statistics: their training-mode spec is their eval spec
NO_BATCH_STATISTICS = (MLPConfig, ResidualMLPConfig, SmallCNNConfig)


def spec_for(model_or_config: nn.Module | object, mode: str = "eval") -> Spec:
    """The Spec of a reference model (or of its config).

    ``mode="eval"`` (aligners): the group of the function with fixed norm statistics. ``mode="train"`` (laws of
    training): plus the symmetries of batch statistics, e.g. a filter's per-channel scale before BatchNorm.
    """
    check_mode(mode)
    config = getattr(model_or_config, "config", model_or_config)
    builder = SPEC_BUILDERS.get(type(config))
    if builder is None:
        raise UnsupportedArchitecture(
            f"no spec builder for {type(model_or_config).__name__}; reference models: "
            + ", ".join(c.__name__ for c in MODEL_CLASSES.values())
        )
    if mode == "eval" or isinstance(config, NO_BATCH_STATISTICS):
        return builder(config)
    if isinstance(config, MODE_AWARE):
        return builder(config, mode=mode)
    raise UnsupportedArchitecture(
        f"{type(config).__name__}: no training-mode spec yet (its BatchNorm scales are not catalogued); use mode='eval'"
    )


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
