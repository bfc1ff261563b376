"""Tiny Hugging Face models built offline from configs (shared by the HF tests)."""

from __future__ import annotations

import torch
import transformers

transformers.logging.set_verbosity_error()

VOCAB = 50


def configs() -> dict:
    from transformers import GPT2Config, LlamaConfig, MixtralConfig, Qwen2MoeConfig, XGLMConfig

    small = dict(vocab_size=VOCAB)
    llama = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, **small)
    return {
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0, **small),
        "xglm": XGLMConfig(d_model=32, num_layers=2, attention_heads=4, ffn_dim=64, max_position_embeddings=32, **small),
        "llama-gqa-tied": LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **llama),
        "llama-mqa-untied": LlamaConfig(num_key_value_heads=1, tie_word_embeddings=False, **llama),
        "mixtral": MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **llama),
        "qwen2-moe": Qwen2MoeConfig(
            num_key_value_heads=2,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            **llama,
        ),
    }


def from_config(config, seed: int = 0, build=None):
    """A model of ``config`` (built by ``build(config)``, default symm's :func:`~symm.adapters.hf.encoders.build_model`:
    the causal LM, gauged) with random (not default-initialised) weights N(0, 0.2^2), in eval mode, float32."""
    if build is None:
        from symm.adapters.hf.encoders import build_model as build
    torch.manual_seed(seed)
    model = build(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for name, buf in model.named_buffers():  # DeepSeek-V3-style routers' score bias (a persistent buffer, zero at init)
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
    return model


def build(name: str, seed: int = 0):
    """A model with random (not default-initialised) weights, in eval mode, float32."""
    return from_config(configs()[name], seed)


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits_fn(model, tokens: torch.Tensor):
    """f(params) = logits of the transformers model itself with ``params`` loaded."""

    def f(params):
        model.load_state_dict(params)
        with torch.no_grad():
            return model(tokens).logits

    return f


# ---- families added with the declarative adapters (tests/test_hf_families.py); appended, the above is unchanged


def family_configs() -> dict:
    """Tiny configs of the RoPE families beyond Llama: Mistral, Qwen2, Qwen3, OLMo2, Phi-3, Gemma 1-3, OLMoE, Qwen3-MoE
    (and Llama with biases)."""
    from transformers import (
        Dots1Config, Gemma2Config, Gemma3TextConfig, GemmaConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Olmo2Config, OlmoeConfig, Phi3Config, Qwen2Config,
        Qwen3Config, Qwen3MoeConfig,
    )

    small = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48)
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return {
        "mistral": MistralConfig(head_dim=8, sliding_window=5, **small, **ids),
        "qwen2": Qwen2Config(tie_word_embeddings=True, **small, **ids),
        "qwen3": Qwen3Config(head_dim=8, **small, **ids),
        "qwen3-bias": Qwen3Config(head_dim=8, attention_bias=True, tie_word_embeddings=True, **small, **ids),
        "olmo2": Olmo2Config(**small, **ids),
        "olmo2-bias": Olmo2Config(attention_bias=True, tie_word_embeddings=True, **small, **ids),
        "phi3": Phi3Config(**small, **ids),
        "llama-bias": LlamaConfig(attention_bias=True, mlp_bias=True, **small, **ids),
        "gemma": GemmaConfig(head_dim=8, **small, **ids),
        "gemma2": Gemma2Config(head_dim=8, sliding_window=5, query_pre_attn_scalar=8, **small, **ids),
        "gemma3": Gemma3TextConfig(
            head_dim=8, sliding_window=5, query_pre_attn_scalar=8, final_logit_softcapping=5.0, attn_logit_softcapping=10.0,
            layer_types=["sliding_attention", "full_attention"], rms_norm_eps=1e-7, **small, **ids,  # per-head QK-norm: eps as for "qwen3-moe"
        ),
        # routed experts with QK-norm (OLMoE: over all heads, like OLMo2; Qwen3-MoE: per head, like Qwen3)
        "olmoe": OlmoeConfig(num_experts=4, num_experts_per_tok=2, **{**small, "intermediate_size": 24}, **ids),
        "olmoe-norm-topk": OlmoeConfig(
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, attention_bias=True, tie_word_embeddings=True,
            **{**small, "intermediate_size": 24}, **ids,
        ),
        # per-head QK-norm scales are exact at eps = 0 and off by ~eps / ms(q_h): this tiny random model's q heads have
        # mean square ~0.05 (trained ones ~1), so eps = 1e-6 alone costs 1.4e-5 here (2.9e-7 at eps = 0); 1e-7 keeps
        # the 1e-5 check about the group, not about eps ("qwen3-moe-step" keeps the default eps)
        "qwen3-moe": Qwen3MoeConfig(
            head_dim=8, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1],
            rms_norm_eps=1e-7, **small, **ids,
        ),
        "qwen3-moe-step": Qwen3MoeConfig(
            head_dim=8, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=2, attention_bias=True,
            tie_word_embeddings=True, **small, **ids,
        ),
        # DeepSeek-V3-style routing (sigmoid, e_score_correction_bias, group-limited top-k, shared experts) in Dots1;
        # eps 1e-7 as for "qwen3-moe" (per-head QK-norm scales are exact at eps = 0)
        "dots1": Dots1Config(
            head_dim=8, moe_intermediate_size=24, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5, rms_norm_eps=1e-7, **small, **ids,
        ),
        "dots1-ungrouped": Dots1Config(
            head_dim=8, moe_intermediate_size=24, n_shared_experts=2, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
            attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-7, **small, **ids,
        ),
        # GPT-NeoX / Pythia: partial rotary, LayerNorm stream, parallel (default) or sequential residual
        "gpt-neox": GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, **ids,
        ),
        "gpt-neox-seq-tied": GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            use_parallel_residual=False, tie_word_embeddings=True, hidden_act="gelu_new",
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25}, **ids,
        ),
    }


def build_family(name: str, seed: int = 0):
    """As :func:`build`, for :func:`family_configs`."""
    return from_config(family_configs()[name], seed)
