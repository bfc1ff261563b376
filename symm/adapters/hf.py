"""Hugging Face adapters: ``spec_from_hf(model | config | folder)``, one declarative :class:`Family` per ``model_type``.

Supported: GPT-2, XGLM, Llama, Mistral, Qwen2, Qwen3, OLMo2, Phi-3, Gemma, Gemma2, Gemma3, Mixtral, Qwen2-MoE, OLMoE,
Qwen3-MoE. Refused with the reason (:data:`REFUSED`): multi-head latent attention (DeepSeek-V2/V3 and every config
with ``kv_lora_rank``), GPT-NeoX (group derived, layout not expressible yet). A family is data: its layer
name pattern, the config keys it reads as sizes, its norm / PE / attention / MLP layout, and a verdict on **every**
config option the transformers modeling code reads (``options``: handled, with a check that refuses the values whose
group is not derived; ``inert``: cannot change the group, e.g. dropout, token ids, epsilons). A config option the
family does not classify is refused with :class:`UnsupportedArchitecture` naming it, never silently ignored.

Specs describe the **in-memory** layout of a loaded ``transformers`` model (``model.state_dict()``), which in
transformers 5 differs from the on-disk one for MoE families (experts fused as ``gate_up_proj`` (E, 2I, d) and
``down_proj`` (E, d, I) in memory; per-expert ``w1/w2/w3`` keys on disk). A checkpoint folder is read with
``from_pretrained`` (:func:`load_hf`), which converts, and written back with ``save_pretrained``. Every spec built
from a config is checked against the model ``transformers`` builds from that config on the meta device (names and
shapes, no memory): a layout drift fails at spec build time, naming the parameters.
Built offline from configs; nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .. import catalogue
from ..catalogue.attention import AttentionFactors, AttentionShape, _notes as _attention_notes
from ..catalogue.units import Units
from ..errors import SpecError, UnsupportedArchitecture
from ..factors import GeneralLinear, HeadPermutation
from ..spec import Fragment, Segment, Spec, param

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------- config options

#: option verdict: ``check(config, value)`` returns ``None`` when the value is handled, else why it is refused
Check = Callable[[object, object], "str | None"]

#: keys every family may carry that cannot change the group (bookkeeping, token ids, dropout, caching, init)
COMMON_INERT = frozenset(
    {
        "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label", "label2id",
        "is_encoder_decoder", "model_type", "output_attentions", "output_hidden_states", "problem_type", "return_dict",
        "transformers_version", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
        "initializer_range", "init_std", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
        "activation_dropout", "hidden_dropout", "classifier_dropout", "layerdrop", "is_decoder", "tie_encoder_decoder",
        "_attn_implementation", "_attn_implementation_autoset", "output_router_logits", "router_aux_loss_coef",
        "pretraining_tp",  # splits matmuls, same function
        "num_labels",  # classification heads, not the causal LM
    }
)
#: norm epsilons: a signed permutation commutes with RMSNorm/LayerNorm for every eps (QK-norm scales read eps below)
EPSILONS = frozenset({"rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps"})
#: RoPE variants that only change the frequencies (and a common cos/sin factor): a per-pair rotation-scaling commutes
#: with every position's rotation whatever the frequencies, so the group is Llama's
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def handled(config, value) -> str | None:
    """Any value is handled by the family's builder (e.g. biases, which move with their rows)."""
    return None


def mask_only(config, value) -> str | None:
    """Sliding windows and per-layer attention types only change the attention mask: the group is unchanged."""
    return None


def must_be_false(why: str) -> Check:
    def check(config, value) -> str | None:
        return why if value else None

    return check


def rope_check(config, value) -> str | None:
    params = value or {}
    if not isinstance(params, Mapping):
        return f"unreadable RoPE parameters {params!r}"
    if params and all(isinstance(v, Mapping) for v in params.values()):
        # one RoPE per layer type (Gemma3: local / global bases): each must be a frequency-only variant
        for layer_type, sub in params.items():
            why = rope_check(config, sub)
            if why:
                return f"{layer_type}: {why}"
        return None
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        return f"rope_type {rope_type!r} is not derived (known: {', '.join(ROPE_TYPES)})"
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if factor not in (None, 1, 1.0):
        return (
            f"partial_rotary_factor={factor}: partial rotary (GL on the pass-through head dims, rotation-scalings on the "
            "rotary ones) is not in the catalogue yet"
        )
    return None


def gated_activation(config, value) -> str | None:
    """A gated MLP act(B x) * (A x): permutations and positive scalings of A's rows hold for every activation."""
    from transformers.activations import ACT2FN

    return None if value in ACT2FN else f"unknown activation {value!r}"


def plain_activation(config, value) -> str | None:
    try:
        _activation(value)
    except UnsupportedArchitecture as exc:
        return str(exc)
    return None


def softcap(config, value) -> str | None:
    """Soft-capping c tanh(s / c) of attention scores or final logits: a function of values the group leaves unchanged."""
    return None


def softmax_router(config, value) -> str | None:
    """top-k of a softmax (renormalised over the k or not): softmax(z + c) = softmax(z), translations stay."""
    return None


def no_clip_qkv(config, value) -> str | None:
    """OLMoE ``clip_qkv``: an elementwise clamp of q, k and v. It commutes with head permutations but not with GL(d_h) on
    V/O (nor with any scaling): refused rather than shrinking V/O to the head permutations silently."""
    if value is None:
        return None
    return (
        "clamping q, k and v elementwise (clip_qkv) commutes with head permutations but not with GL(d_h) on V/O; the "
        "clipped group (head permutations, signed permutations of V dims) is not catalogued"
    )


def olmoe_head_dim(config, value) -> str | None:
    """OLMoE sizes q_norm by hidden_size and k_norm by (hidden_size / heads) * kv_heads: head_dim must be d / H."""
    d, h = config.hidden_size, config.num_attention_heads
    if value is None or value == d // h:
        return None
    return f"OLMoE's q_norm / k_norm assume head_dim = hidden_size / num_attention_heads = {d // h}"


# --------------------------------------------------------------------------------------------------- family records


@dataclass(frozen=True)
class Family:
    """One Hugging Face ``model_type`` as data: layout, sizes, and a verdict on every config option.

    ``sizes``: config keys read for shapes (``d``, ``layers``, ``heads``, ``kv_heads``, ``head_dim``, ``ffn``,
    ``vocab``, ``experts``, ...). ``options``: config key -> :data:`Check` (handled values pass; the others are refused
    naming the key). ``inert``: family keys that cannot change the group, on top of :data:`COMMON_INERT`.
    The decoder template (``build = decoder``) reads the layout fields: ``attention`` ``"separate"`` q/k/v/o or
    ``"fused-qkv"`` (Phi-3 ``qkv_proj``, rows [Q | K | V]); ``qkv_bias`` / ``o_bias`` / ``mlp_bias``: a config key or a
    constant; ``qk_norm``: ``None``, ``"head"`` (Qwen3: RMSNorm over head_dim, one gain (d_h,) for all heads) or
    ``"full"`` (OLMo2: RMSNorm over all heads, gain (H d_h,)); ``mlp``: ``"swiglu"``, ``"fused-gate-up"`` (Phi-3,
    rows [gate | up]), ``"moe"`` (Mixtral, OLMoE: every layer routed), ``"qwen2-moe"`` (sparse step, ``mlp_only_layers``,
    a gated shared expert), ``"qwen3-moe"`` (sparse step and ``mlp_only_layers``, no shared expert); ``norms``: ``"pre"`` (``input_layernorm`` /
    ``post_attention_layernorm`` read by the blocks), ``"post"`` (OLMo2: the blocks read the raw stream and their
    outputs are normalised: ``post_attention_layernorm`` / ``post_feedforward_layernorm``) or ``"sandwich"``
    (Gemma2/3: both, four norms per layer); ``norm``: ``"rmsnorm"`` (gain w) or ``"rmsnorm-1p"`` (Gemma: gain 1 + w,
    so no factor may scale a gain: only permutations move them).
    """

    model_type: str
    build: Callable[[object, "Family"], Fragment]
    group: str  # the group and why, one line (README table, ``symm describe``)
    sizes: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Check] = field(default_factory=dict)
    inert: frozenset[str] = frozenset()
    layer: str = "model.layers.{i}"
    norm: str = "rmsnorm"
    pe: str = "rope"
    tied: tuple[str, str] = ("model.embed_tokens.weight", "lm_head.weight")
    attention: str = "separate"
    qkv_bias: str | bool = False
    o_bias: str | bool = False
    mlp_bias: str | bool = False
    qk_norm: str | None = None
    mlp: str = "swiglu"
    norms: str = "pre"

    @property
    def name(self) -> str:
        return "hf-" + self.model_type.replace("_", "-")

    def size(self, config, key: str, default=None):
        value = getattr(config, self.sizes[key], None) if key in self.sizes else None
        return default if value is None else value

    def flag(self, config, spec: str | bool) -> bool:
        return bool(getattr(config, spec, False)) if isinstance(spec, str) else bool(spec)

    def classified(self) -> set[str]:
        return set(self.sizes.values()) | set(self.options) | set(self.inert) | COMMON_INERT | EPSILONS

    def check_options(self, config) -> None:
        """Refuse a config option this family does not handle, or a value of a handled one whose group is not derived."""
        values = config.to_dict()
        for key, check in self.options.items():
            if key not in values and not hasattr(config, key):
                continue  # an option of this family's other versions
            why = check(config, values.get(key, getattr(config, key, None)))
            if why:
                raise UnsupportedArchitecture(f"{self.name}: config option {key}={values.get(key)!r} is not supported: {why}")
        known = self.classified()
        try:
            defaults = set(type(config)().to_dict())
        except Exception:  # noqa: BLE001 - a config class that cannot be built without arguments
            defaults = set(values)
        for key in sorted(values):
            if key in known:
                continue
            if key in defaults:
                raise UnsupportedArchitecture(
                    f"{self.name}: config option {key}={values[key]!r} is not understood by the adapter (it may change the "
                    "symmetry group); refusing rather than ignoring it"
                )
            log.debug("%s: config key %r is not read by the transformers model; ignored", self.name, key)


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


# --------------------------------------------------------------------------------------------------- GPT-2 and XGLM


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


def _head_qk_norm_fixed_gains(prefix: str, shape: AttentionShape, stream: Units, qkv_bias: bool, o_bias: bool, eps: float) -> Fragment:
    """Gemma3: per-head QK-norm as Qwen3, but with (1 + w) gains: the q/k gain balance (q gain x a, k gain / a) is not
    linear in w, so it is dropped; heads permute, each Q/K head's scale is absorbed by its norm, V/O keep GL(d_h)."""
    f = dataclasses.replace(catalogue.attention_factors(prefix, shape, "rope", "half", qk_norm=True, qk_norm_eps=eps), gain=None)
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
    r, d = shape.group_size, shape.d_model
    hq, hkv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    params = {}
    for name, n_out, acts, bias in (("q_proj", hq, f.q(r), qkv_bias), ("k_proj", hkv, f.k(), qkv_bias), ("v_proj", hkv, f.v(), qkv_bias)):
        params[f"{prefix}.{name}.weight"] = param((n_out, d), acts, stream.inn())
        if bias:
            params[f"{prefix}.{name}.bias"] = param((n_out,), acts)
    params[f"{prefix}.o_proj.weight"] = param((d, hq), stream.out(), f.o(r))
    if o_bias:
        params[f"{prefix}.o_proj.bias"] = param((d,), stream.out())
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
    experts, units, scale = catalogue.expert_factors(f"{b}.mlp", n_experts, d_expert, "swiglu")
    gating = "top1" if config.num_experts_per_tok == 1 else "topk"
    frag = catalogue.router(f"{b}.mlp.gate", n_experts, d, gating, stream, experts.name)
    return frag + catalogue.stacked_swiglu_experts(
        f"{b}.mlp.experts", n_experts, d, d_expert, stream, experts, units, scale, fused_gate_up="gate_up_proj", names=("", "", "down_proj")
    )


def _sparse_layer(config, i: int) -> bool:
    """Qwen2-MoE / Qwen3-MoE: layer ``i`` is routed unless listed in ``mlp_only_layers`` or off the sparse step."""
    return i not in (config.mlp_only_layers or []) and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0


def _mlp(config, fam: Family, i: int, b: str, stream: Units) -> Fragment:
    if fam.mlp == "moe":
        return _routed_experts(config, fam, b, stream)
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


# --------------------------------------------------------------------------------------------------- the families

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
    "rotation-scaling per frequency pair and KV group on Q/K, GL(d_h) per KV group on V/O, SwiGLU units permuted and "
    "positively scaled"
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
        "group; SwiGLU units permuted and scaled",
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
        "permute and scale; top-k softmax routing adds a common router translation",
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
        "olmoe", decoder, qk_norm="full", mlp="moe", qkv_bias="attention_bias", o_bias="attention_bias",
        sizes={**_ROPE_SIZES, "experts": "num_experts", "expert_ffn": "intermediate_size"},
        group="as OLMo2 on Q/K (QK-norm over all heads with per-row gains: heads permute, nothing continuous on Q/K), "
        "pre-norm signed stream permutations, V/O GL(d_h) per KV group; as Mixtral on the experts: experts permute "
        "(router rows with them), each expert's SwiGLU units permute and scale, top-k softmax routing adds a common "
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
        "per-expert SwiGLU units permute and scale, router translation, with or without norm_topk_prob); dense layers "
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
    "; its sigmoid router (top-k over scores + e_score_correction_bias, group-limited by n_group / topk_group, "
    "renormalised and scaled by routed_scaling_factor) would also need expert permutations that respect the expert "
    "groups and move e_score_correction_bias with the router rows (no translation: sigmoid gates are not shift-invariant)"
)
#: model_type -> why it is refused (clearer than "no adapter"); any other config with ``kv_lora_rank`` is MLA too
REFUSED: dict[str, str] = {
    "deepseek_v2": _MLA_REASON + "; its softmax router can be group-limited (topk_method='group_limited_greedy', n_group / "
    "topk_group), which restricts the expert permutations to ones that respect the expert groups",
    "deepseek_v3": _MLA_REASON + _SIGMOID_ROUTER_REASON,
    "deepseek_v32": _MLA_REASON + " (plus a sparse-attention indexer)" + _SIGMOID_ROUTER_REASON,
    "gpt_neox": "the group is derived but not catalogued: LayerNorm stream permutations, heads permute, per head one "
    "rotation-scaling per rotary pair and GL on the pass-through dims on Q/K (partial rotary, rotary_pct / "
    "partial_rotary_factor), GL(d_h) on V/O, GELU units permute; the parallel residual does not change it (verified on "
    "logits in tests/test_hf_families.py). query_key_value interleaves [q_h | k_h | v_h] per head, so a head's Q, K and "
    "V rows are not contiguous segments of one factor, and the spec has no interleaved (strided) per-head layout yet",
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

# --------------------------------------------------------------------------------------------------- meta-device check

_META_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}
#: config entries that do not change the model built (the cache key ignores them)
_BOOKKEEPING = frozenset({"_name_or_path", "transformers_version", "architectures", "_commit_hash"})


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the causal LM ``transformers`` builds from ``config``, on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    import json

    values = {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}
    key = json.dumps(values, sort_keys=True, default=str)
    if key not in _META_CACHE:
        try:
            with torch.device("meta"):
                model = _encoders.build_model(copy.deepcopy(config))  # causal LM, or an encoder's head class
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises for a config it cannot build
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise UnsupportedArchitecture(
                f"transformers cannot build a {config.model_type} causal LM from this config ({type(exc).__name__}: {first})"
            ) from None
        _META_CACHE[key] = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if len(_META_CACHE) > 64:
            _META_CACHE.pop(next(iter(_META_CACHE)))
    return _META_CACHE[key]


def check_against_meta(spec: Spec, config) -> None:
    """Names and shapes of ``spec`` == those of the transformers model built from ``config``; else a loud layout drift."""
    import torch

    shapes = meta_shapes(config)
    try:
        spec.check_params({k: torch.empty(s, device="meta") for k, s in shapes.items()}, what=f"transformers {config.model_type} model (meta device)")
    except SpecError as exc:
        raise SpecError(f"layout drift between the {spec.name} adapter and the installed transformers: {exc}") from None


# --------------------------------------------------------------------------------------------------- public API


def load_config(folder: str | os.PathLike):
    """The config of a ``save_pretrained`` folder (offline)."""
    from transformers import AutoConfig

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UnsupportedArchitecture(f"{path}: not a Hugging Face model folder (no config.json)")
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


def spec_from_hf(model_or_config, *, check_meta: bool = True) -> Spec:
    """The Spec of a transformers model, config, or ``save_pretrained`` folder (in-memory layout).

    A model's own weights are checked against the spec; a config (or folder) is checked against the model built from it
    on the meta device (``check_meta``)."""
    config = model_or_config
    if isinstance(model_or_config, (str, os.PathLike)):
        config = load_config(model_or_config)
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    fam = RECORDS.get(model_type)
    why = refusal(config) if fam is None else None
    if why:
        raise UnsupportedArchitecture(f"Hugging Face model_type {model_type!r} is refused: {why}")
    if fam is None:
        raise UnsupportedArchitecture(
            f"no symmetry adapter for Hugging Face model_type {model_type!r}; supported: {', '.join(FAMILIES)}"
        )
    spec = family_spec(fam, config)
    if hasattr(model_or_config, "state_dict"):
        spec.check_params(model_or_config.state_dict(), what=f"{type(model_or_config).__name__} weights")
    elif check_meta:
        check_against_meta(spec, config)
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
    model = _encoders.auto_class(config).from_pretrained(str(folder), **kwargs)  # causal LM, or an encoder's head class
    return model.eval()


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


# encoder families (BERT, RoBERTa, ViT) live in hf_encoders.py and register themselves here
from . import hf_encoders as _encoders  # noqa: E402

_encoders.register(RECORDS, FAMILIES)
