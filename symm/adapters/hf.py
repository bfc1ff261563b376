"""Hugging Face adapters: ``spec_from_hf(model | config | folder)`` for GPT-2, XGLM, Llama, Mixtral, Qwen2-MoE.

Specs describe the **in-memory** layout of a loaded ``transformers`` model (``model.state_dict()``), which in
transformers 5 differs from the on-disk one for MoE families (experts fused as ``gate_up_proj`` (E, 2I, d) and
``down_proj`` (E, d, I) in memory; per-expert ``w1/w2/w3`` keys on disk). A checkpoint folder is read with
``from_pretrained`` (:func:`load_hf`), which converts, and written back with ``save_pretrained``.
Built offline from configs; nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from .. import catalogue
from ..catalogue.attention import AttentionShape
from ..catalogue.units import Units
from ..errors import UnsupportedArchitecture
from ..spec import Fragment, Spec, param

log = logging.getLogger(__name__)


def _activation(name: str) -> str:
    """HF activation name -> catalogue name (all GELU variants share GELU's group)."""
    if name.startswith("gelu"):
        return "gelu"
    if name in ("relu", "silu", "tanh"):
        return name
    if name == "swish":
        return "silu"
    raise UnsupportedArchitecture(f"activation {name!r} has no catalogue entry")


def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _stream_fragment(stream: Units, embed: str, vocab: int, d: int, head: str | None) -> Fragment:
    params = {embed: param((vocab, d), None, stream.out())}
    if head:
        params[head] = param((vocab, d), None, stream.inn())
    return Fragment.of(stream.factors, params)


def _rmsnorm(name: str, stream: Units) -> Fragment:
    return catalogue.layernorm(name.rsplit(".weight", 1)[0], stream, bias=False)


def gpt2_spec(config) -> Spec:
    """GPT-2: learned PE (``wpe``), fused Conv1D QKV, LayerNorm with bias, GELU MLP in Conv1D layout, tied head."""
    d, n_layers, h = config.n_embd, config.n_layer, config.n_head
    inner = config.n_inner or 4 * d
    act = _activation(config.activation_function)
    stream = catalogue.stream("stream", d)
    frag = _stream_fragment(stream, "transformer.wte.weight", config.vocab_size, d, "lm_head.weight")
    frag = frag + Fragment.of(params={"transformer.wpe.weight": param((config.n_positions, d), None, stream.out())})
    shape = AttentionShape(d, h, h, d // h)
    for i in range(n_layers):
        b = f"transformer.h.{i}"
        frag = frag + catalogue.layernorm(f"{b}.ln_1", stream) + catalogue.layernorm(f"{b}.ln_2", stream)
        frag = frag + catalogue.fused_attention_conv1d(f"{b}.attn", shape, "learned", stream)
        units = catalogue.neurons(f"{b}.mlp.units", inner, act)
        frag = frag + Fragment.of(
            units.factors,
            {
                f"{b}.mlp.c_fc.weight": param((d, inner), stream.inn(), units.out()),
                f"{b}.mlp.c_fc.bias": param((inner,), units.out()),
                f"{b}.mlp.c_proj.weight": param((inner, d), units.inn(), stream.out()),
                f"{b}.mlp.c_proj.bias": param((d,), stream.out()),
            },
        )
    frag = frag + catalogue.layernorm("transformer.ln_f", stream)
    return Spec(frag, name="hf-gpt2")


def xglm_spec(config) -> Spec:
    """XGLM: additive sinusoidal PE (a computed buffer, so the residual stream is pinned), GELU MLP, tied head."""
    d, h = config.d_model, config.attention_heads
    stream = Units.fixed(d)
    head = "lm_head.weight"
    frag = _stream_fragment(stream, "model.embed_tokens.weight", config.vocab_size, d, head)
    frag = frag + Fragment.of(notes=["XGLM adds a fixed sinusoidal table to the stream: the residual stream cannot be permuted"])
    shape = AttentionShape(d, h, h, d // h)
    act = _activation(config.activation_function)
    for i in range(config.num_layers):
        b = f"model.layers.{i}"
        frag = frag + catalogue.attention(
            f"{b}.self_attn", shape, "sinusoidal", stream, names=("q_proj", "k_proj", "v_proj", "out_proj"), bias=(True,) * 4
        )
        frag = frag + catalogue.layernorm(f"{b}.self_attn_layer_norm", stream) + catalogue.layernorm(f"{b}.final_layer_norm", stream)
        frag = frag + catalogue.mlp([f"{b}.fc1", f"{b}.fc2"], [d, config.ffn_dim, d], act, input_units=stream, output_units=stream)
    frag = frag + catalogue.layernorm("model.layer_norm", stream)
    return Spec(frag, name="hf-xglm")


def _llama_like_attention(config, b: str, stream: Units, qkv_bias: bool, o_bias: bool) -> Fragment:
    d, h = config.hidden_size, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or h
    dh = getattr(config, "head_dim", None) or d // h
    shape = AttentionShape(d, h, kv, dh)
    return catalogue.attention(f"{b}.self_attn", shape, "rope", stream, bias=(qkv_bias, qkv_bias, qkv_bias, o_bias), rope_layout="half")


def _decoder_frame(config, stream: Units) -> Fragment:
    head = "lm_head.weight"
    frag = _stream_fragment(stream, "model.embed_tokens.weight", config.vocab_size, config.hidden_size, head)
    frag = frag + _rmsnorm("model.norm.weight", stream)
    if _tied(config):
        frag = frag + Fragment.of(notes=["tied embeddings: lm_head.weight is model.embed_tokens.weight (one tensor, both keys)"])
    return frag


def _dense_swiglu(b: str, d: int, inner: int, stream: Units) -> Fragment:
    return catalogue.shared_expert(f"{b}.mlp", d, inner, stream, gate=None)


def llama_spec(config) -> Spec:
    """Llama: RoPE (``rotate_half`` pairs), GQA, SwiGLU, RMSNorm, tied or untied head."""
    d = config.hidden_size
    stream = catalogue.stream("stream", d, signed=True)  # RMSNorm stream: signed permutations
    frag = _decoder_frame(config, stream)
    bias = bool(getattr(config, "attention_bias", False))
    if getattr(config, "mlp_bias", False):
        raise UnsupportedArchitecture("Llama with mlp_bias=True is not in the catalogue yet")
    for i in range(config.num_hidden_layers):
        b = f"model.layers.{i}"
        frag = frag + _rmsnorm(f"{b}.input_layernorm.weight", stream) + _rmsnorm(f"{b}.post_attention_layernorm.weight", stream)
        frag = frag + _llama_like_attention(config, b, stream, bias, bias)
        frag = frag + _dense_swiglu(b, d, config.intermediate_size, stream)
    return Spec(frag, name="hf-llama")


def _routed_experts(b: str, config, n_experts: int, d_expert: int, stream: Units) -> Fragment:
    d = config.hidden_size
    experts, units, scale = catalogue.expert_factors(f"{b}.mlp", n_experts, d_expert, "swiglu")
    gating = "top1" if config.num_experts_per_tok == 1 else "topk"
    frag = catalogue.router(f"{b}.mlp.gate", n_experts, d, gating, stream, experts.name)
    frag = frag + catalogue.stacked_swiglu_experts(
        f"{b}.mlp.experts", n_experts, d, d_expert, stream, experts, units, scale, fused_gate_up="gate_up_proj", names=("", "", "down_proj")
    )
    return frag


def mixtral_spec(config) -> Spec:
    """Mixtral: Llama attention; top-k softmax router (renormalised over the k) over fused SwiGLU experts."""
    d = config.hidden_size
    stream = catalogue.stream("stream", d, signed=True)  # RMSNorm stream: signed permutations
    frag = _decoder_frame(config, stream)
    for i in range(config.num_hidden_layers):
        b = f"model.layers.{i}"
        frag = frag + _rmsnorm(f"{b}.input_layernorm.weight", stream) + _rmsnorm(f"{b}.post_attention_layernorm.weight", stream)
        frag = frag + _llama_like_attention(config, b, stream, False, False)
        frag = frag + _routed_experts(b, config, config.num_local_experts, config.intermediate_size, stream)
    return Spec(frag, name="hf-mixtral")


def qwen2_moe_spec(config) -> Spec:
    """Qwen2-MoE: q/k/v biases, top-k softmax routed experts plus a shared SwiGLU expert behind a sigmoid gate."""
    d = config.hidden_size
    stream = catalogue.stream("stream", d, signed=True)  # RMSNorm stream: signed permutations
    frag = _decoder_frame(config, stream)
    qkv_bias = bool(getattr(config, "qkv_bias", True))
    for i in range(config.num_hidden_layers):
        b = f"model.layers.{i}"
        frag = frag + _rmsnorm(f"{b}.input_layernorm.weight", stream) + _rmsnorm(f"{b}.post_attention_layernorm.weight", stream)
        frag = frag + _llama_like_attention(config, b, stream, qkv_bias, False)
        sparse = i not in (config.mlp_only_layers or []) and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0
        if not sparse:
            frag = frag + _dense_swiglu(b, d, config.intermediate_size, stream)
            continue
        frag = frag + _routed_experts(b, config, config.num_experts, config.moe_intermediate_size, stream)
        frag = frag + catalogue.shared_expert(
            f"{b}.mlp.shared_expert", d, config.shared_expert_intermediate_size, stream, gate=f"{b}.mlp.shared_expert_gate.weight"
        )
    return Spec(frag, name="hf-qwen2-moe")


#: model_type -> spec builder (the supported families, as data)
FAMILIES: dict[str, Callable[[object], Spec]] = {
    "gpt2": gpt2_spec,
    "xglm": xglm_spec,
    "llama": llama_spec,
    "mixtral": mixtral_spec,
    "qwen2_moe": qwen2_moe_spec,
}


def load_config(folder: str | os.PathLike):
    """The config of a ``save_pretrained`` folder (offline)."""
    from transformers import AutoConfig

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UnsupportedArchitecture(f"{path}: not a Hugging Face model folder (no config.json)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def spec_from_hf(model_or_config) -> Spec:
    """The Spec of a transformers model, config, or ``save_pretrained`` folder (in-memory layout)."""
    config = model_or_config
    if isinstance(model_or_config, (str, os.PathLike)):
        config = load_config(model_or_config)
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    builder = FAMILIES.get(model_type)
    if builder is None:
        raise UnsupportedArchitecture(
            f"no symmetry adapter for Hugging Face model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    spec = builder(config)
    if hasattr(model_or_config, "state_dict"):
        spec.check_params(model_or_config.state_dict(), what=f"{type(model_or_config).__name__} weights")
    return spec


def load_hf(folder: str | os.PathLike, dtype=None):
    """Load a causal LM from a ``save_pretrained`` folder (offline, CPU), in eval mode."""
    from transformers import AutoModelForCausalLM

    config = load_config(folder)
    if config.model_type not in FAMILIES:
        spec_from_hf(config)  # raises the clear error
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    return model.eval()


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()
