"""Config options of Hugging Face families: a verdict per option the modeling code reads (handled with a check,
or refused naming the option)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from ... import catalogue
from ...errors import UnsupportedArchitecture


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


def partial_rope_check(config, value) -> str | None:
    """GPT-NeoX: any frequency-only RoPE variant on the first ``int(d_h * partial_rotary_factor)`` dims of a head (an
    even number: whole ``rotate_half`` pairs); the pass-through dims keep GL."""
    params = dict(value or {})
    factor = params.pop("partial_rotary_factor", 1.0)
    why = rope_check(config, params)
    if why:
        return why
    head_dim = config.hidden_size // config.num_attention_heads
    if not isinstance(factor, (int, float)) or not 0 <= factor <= 1:
        return f"partial_rotary_factor={factor!r} is not a fraction of the head dims"
    rotary = int(head_dim * factor)
    if rotary % 2:
        return f"partial_rotary_factor={factor} gives {rotary} rotary dims of {head_dim}, an odd number (no whole rotate_half pairs)"
    return None


def neox_head_dim(config, value) -> str | None:
    """GPT-NeoX's attention splits heads of hidden_size / heads dims, while its rotary table reads ``head_dim``: both
    must agree."""
    d, h = config.hidden_size, config.num_attention_heads
    if value is None or value == d // h:
        return None
    return f"the attention's heads have hidden_size / num_attention_heads = {d // h} dims, the rotary table {value}"


def expert_groups(config, value) -> str | None:
    """Group-limited routing (``n_group``): the experts must split into equal groups."""
    experts = getattr(config, "n_routed_experts", None) or getattr(config, "num_local_experts", None)
    if not isinstance(value, int) or value < 1 or (experts and experts % value):
        return f"{experts} routed experts do not split into {value!r} equal groups"
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

def _activation(name: str) -> str:
    """HF activation name -> catalogue name (all GELU variants share GELU's group)."""
    if name.startswith("gelu"):
        return "gelu"
    if name in ("relu", "silu", "tanh"):
        return name
    if name == "swish":
        return "silu"
    raise UnsupportedArchitecture(f"activation {name!r} has no catalogue entry")
