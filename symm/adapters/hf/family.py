"""The :class:`Family` record (one ``model_type`` as data) and small helpers shared by the builders."""

from __future__ import annotations

import logging

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ... import catalogue
from ...catalogue.units import Units
from ...errors import UnsupportedArchitecture
from ...spec import Fragment, param
from .options import COMMON_INERT, Check, EPSILONS

log = logging.getLogger(__name__)


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




def _tied(config) -> bool:
    return bool(getattr(config, "tie_word_embeddings", False))


def _stream_fragment(stream: Units, embed: str, vocab: int, d: int, head: str | None) -> Fragment:
    params = {embed: param((vocab, d), None, stream.out())}
    if head:
        params[head] = param((vocab, d), None, stream.inn())
    return Fragment.of(stream.factors, params)


def _rmsnorm(name: str, stream: Units) -> Fragment:
    return catalogue.layernorm(name.rsplit(".weight", 1)[0], stream, bias=False)
