"""Small reference models by name (for the CLI: ``symm laws mlp-relu``, ``symm laws verify --model cnn-batchnorm``).

``cnn-batchnorm`` trains with batch statistics: ``symm laws verify`` tracks it with its training-mode spec
(``spec_for(config, mode="train")``), which adds a per-channel filter-scale law ahead of each BatchNorm (approximate:
torch's BatchNorm eps is 1e-5).
"""

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
    # per-head QK-norm (Qwen3) with eps = 0, which makes its scale invariance (and the norm-scale laws) exact;
    # with Qwen3's eps = 1e-6 (the config default) they hold only approximately (README, "Conservation laws")
    "attention-qknorm": TransformerConfig(vocab_size=128, pe="rope", n_kv_heads=2, ffn="swiglu", qk_norm=True, qk_norm_eps=0.0),
    # sigmoid gates normalised over all experts: no router translation (the seed's Theorem 4.7 claims a law)
    "moe-normsigmoid": TransformerConfig(vocab_size=128, ffn="moe", gating="normsigmoid"),
}


def named_config(name: str):
    """The reference config called ``name``; a clear error listing the names otherwise."""
    try:
        return NAMED_CONFIGS[name]
    except KeyError:
        raise UnsupportedArchitecture(f"no reference model named {name!r}; known: {', '.join(NAMED_CONFIGS)}") from None
