"""Small reference models by name (for the CLI: ``symm laws mlp-relu``, later ``symm laws verify --model``)."""

from __future__ import annotations

from ..errors import UnsupportedArchitecture
from .cnn import CNNConfig
from .mlp import MLPConfig
from .transformer import TransformerConfig

NAMED_CONFIGS = {
    "mlp-relu": MLPConfig((64, 128, 128, 10), "relu"),
    "mlp-gelu": MLPConfig((64, 128, 128, 10), "gelu"),
    "mlp-tanh": MLPConfig((64, 128, 128, 10), "tanh"),
    "swiglu": MLPConfig((64, 128, 128, 10), "swiglu"),
    "cnn-batchnorm": CNNConfig(norm="batch"),
    "attention-sinusoidal": TransformerConfig(vocab_size=128, pe="sinusoidal", ffn="gelu"),
    "attention-rope": TransformerConfig(vocab_size=128, pe="rope", n_kv_heads=2, ffn="swiglu"),
    "attention-rope-interleaved": TransformerConfig(vocab_size=128, pe="rope", rope_layout="interleaved", ffn="swiglu"),
    "moe-softmax": TransformerConfig(vocab_size=128, ffn="moe", gating="topk"),
    "moe-sigmoid": TransformerConfig(vocab_size=128, ffn="moe", gating="sigmoid"),
}


def named_config(name: str):
    """The reference config called ``name``; a clear error listing the names otherwise."""
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise UnsupportedArchitecture(f"no reference model named {name!r}; known: {', '.join(NAMED_CONFIGS)}") from None
