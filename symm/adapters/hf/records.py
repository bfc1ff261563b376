"""The supported families as data (:data:`RECORDS`), the refused ones with their reasons (:data:`REFUSED`), and
``model_type`` -> spec builder (:data:`FAMILIES`)."""

from __future__ import annotations

from collections.abc import Callable

from ... import catalogue
from ...spec import Fragment, Spec
from .options import Check, expert_groups, gated_activation, handled, neox_head_dim, partial_rope_check, mask_only, must_be_false, no_clip_qkv, olmoe_head_dim, plain_activation, rope_check, softcap, softmax_router
from .family import Family
from .builders import _gpt2, _gpt_neox, _xglm, decoder


_ROPE_SIZES = {
    "d": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim", "ffn": "intermediate_size", "vocab": "vocab_size",
}
_ROPE_OPTIONS: dict[str, Check] = {
    "rope_parameters": rope_check,
    "hidden_act": gated_activation,
    "tie_word_embeddings": handled,
}
_ROPE_INERT = frozenset({"max_position_embeddings"})
_SLIDING = {"sliding_window": mask_only, "use_sliding_window": mask_only, "max_window_layers": mask_only, "layer_types": mask_only}
_LLAMA_GROUP = (
    "signed permutations of the RMSNorm stream; per layer: head permutations (within KV groups), one RoPE "
    "rotation-scaling per frequency pair and KV group on Q/K, GL(d_h) per KV group on V/O, SwiGLU units permuted, "
    "positively scaled and sign-flipped"
)

FAMILY_RECORDS: tuple[Family, ...] = (
    Family(
        "gpt2", _gpt2, pe="learned", norm="layernorm", layer="transformer.h.{i}", tied=("transformer.wte.weight", "lm_head.weight"),
        group="permutations of the LayerNorm stream (learned PE wpe moves with it); heads permute; GL(d_h) on Q/K and V/O "
        "per head (no RoPE); GELU units permute",
        sizes={"d": "n_embd", "layers": "n_layer", "heads": "n_head", "ffn": "n_inner", "vocab": "vocab_size", "positions": "n_positions"},
        options={
            "activation_function": plain_activation,
            "add_cross_attention": must_be_false("cross-attention layers are not in the spec"),
            "tie_word_embeddings": handled,
        },
        inert=frozenset(
            {"scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "summary_type", "summary_use_proj",
             "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "summary_last_dropout"}
        ),
    ),
    Family(
        "gpt_neox", _gpt_neox, norm="layernorm", layer="gpt_neox.layers.{i}", tied=("gpt_neox.embed_in.weight", "lm_head.weight"),
        group="permutations of the LayerNorm stream; heads permute; per head, one RoPE rotation-scaling per rotary pair "
        "and GL on the pass-through dims (partial rotary) on Q/K, GL(d_h) on V/dense; GELU units permute; the parallel "
        "residual leaves the group unchanged (both branches read normed copies of one stream and add to it)",
        sizes={"d": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads", "ffn": "intermediate_size", "vocab": "vocab_size"},
        options={
            "rope_parameters": partial_rope_check,
            "hidden_act": plain_activation,
            "use_parallel_residual": handled,
            "attention_bias": handled,
            "head_dim": neox_head_dim,
            "tie_word_embeddings": handled,
        },
        inert=frozenset({"max_position_embeddings"}),
    ),
    Family(
        "xglm", _xglm, pe="sinusoidal", norm="layernorm",
        group="stream pinned (a fixed sinusoidal table is added to it); heads permute; GL(d_h) on Q/K and V/O per head; "
        "GELU units permute",
        sizes={"d": "d_model", "layers": "num_layers", "heads": "attention_heads", "ffn": "ffn_dim", "vocab": "vocab_size"},
        options={
            "activation_function": plain_activation,
            "add_cross_attention": must_be_false("cross-attention layers are not in the spec"),
            "tie_word_embeddings": handled,
        },
        inert=frozenset({"max_position_embeddings", "scale_embedding"}),  # sqrt(d) embedding scale: a constant, stream pinned
    ),
    Family(
        "llama", decoder, group=_LLAMA_GROUP, sizes=_ROPE_SIZES, qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
        options={**_ROPE_OPTIONS, "attention_bias": handled, "mlp_bias": handled},
        inert=_ROPE_INERT,
    ),
    Family(
        "mistral", decoder, group=_LLAMA_GROUP + " (as Llama: the sliding window only masks attention)", sizes=_ROPE_SIZES,
        options={**_ROPE_OPTIONS, **_SLIDING}, inert=_ROPE_INERT,
    ),
    Family(
        "qwen2", decoder, group=_LLAMA_GROUP + " (as Llama; the q/k/v biases move with their rows)", sizes=_ROPE_SIZES,
        qkv_bias=True, options={**_ROPE_OPTIONS, **_SLIDING}, inert=_ROPE_INERT,
    ),
    Family(
        "qwen3", decoder, qk_norm="head", qkv_bias="attention_bias", o_bias="attention_bias", sizes=_ROPE_SIZES,
        group="as Llama on the stream, V/O and SwiGLU; per-head QK-norm (RMSNorm over head_dim, one gain for all heads) "
        "kills GL(d_h) and the RoPE rotation-scalings on Q/K: heads permute, each Q and K head's scale is absorbed by its "
        "norm (exact at eps = 0), and the q/k norm gains balance per RoPE pair",
        options={**_ROPE_OPTIONS, **_SLIDING, "attention_bias": handled}, inert=_ROPE_INERT,
    ),
    Family(
        "olmo2", decoder, qk_norm="full", norms="post", qkv_bias="attention_bias", o_bias="attention_bias", sizes=_ROPE_SIZES,
        group="signed permutations of the stream (blocks read it raw, their outputs pass RMSNorms whose gains move with "
        "the stream); QK-norm over all heads with per-row gains leaves Q/K only the head permutation; V/O GL(d_h) per KV "
        "group; SwiGLU units permuted, scaled and sign-flipped",
        options={**_ROPE_OPTIONS, "attention_bias": handled}, inert=_ROPE_INERT,
    ),
    Family(
        "phi3", decoder, attention="fused-qkv", mlp="fused-gate-up", sizes=_ROPE_SIZES,
        group=_LLAMA_GROUP + " (as Llama; the fused qkv_proj rows [Q | K | V] and gate_up_proj rows [gate | up] are "
        "segments of one axis)",
        options={**_ROPE_OPTIONS, "sliding_window": mask_only, "partial_rotary_factor": lambda c, v: rope_check(c, {"partial_rotary_factor": v})},
        inert=_ROPE_INERT | {"original_max_position_embeddings"},
    ),
    Family(
        "gemma", decoder, norm="rmsnorm-1p", sizes=_ROPE_SIZES, qkv_bias="attention_bias", o_bias="attention_bias",
        group=_LLAMA_GROUP + " (as Llama: (1 + w) norm gains only permute, the sqrt(d) embedding scale is a constant, "
        "GeGLU is a gated MLP like SwiGLU)",
        options={**_ROPE_OPTIONS, "attention_bias": handled, "use_bidirectional_attention": mask_only}, inert=_ROPE_INERT,
    ),
    Family(
        "gemma2", decoder, norm="rmsnorm-1p", norms="sandwich", sizes=_ROPE_SIZES, qkv_bias="attention_bias", o_bias="attention_bias",
        group=_LLAMA_GROUP + " (as Llama: pre- and post-norms with (1 + w) gains move with the stream; soft-capping reads "
        "scores and logits, which the group leaves unchanged)",
        options={
            **_ROPE_OPTIONS, **_SLIDING, "hidden_activation": gated_activation, "attention_bias": handled, "use_bidirectional_attention": mask_only,
            "attn_logit_softcapping": softcap, "final_logit_softcapping": softcap,
        },
        inert=_ROPE_INERT | {"query_pre_attn_scalar"},  # a constant scale of the scores
    ),
    Family(
        "gemma3_text", decoder, norm="rmsnorm-1p", norms="sandwich", qk_norm="head", sizes=_ROPE_SIZES,
        qkv_bias="attention_bias", o_bias="attention_bias",
        group="as Gemma2 on the stream, V/O and GeGLU; per-head QK-norm kills GL(d_h) and the RoPE rotation-scalings on Q/K: "
        "heads permute and each Q/K head's scale is absorbed by its norm; with (1 + w) gains no gain balance survives",
        options={
            **_ROPE_OPTIONS, **_SLIDING, "_sliding_window_pattern": mask_only, "hidden_activation": gated_activation,
            "attention_bias": handled, "use_bidirectional_attention": mask_only, "attn_logit_softcapping": softcap,
            "final_logit_softcapping": softcap,
        },
        inert=_ROPE_INERT | {"query_pre_attn_scalar"},
    ),
    Family(
        "mixtral", decoder, mlp="moe", sizes={**_ROPE_SIZES, "experts": "num_local_experts", "expert_ffn": "intermediate_size"},
        group="as Llama on the stream and attention; experts permute (router rows with them), each expert's SwiGLU units "
        "permute, scale and flip sign; top-k softmax routing adds a common router translation",
        options={**_ROPE_OPTIONS, "sliding_window": mask_only, "num_experts_per_tok": softmax_router},
        inert=_ROPE_INERT | {"router_jitter_noise"},  # training-time input noise
    ),
    Family(
        "qwen2_moe", decoder, mlp="qwen2-moe", qkv_bias="qkv_bias",
        sizes={**_ROPE_SIZES, "experts": "num_experts", "expert_ffn": "moe_intermediate_size", "shared_ffn": "shared_expert_intermediate_size"},
        group="as Mixtral, plus a shared SwiGLU expert behind a sigmoid gate (not routed: it stays put, keeps its own "
        "SwiGLU group); q/k/v biases move with their rows",
        options={
            **_ROPE_OPTIONS, **_SLIDING, "qkv_bias": handled, "num_experts_per_tok": softmax_router, "norm_topk_prob": softmax_router,
            "decoder_sparse_step": handled, "mlp_only_layers": handled,
        },
        inert=_ROPE_INERT | {"router_jitter_noise"},
    ),
    Family(
        "dots1", decoder, qk_norm="head", mlp="sigmoid-moe", qkv_bias="attention_bias", o_bias="attention_bias",
        sizes={**_ROPE_SIZES, "experts": "n_routed_experts", "expert_ffn": "moe_intermediate_size"},
        group="as Qwen3 on the stream and attention (per-head QK-norm: heads permute, per-head norm scales, q/k gain "
        "balance per RoPE pair; V/O GL(d_h)); DeepSeek-V3-style routed layers: experts permute with their router rows "
        "and their e_score_correction_bias entries (within groups, and whole groups, when top-k is group-limited), each "
        "expert's SwiGLU units permute, scale and flip sign; sigmoid gates allow no router translation; shared experts stay put "
        "with their own SwiGLU group; the first first_k_dense_replace layers are dense",
        options={
            **_ROPE_OPTIONS, **_SLIDING, "attention_bias": handled, "n_group": expert_groups, "topk_group": handled,
            "num_experts_per_tok": handled, "norm_topk_prob": handled, "routed_scaling_factor": handled,
            "first_k_dense_replace": handled, "n_shared_experts": handled,
        },
        inert=_ROPE_INERT,
    ),
    Family(
        "olmoe", decoder, qk_norm="full", mlp="moe", qkv_bias="attention_bias", o_bias="attention_bias",
        sizes={**_ROPE_SIZES, "experts": "num_experts", "expert_ffn": "intermediate_size"},
        group="as OLMo2 on Q/K (QK-norm over all heads with per-row gains: heads permute, nothing continuous on Q/K), "
        "pre-norm signed stream permutations, V/O GL(d_h) per KV group; as Mixtral on the experts: experts permute "
        "(router rows with them), each expert's SwiGLU units permute, scale and flip sign, top-k softmax routing adds a common "
        "router translation (with or without norm_topk_prob)",
        options={
            **_ROPE_OPTIONS, "attention_bias": handled, "num_experts_per_tok": softmax_router, "norm_topk_prob": softmax_router,
            "clip_qkv": no_clip_qkv, "sliding_window": mask_only, "head_dim": olmoe_head_dim,
        },
        inert=_ROPE_INERT,
    ),
    Family(
        "qwen3_moe", decoder, qk_norm="head", mlp="qwen3-moe", qkv_bias="attention_bias", o_bias="attention_bias",
        sizes={**_ROPE_SIZES, "experts": "num_local_experts", "expert_ffn": "moe_intermediate_size"},
        group="as Qwen3 on the stream and attention (per-head QK-norm: heads permute, per-head norm scales, q/k gain "
        "balance per RoPE pair; V/O GL(d_h)); routed layers as Mixtral (experts permute with their router rows, "
        "per-expert SwiGLU units permute, scale and flip sign, router translation, with or without norm_topk_prob); dense layers "
        "(mlp_only_layers, decoder_sparse_step) keep a SwiGLU group; no shared expert",
        options={
            **_ROPE_OPTIONS, **_SLIDING, "attention_bias": handled, "num_experts_per_tok": softmax_router,
            "norm_topk_prob": softmax_router, "decoder_sparse_step": handled, "mlp_only_layers": handled,
        },
        inert=_ROPE_INERT,
    ),
)

#: model_type -> family record (the supported families, as data)
RECORDS: dict[str, Family] = {f.model_type: f for f in FAMILY_RECORDS}


_MLA_REASON = (
    "multi-head latent attention (MLA) has no derived group: queries and keys/values pass through low-rank latents "
    "(q_a_proj -> q_a_layernorm -> q_b_proj; kv_a_proj_with_mqa -> kv_a_layernorm -> kv_b_proj, which emits each head's "
    "[k_nope | v] rows) and RoPE runs on decoupled key dims k_pe shared by all heads and concatenated to each head's "
    "no-RoPE dims, so the Q/K and V/O factors act on sub-blocks of a head and on RMSNormed latent axes the catalogue has "
    "no layout for"
)
_SIGMOID_ROUTER_REASON = (
    "; its sigmoid router (top-k over scores + e_score_correction_bias, group-limited by n_group / topk_group) is "
    "catalogued (family dots1: the bias moves with the experts, experts permute within groups, no translation), so MLA "
    "is the only blocker"
)
#: model_type -> why it is refused (clearer than "no adapter"); any other config with ``kv_lora_rank`` is MLA too
REFUSED: dict[str, str] = {
    "deepseek_v2": _MLA_REASON + "; its softmax router can be group-limited (topk_method='group_limited_greedy', n_group / "
    "topk_group), which restricts the expert permutations to ones that respect the expert groups",
    "deepseek_v3": _MLA_REASON + _SIGMOID_ROUTER_REASON,
    "deepseek_v32": _MLA_REASON + " (plus a sparse-attention indexer)" + _SIGMOID_ROUTER_REASON,
}


def refusal(config) -> str | None:
    """Why ``config``'s architecture is refused by design (MLA, ...), or ``None``."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        return REFUSED[model_type]
    if getattr(config, "kv_lora_rank", None):
        return _MLA_REASON
    return None


def _build(model_type: str) -> Callable[[object], Spec]:
    def build(config) -> Spec:
        return family_spec(RECORDS[model_type], config)

    build.__name__ = f"{model_type}_spec"
    build.__doc__ = RECORDS[model_type].group
    return build


def family_spec(fam: Family, config) -> Spec:
    """The Spec of ``config`` under family ``fam`` (options checked first); no meta-device check."""
    fam.check_options(config)
    frag = fam.build(config, fam)
    notes = [f"{fam.name}: {fam.group}"]
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window and "sliding_window" in fam.options:
        notes.append(f"{fam.name}: sliding window {window} only masks attention scores: the group is unchanged")
    frag = Fragment.of(notes=notes) + frag
    return Spec(frag, name=fam.name)


#: model_type -> spec builder (config -> Spec), one per record
FAMILIES: dict[str, Callable[[object], Spec]] = {t: _build(t) for t in RECORDS}
gpt2_spec = FAMILIES["gpt2"]
xglm_spec = FAMILIES["xglm"]
llama_spec = FAMILIES["llama"]
mixtral_spec = FAMILIES["mixtral"]
qwen2_moe_spec = FAMILIES["qwen2_moe"]
