"""Spec builders: GPT-2, XGLM and the RoPE decoder template read a :class:`~.family.Family` record."""

from __future__ import annotations

import dataclasses

from ... import catalogue
from ...catalogue.attention import AttentionFactors, AttentionShape, _notes as _attention_notes
from ...catalogue.units import Units
from ...factors import GeneralLinear, HeadPermutation, RotationScaling
from ...spec import Fragment, On, Segment, param
from .family import Family, _rmsnorm, _stream_fragment, _tied
from .gauge import piece_dims
from .options import _activation


def _gpt2(config, fam: Family) -> Fragment:
    """GPT-2: learned PE (``wpe``), fused Conv1D QKV, LayerNorm with bias, GELU MLP in Conv1D layout, tied head."""
    d, n_layers, h = config.n_embd, config.n_layer, config.n_head
    inner = config.n_inner or 4 * d
    act = _activation(config.activation_function)
    stream = catalogue.stream("stream", d)
    frag = _stream_fragment(stream, "transformer.wte.weight", config.vocab_size, d, "lm_head.weight")
    frag = frag + Fragment.of(params={"transformer.wpe.weight": param((config.n_positions, d), None, stream.out())})
    shape = AttentionShape(d, h, h, d // h)
    for i in range(n_layers):
        b = fam.layer.format(i=i)
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
    return frag + catalogue.layernorm("transformer.ln_f", stream)


def _xglm(config, fam: Family) -> Fragment:
    """XGLM: additive sinusoidal PE (a computed buffer, so the residual stream is pinned), GELU MLP, tied head."""
    d, h = config.d_model, config.attention_heads
    stream = Units.fixed(d)
    frag = _stream_fragment(stream, "model.embed_tokens.weight", config.vocab_size, d, "lm_head.weight")
    frag = frag + Fragment.of(notes=["XGLM adds a fixed sinusoidal table to the stream: the residual stream cannot be permuted"])
    shape = AttentionShape(d, h, h, d // h)
    act = _activation(config.activation_function)
    for i in range(config.num_layers):
        b = fam.layer.format(i=i)
        frag = frag + catalogue.attention(
            f"{b}.self_attn", shape, "sinusoidal", stream, names=("q_proj", "k_proj", "v_proj", "out_proj"), bias=(True,) * 4
        )
        frag = frag + catalogue.layernorm(f"{b}.self_attn_layer_norm", stream) + catalogue.layernorm(f"{b}.final_layer_norm", stream)
        frag = frag + catalogue.mlp([f"{b}.fc1", f"{b}.fc2"], [d, config.ffn_dim, d], act, input_units=stream, output_units=stream)
    return frag + catalogue.layernorm("model.layer_norm", stream)


def neox_rotary_dims(config) -> int:
    """GPT-NeoX's rotary dims per head: ``int(head_dim * partial_rotary_factor)`` (the modeling code's rounding)."""
    head_dim = config.hidden_size // config.num_attention_heads
    factor = (getattr(config, "rope_parameters", None) or {}).get("partial_rotary_factor", 1.0)
    return int(head_dim * factor)


def _neox_attention(prefix: str, config, stream: Units) -> Fragment:
    """GPT-NeoX attention, gauged (:mod:`.gauge`): ``query_key_value`` held as contiguous q_rot / q_pass / k_rot /
    k_pass / v blocks. Heads permute (one unit per head, ``block`` = the block's dims per head); per head, one
    rotation-scaling per rotary pair (``rotate_half`` layout within the rotary dims) and GL on the pass-through dims
    on Q/K, GL(d_h) on V / dense."""
    d, n_heads = config.hidden_size, config.num_attention_heads
    dh, rot = d // n_heads, neox_rotary_dims(config)
    heads = HeadPermutation(f"{prefix}.heads", n_heads, groups=n_heads, head_dim=1)  # sizes per block: On(block=...)
    qk_rot = RotationScaling(f"{prefix}.qk_rot", n_heads, parent=heads.name, dim=rot, layout="half") if rot else None
    qk_pass = GeneralLinear(f"{prefix}.qk_pass", n_heads, parent=heads.name, dim=dh - rot) if dh > rot else None
    vo = GeneralLinear(f"{prefix}.vo", n_heads, parent=heads.name, dim=dh)
    child = {"q_rot": (qk_rot, "out"), "k_rot": (qk_rot, "in"), "q_pass": (qk_pass, "out"), "k_pass": (qk_pass, "in"), "v": (vo, "out")}
    bias = bool(getattr(config, "attention_bias", True))
    params = {}
    for piece, dim in piece_dims(dh, rot).items():
        factor, side = child[piece]
        acts = [On(heads.name, "out", block=dim), On(factor.name, side)]
        params[f"{prefix}.query_key_value.{piece}.weight"] = param((n_heads * dim, d), acts, stream.inn())
        if bias:
            params[f"{prefix}.query_key_value.{piece}.bias"] = param((n_heads * dim,), acts)
    params[f"{prefix}.dense.weight"] = param((d, d), stream.out(), [On(heads.name, "in", block=dh), On(vo.name, "in")])
    if bias:
        params[f"{prefix}.dense.bias"] = param((d,), stream.out())
    factors = [f for f in (heads, qk_rot, qk_pass, vo) if f is not None]
    note = (
        f"{prefix}: partial rotary ({rot} of {dh} head dims): Q/K keep one rotation-scaling per rotary pair and GL on "
        f"the {dh - rot} pass-through dims per head; V/dense GL(d_h); query_key_value is held as contiguous q/k/v blocks "
        "(the adapter's gauge; saved folders use the fused layout)"
    )
    return Fragment.of(factors, params, notes=[note])


def _gpt_neox(config, fam: Family) -> Fragment:
    """GPT-NeoX / Pythia: LayerNorm (with bias) stream, partial rotary, parallel or sequential residual (the same group:
    both branches read normed copies of one stream and add to it), GELU MLP with biases, untied ``lm_head`` by default."""
    d = config.hidden_size
    stream = catalogue.stream("stream", d)  # LayerNorm: permutations, no signs
    embed, head = fam.tied
    frag = _stream_fragment(stream, embed, config.vocab_size, d, head)
    frag = frag + catalogue.layernorm("gpt_neox.final_layer_norm", stream)
    act = _activation(config.hidden_act)
    for i in range(config.num_hidden_layers):
        b = fam.layer.format(i=i)
        frag = frag + catalogue.layernorm(f"{b}.input_layernorm", stream) + catalogue.layernorm(f"{b}.post_attention_layernorm", stream)
        frag = frag + _neox_attention(f"{b}.attention", config, stream)
        frag = frag + catalogue.mlp(
            [f"{b}.mlp.dense_h_to_4h", f"{b}.mlp.dense_4h_to_h"], [d, config.intermediate_size, d], act, input_units=stream, output_units=stream
        )
    return frag


# --------------------------------------------------------------------------------------------------- RoPE decoders


def _shape(config, fam: Family) -> AttentionShape:
    d, h = fam.size(config, "d"), fam.size(config, "heads")
    kv = fam.size(config, "kv_heads", h)
    dh = fam.size(config, "head_dim", d // h)
    return AttentionShape(d, h, kv, dh)


def _attention(config, fam: Family, b: str, stream: Units) -> Fragment:
    shape = _shape(config, fam)
    prefix = f"{b}.self_attn"
    qkv_bias, o_bias = fam.flag(config, fam.qkv_bias), fam.flag(config, fam.o_bias)
    if fam.qk_norm == "head" and fam.norm == "rmsnorm-1p":
        return _head_qk_norm_fixed_gains(prefix, shape, stream, qkv_bias, o_bias, float(config.rms_norm_eps))
    if fam.qk_norm == "head":
        return catalogue.attention(
            prefix, shape, "rope", stream, bias=(qkv_bias,) * 3 + (o_bias,), rope_layout="half", qk_norm=True, qk_norm_eps=float(config.rms_norm_eps)
        )
    if fam.qk_norm == "full":
        return _full_qk_norm_attention(prefix, shape, stream, qkv_bias, o_bias)
    if fam.attention == "fused-qkv":
        return _fused_qkv_attention(prefix, shape, stream)
    return catalogue.attention(prefix, shape, "rope", stream, bias=(qkv_bias,) * 3 + (o_bias,), rope_layout="half")


def _fused_qkv_attention(prefix: str, shape: AttentionShape, stream: Units) -> Fragment:
    """Phi-3: one ``qkv_proj`` (H d_h + 2 KV d_h, d), rows [Q | K | V]; the group is Llama's (the split is fixed)."""
    f = catalogue.attention_factors(prefix, shape, "rope", "half")
    r, d = shape.group_size, shape.d_model
    hq, hkv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    segs = [Segment(hq, tuple(f.q(r))), Segment(hkv, tuple(f.k())), Segment(hkv, tuple(f.v()))]
    params = {
        f"{prefix}.qkv_proj.weight": param((hq + 2 * hkv, d), segs, stream.inn()),
        f"{prefix}.o_proj.weight": param((d, hq), stream.out(), f.o(r)),
    }
    return Fragment.of(f.all, params, notes=_attention_notes(prefix, "rope"))


def _qkvo_params(prefix: str, f: AttentionFactors, shape: AttentionShape, stream: Units, qkv_bias: bool, o_bias: bool) -> dict:
    """Separate q/k/v/o projections (and optional biases) acted on by the attention factors ``f`` and the stream."""
    r, d = shape.group_size, shape.d_model
    hq, hkv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    params = {}
    for name, n_out, acts in (("q_proj", hq, f.q(r)), ("k_proj", hkv, f.k()), ("v_proj", hkv, f.v())):
        params[f"{prefix}.{name}.weight"] = param((n_out, d), acts, stream.inn())
        if qkv_bias:
            params[f"{prefix}.{name}.bias"] = param((n_out,), acts)
    params[f"{prefix}.o_proj.weight"] = param((d, hq), stream.out(), f.o(r))
    if o_bias:
        params[f"{prefix}.o_proj.bias"] = param((d,), stream.out())
    return params


def _head_qk_norm_fixed_gains(prefix: str, shape: AttentionShape, stream: Units, qkv_bias: bool, o_bias: bool, eps: float) -> Fragment:
    """Gemma3: per-head QK-norm as Qwen3, but with (1 + w) gains: the q/k gain balance (q gain x a, k gain / a) is not
    linear in w, so it is dropped; heads permute, each Q/K head's scale is absorbed by its norm, V/O keep GL(d_h)."""
    f = dataclasses.replace(catalogue.attention_factors(prefix, shape, "rope", "half", qk_norm=True, qk_norm_eps=eps), gain=None)
    params = _qkvo_params(prefix, f, shape, stream, qkv_bias, o_bias)
    params[f"{prefix}.q_norm.weight"] = param((shape.head_dim,), None)
    params[f"{prefix}.k_norm.weight"] = param((shape.head_dim,), None)
    note = (
        f"{prefix}: per-head QK-norm with (1 + w) gains (Gemma3) removes GL(d_h) and the RoPE rotation-scalings on Q/K; "
        "each Q and K head's scale is absorbed by its norm (one-sided norm scales, exact at eps = 0); the q/k gain "
        "balance of a plain-gain norm is not linear in w and is dropped; V/O keep GL(d_h) per KV group"
    )
    return Fragment.of(f.all, params, notes=[note])


def _full_qk_norm_attention(prefix: str, shape: AttentionShape, stream: Units, qkv_bias: bool, o_bias: bool) -> Fragment:
    """OLMo2: q_norm / k_norm are RMSNorms over the whole projection (all heads, gains (H d_h,) / (KV d_h,)), then RoPE.

    A map T of q must satisfy g * n(T q) = T'(g * n(q)) for generic per-row gains g: T is a signed permutation (times
    a common scalar, absorbed by the norm up to eps; not catalogued), and it must commute with RoPE, which has a
    distinct frequency per pair: heads permute (gains move with their rows); per pair only {+-I, +-J} (J: rotation by
    90 degrees, gains of the pair swapped) survive, shared by a KV group's query heads (discrete, not catalogued).
    GL(d_h) and the rotation-scalings on Q/K are gone; V/O keep GL(d_h) per KV group.
    """
    heads = HeadPermutation(f"{prefix}.heads", shape.n_heads, groups=shape.n_kv_heads, head_dim=shape.head_dim)
    vo = GeneralLinear(f"{prefix}.vo", shape.n_kv_heads, parent=heads.name, dim=shape.head_dim)
    f = AttentionFactors(heads, None, vo)
    params = _qkvo_params(prefix, f, shape, stream, qkv_bias, o_bias)
    r, hq, hkv = shape.group_size, shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    params[f"{prefix}.q_norm.weight"] = param((hq,), f.q(r))
    params[f"{prefix}.k_norm.weight"] = param((hkv,), f.k())
    note = (
        f"{prefix}: QK-norm over all heads (OLMo2, OLMoE) with per-row gains: Q/K keep only the head permutation (gains "
        "move with their heads); GL(d_h) and RoPE rotation-scalings on Q/K are gone (discrete per-pair {+-I, +-J} and a common "
        "eps-approximate scale are not catalogued); V/O keep GL(d_h) per KV group"
    )
    return Fragment.of(f.all, params, notes=[note])


def _dense_mlp(config, fam: Family, b: str, stream: Units) -> Fragment:
    d, inner = fam.size(config, "d"), fam.size(config, "ffn")
    if fam.mlp == "fused-gate-up":
        units = catalogue.neurons(f"{b}.mlp.units", inner, "swiglu")
        return Fragment.of(
            units.factors,
            {
                f"{b}.mlp.gate_up_proj.weight": param((2 * inner, d), [Segment(inner, tuple(units.out(with_child=False))), Segment(inner, tuple(units.out()))], stream.inn()),
                f"{b}.mlp.down_proj.weight": param((d, inner), stream.out(), units.inn()),
            },
        )
    if not fam.flag(config, fam.mlp_bias):
        return catalogue.shared_expert(f"{b}.mlp", d, inner, stream, gate=None)
    frag, units = catalogue.swiglu(f"{b}.mlp", inner, d, stream.inn(), units_name=f"{b}.mlp.units", bias=True, names=("gate_proj", "up_proj"))
    return frag + catalogue.linear(f"{b}.mlp.down_proj", d, inner, stream.out(), units.inn(), bias=True)


def _routed_experts(config, fam: Family, b: str, stream: Units) -> Fragment:
    d, n_experts = fam.size(config, "d"), fam.size(config, "experts")
    d_expert = fam.size(config, "expert_ffn")
    experts, units, children = catalogue.expert_factors(f"{b}.mlp", n_experts, d_expert, "swiglu")
    gating = "top1" if config.num_experts_per_tok == 1 else "topk"
    frag = catalogue.router(f"{b}.mlp.gate", n_experts, d, gating, stream, experts.name)
    return frag + catalogue.stacked_swiglu_experts(
        f"{b}.mlp.experts", n_experts, d, d_expert, stream, experts, units, children, fused_gate_up="gate_up_proj", names=("", "", "down_proj")
    )


def _sigmoid_routed_experts(config, fam: Family, b: str, stream: Units) -> Fragment:
    """DeepSeek-V3-style routing (Dots1): sigmoid scores, ``e_score_correction_bias`` added for the top-k choice,
    group-limited top-k (``n_group`` / ``topk_group``), optional renormalisation and a constant ``routed_scaling_factor``.

    The bias moves with the experts; no translation (sigmoid is not shift-invariant); with ``topk_group < n_group``
    experts permute only within groups (and groups permute), since a group is chosen by the sum of its top-2 scores.
    """
    d, n_experts = fam.size(config, "d"), fam.size(config, "experts")
    groups = config.n_group if config.n_group > 1 and config.topk_group < config.n_group else 1
    experts, units, children = catalogue.expert_factors(f"{b}.mlp", n_experts, fam.size(config, "expert_ffn"), "swiglu", groups=groups)
    frag = catalogue.router(f"{b}.mlp.gate", n_experts, d, "sigmoid", stream, experts.name, score_bias="e_score_correction_bias")
    frag = frag + catalogue.stacked_swiglu_experts(
        f"{b}.mlp.experts", n_experts, d, fam.size(config, "expert_ffn"), stream, experts, units, children, fused_gate_up="gate_up_proj",
        names=("", "", "down_proj"),
    )
    shared = fam.size(config, "expert_ffn") * config.n_shared_experts
    note = (
        f"{b}.mlp: sigmoid router; e_score_correction_bias moves with the experts; "
        + (f"group-limited top-k ({config.topk_group} of {config.n_group} groups): experts permute within groups, groups permute; " if groups > 1 else "")
        + "shared experts are not routed: they stay put and keep their own SwiGLU group"
    )
    frag = frag + Fragment.of(notes=[note])
    return frag + catalogue.shared_expert(f"{b}.mlp.shared_experts", d, shared, stream, gate=None)


def _sparse_layer(config, i: int) -> bool:
    """Qwen2-MoE / Qwen3-MoE: layer ``i`` is routed unless listed in ``mlp_only_layers`` or off the sparse step."""
    return i not in (config.mlp_only_layers or []) and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0


def _mlp(config, fam: Family, i: int, b: str, stream: Units) -> Fragment:
    if fam.mlp == "moe":
        return _routed_experts(config, fam, b, stream)
    if fam.mlp == "sigmoid-moe":  # DeepSeek-V3-style MoE (Dots1): the first first_k_dense_replace layers are dense
        return _dense_mlp(config, fam, b, stream) if i < config.first_k_dense_replace else _sigmoid_routed_experts(config, fam, b, stream)
    if fam.mlp in ("qwen2-moe", "qwen3-moe"):
        if not _sparse_layer(config, i):
            return _dense_mlp(config, fam, b, stream)
        frag = _routed_experts(config, fam, b, stream)
        if fam.mlp == "qwen3-moe":  # no shared expert
            return frag
        d = fam.size(config, "d")
        return frag + catalogue.shared_expert(
            f"{b}.mlp.shared_expert", d, config.shared_expert_intermediate_size, stream, gate=f"{b}.mlp.shared_expert_gate.weight"
        )
    return _dense_mlp(config, fam, b, stream)


def decoder(config, fam: Family) -> Fragment:
    """The RoPE / RMSNorm decoder template: embed -> layers (norms, attention, MLP or MoE) -> norm -> head."""
    d = fam.size(config, "d")
    stream = catalogue.stream("stream", d, signed=True)  # RMSNorm stream: signed permutations
    embed, head = fam.tied
    frag = _stream_fragment(stream, embed, fam.size(config, "vocab"), d, head)
    frag = frag + _rmsnorm("model.norm.weight", stream)
    if _tied(config):
        frag = frag + Fragment.of(notes=[f"tied embeddings: {head} is {embed} (one tensor, both keys)"])
    norms = {
        "pre": ("input_layernorm", "post_attention_layernorm"),
        "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
        "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
    }[fam.norms]
    for i in range(fam.size(config, "layers")):
        b = fam.layer.format(i=i)
        for norm in norms:
            frag = frag + _rmsnorm(f"{b}.{norm}.weight", stream)
        frag = frag + _attention(config, fam, b, stream)
        frag = frag + _mlp(config, fam, i, b, stream)
    return frag
