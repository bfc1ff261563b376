"""Gauges of normalised residual streams: fold the norm gains into their readers, act with an orthogonal O, unfold.

RMSNorm with unit gain commutes with every orthogonal O of the stream (rms(Ox) = rms(x), eps included). After
:func:`fold` (reader W -> W diag(g), gain -> 1) every stream vector transforms as v -> O v: writers (embedding
rows, o_proj / down_proj / fc2 / stacked expert down projections and their biases) as W -> O W on the stream axis,
readers (q/k/v, gate/up/fc1, router, shared-expert gate, lm_head) as W -> W O^T; :func:`act_orthogonal` does both.
:func:`unfold` returns an ordinary checkpoint (reader W -> W diag(1/g), gain := g); unfolding with another model's
gains keeps the function and carries those gains exactly.

LayerNorm is RMSNorm of the centred stream C x (C = I - 11^T/d) and commutes with every orthogonal O with O 1 = 1
(then O C = C O). Its bias is a vector of the norm's output space: folded as b -> b / g, rotated b -> O b, unfolded
b -> g' * b. Such an O keeps the mean component of every writer (which no reader sees: every reader centres), so
writers are left as they are; :func:`centre_writers` removes those components (same function) when wanted, and
Procrustes on a centred stream only reads the 1^perp block (:func:`nearest_orthogonal`).

Families are data: a table of name rules (:data:`FAMILIES`) saying which parameters are gains, which readers each
gain feeds, and which parameters are writers or readers on which axis. Any parameter no rule knows is refused.
Tied embeddings are refused: the embedding E is then both the first writer and the last reader. Writing E -> E O^T
keeps logits = E diag(g) n(x) only if O^T diag(g) O = diag(g) for the final gain g, i.e. O maps each eigenspace of
diag(g) to itself: a permutation of equal gains with signs, and rotations only within groups of exactly equal gains.
For a trained (generic) g that is the signed permutations fixing g: nothing continuous survives (the catalogue's
``stream.sign`` factor covers RMSNorm; LayerNorm keeps permutations and one global sign).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .errors import SpecError, UnsupportedArchitecture

Params = Mapping[str, torch.Tensor]
ROLES = ("gain", "bias", "reader", "writer", "other", "refuse")

TIED_MESSAGE = (
    "tied embeddings: the embedding is both the first stream writer and (through the final norm's gain) the last "
    "reader, and a general orthogonal O of the stream survives only if O diag(g) O^T is diagonal; the orthogonal "
    "stream is refused for tied models (use the signed permutations of the catalogue, or untie both checkpoints "
    "explicitly: `symm untie A A-untied`, same function)"
)
LAYERNORM_MESSAGE = "norm bias {name!r} in a family whose rules expect RMSNorm (no norm biases)"


@dataclass(frozen=True)
class Rule:
    """Parameters whose name fully matches ``pattern``: their role, stream axis and (readers, norm biases) the gain
    they read or belong to.

    ``norm`` is a template formatted with the pattern's groups (``{0}``: the layer index)."""

    pattern: str
    role: str
    axis: int = -1
    norm: str | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"rule {self.pattern!r}: role must be one of {ROLES}, got {self.role!r}")
        if self.role in ("reader", "bias") and self.norm is None:
            raise ValueError(f"rule {self.pattern!r}: a {self.role} names its norm's gain")


def _r(pattern: str, role: str, axis: int = -1, norm: str | None = None) -> Rule:
    return Rule(pattern, role, axis, norm)


_L = r"blocks\.(\d+)"
#: reference ``TransformerLM`` with ``norm="rms"`` (symm.models.transformer)
REFERENCE_RULES: tuple[Rule, ...] = (
    _r(r"embed\.weight", "writer"),
    _r(r"pos\.weight", "writer"),
    _r(r"norm\.weight", "gain"),
    _r(r"lm_head\.weight", "reader", norm="norm.weight"),
    _r(_L + r"\.norm[12]\.weight", "gain"),
    _r(r"(.*\.)?norm\d?\.bias", "refuse"),
    _r(_L + r"\.attn\.[qkv]_proj\.weight", "reader", norm="blocks.{0}.norm1.weight"),
    _r(_L + r"\.attn\.[qkv]_proj\.bias", "other"),
    _r(_L + r"\.attn\.[qk]_norm\.weight", "other"),  # per-head QK-norm acts on head dims, not the stream
    _r(_L + r"\.attn\.o_proj\.weight", "writer", -2),
    _r(_L + r"\.attn\.o_proj\.bias", "writer"),
    _r(
        _L + r"\.ffn\.(fc1\.weight|gate_proj\.weight|up_proj\.weight|w1|w3|router\.weight"
        r"|shared\.gate_proj\.weight|shared\.up_proj\.weight|shared_gate\.weight)",
        "reader",
        norm="blocks.{0}.norm2.weight",
    ),
    _r(_L + r"\.ffn\.(fc1\.bias|router\.bias)", "other"),
    _r(_L + r"\.ffn\.(fc2\.weight|down_proj\.weight|w2|shared\.down_proj\.weight)", "writer", -2),
    _r(_L + r"\.ffn\.fc2\.bias", "writer"),
)

_H = r"model\.layers\.(\d+)"
#: Hugging Face Llama / Mixtral / Qwen2-MoE, in-memory layout (fused experts ``gate_up_proj`` (E, 2I, d))
HF_DECODER_RULES: tuple[Rule, ...] = (
    _r(r"model\.embed_tokens\.weight", "writer"),
    _r(r"model\.norm\.weight", "gain"),
    _r(r"lm_head\.weight", "reader", norm="model.norm.weight"),
    _r(_H + r"\.(input_layernorm|post_attention_layernorm)\.weight", "gain"),
    _r(_H + r"\.self_attn\.([qkv]|qkv)_proj\.weight", "reader", norm="model.layers.{0}.input_layernorm.weight"),
    _r(_H + r"\.self_attn\.[qkv]_proj\.bias", "other"),
    _r(_H + r"\.self_attn\.[qk]_norm\.weight", "other"),  # Qwen3 per-head QK-norm acts on head dims, not the stream
    _r(_H + r"\.self_attn\.o_proj\.weight", "writer", -2),
    _r(_H + r"\.self_attn\.o_proj\.bias", "writer"),
    _r(
        _H + r"\.mlp\.(gate_proj\.weight|up_proj\.weight|gate_up_proj\.weight|gate\.weight|experts\.gate_up_proj"
        r"|shared_expert\.gate_proj\.weight|shared_expert\.up_proj\.weight|shared_expert_gate\.weight)",
        "reader",
        norm="model.layers.{0}.post_attention_layernorm.weight",
    ),
    _r(_H + r"\.mlp\.(down_proj\.weight|experts\.down_proj|shared_expert\.down_proj\.weight)", "writer", -2),
    _r(_H + r"\.mlp\.(gate_proj|up_proj)\.bias", "other"),
    _r(_H + r"\.mlp\.down_proj\.bias", "writer"),
)

#: reference ``TransformerLM`` with ``norm="layer"``: the RMSNorm rules plus the LayerNorm biases
REFERENCE_LAYER_RULES: tuple[Rule, ...] = (
    _r(r"norm\.bias", "bias", norm="norm.weight"),
    _r(_L + r"\.norm([12])\.bias", "bias", norm="blocks.{0}.norm{1}.weight"),
) + REFERENCE_RULES

_G = r"transformer\.h\.(\d+)"
#: Hugging Face GPT-2 (untied): LayerNorm with bias, learned PE, Conv1D layout (in, out)
GPT2_RULES: tuple[Rule, ...] = (
    _r(r"transformer\.(wte|wpe)\.weight", "writer"),
    _r(r"transformer\.ln_f\.weight", "gain"),
    _r(r"transformer\.ln_f\.bias", "bias", norm="transformer.ln_f.weight"),
    _r(r"lm_head\.weight", "reader", norm="transformer.ln_f.weight"),
    _r(_G + r"\.ln_[12]\.weight", "gain"),
    _r(_G + r"\.(ln_[12])\.bias", "bias", norm="transformer.h.{0}.{1}.weight"),
    _r(_G + r"\.attn\.c_attn\.weight", "reader", -2, norm="transformer.h.{0}.ln_1.weight"),
    _r(_G + r"\.mlp\.c_fc\.weight", "reader", -2, norm="transformer.h.{0}.ln_2.weight"),
    _r(_G + r"\.(attn\.c_attn|mlp\.c_fc)\.bias", "other"),
    _r(_G + r"\.(attn|mlp)\.c_proj\.(weight|bias)", "writer"),
)


_V = r"vit\.layers\.(\d+)"
#: Hugging Face ViT (``ViTForImageClassification``): pre-LN with bias; the patch conv, CLS token and position
#: embeddings write the stream, the classifier reads the final LayerNorm
VIT_RULES: tuple[Rule, ...] = (
    _r(r"vit\.embeddings\.(cls_token|position_embeddings)", "writer"),
    _r(r"vit\.embeddings\.patch_embeddings\.projection\.weight", "writer", -4),
    _r(r"vit\.embeddings\.patch_embeddings\.projection\.bias", "writer"),
    _r(r"vit\.layernorm\.weight", "gain"),
    _r(r"vit\.layernorm\.bias", "bias", norm="vit.layernorm.weight"),
    _r(r"classifier\.weight", "reader", norm="vit.layernorm.weight"),
    _r(r"classifier\.bias", "other"),
    _r(_V + r"\.layernorm_(before|after)\.weight", "gain"),
    _r(_V + r"\.layernorm_(before|after)\.bias", "bias", norm="vit.layers.{0}.layernorm_{1}.weight"),
    _r(_V + r"\.attention\.[qkv]_proj\.weight", "reader", norm="vit.layers.{0}.layernorm_before.weight"),
    _r(_V + r"\.attention\.[qkv]_proj\.bias", "other"),
    _r(_V + r"\.attention\.o_proj\.weight", "writer", -2),
    _r(_V + r"\.mlp\.fc1\.weight", "reader", norm="vit.layers.{0}.layernorm_after.weight"),
    _r(_V + r"\.mlp\.fc1\.bias", "other"),
    _r(_V + r"\.mlp\.fc2\.weight", "writer", -2),
    _r(_V + r"\.(attention\.o_proj|mlp\.fc2)\.bias", "writer"),
)


@dataclass(frozen=True)
class Family:
    """A family's stream rules, its norm kind (``rms``, or ``layer``: LayerNorm centres the stream) and the offset
    of its stored gains (Gemma stores w and scales by 1 + w: offset 1)."""

    rules: tuple[Rule, ...]
    norm: str = "rms"
    gain_offset: float = 0.0


#: family name -> rules (``reference``/``reference-layer`` and the supported Hugging Face ``model_type`` s)
FAMILIES: dict[str, Family] = {
    "reference": Family(REFERENCE_RULES),
    "reference-layer": Family(REFERENCE_LAYER_RULES, "layer"),
    "llama": Family(HF_DECODER_RULES),
    "mistral": Family(HF_DECODER_RULES),
    "qwen2": Family(HF_DECODER_RULES),
    "qwen3": Family(HF_DECODER_RULES),
    "phi3": Family(HF_DECODER_RULES),
    "gemma": Family(HF_DECODER_RULES, gain_offset=1.0),
    "mixtral": Family(HF_DECODER_RULES),
    "olmoe": Family(HF_DECODER_RULES),
    "qwen3_moe": Family(HF_DECODER_RULES),
    "qwen2_moe": Family(HF_DECODER_RULES),
    "gpt2": Family(GPT2_RULES, "layer"),
    "vit": Family(VIT_RULES, "layer"),
}


@dataclass(frozen=True)
class StreamTensor:
    """A parameter with the residual stream on ``axis``: a ``writer`` (v -> O v) or a ``reader`` (W -> W O^T)."""

    name: str
    role: str
    axis: int


@dataclass(frozen=True)
class NormGain:
    """A norm's gain (shape (d,)), the readers that read its output, and its bias (LayerNorm) if it has one."""

    name: str
    readers: tuple[str, ...]
    bias: str | None = None


@dataclass(frozen=True)
class StreamLayout:
    """Where the residual stream of one checkpoint lives: gains, writers and readers (and what it leaves alone)."""

    family: str
    d: int
    norms: tuple[NormGain, ...]
    tensors: tuple[StreamTensor, ...]  # writers, readers and norm biases (``bias``: v -> O v like a writer)
    untouched: tuple[str, ...] = ()
    centred: bool = False  # LayerNorm: the stream is centred by every reader; O must fix 1
    gain_offset: float = 0.0  # the norm scales by (stored gain + offset)

    def gain(self, stored: torch.Tensor) -> torch.Tensor:
        """The per-channel scale a stored gain applies (float64)."""
        return stored.detach().to(torch.float64) + self.gain_offset

    def stored(self, gain: torch.Tensor) -> torch.Tensor:
        """The stored value of a per-channel scale."""
        return gain - self.gain_offset

    @property
    def gains(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.norms)

    @property
    def writers(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if t.role == "writer")

    @property
    def readers(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors if t.role == "reader")

    def axis_of(self, name: str) -> int:
        return next(t.axis for t in self.tensors if t.name == name)


# ----- deriving a layout ------------------------------------------------------------------------------
def _classify(rules: tuple[Rule, ...], name: str) -> tuple[Rule, tuple[str, ...]] | None:
    for rule in rules:
        m = re.fullmatch(rule.pattern, name)
        if m:
            return rule, m.groups()
    return None


def _shared_storage(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.device.type != "meta" and x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()


def derive_layout(params: Params, family: str, *, tied: bool = False) -> StreamLayout:
    """The :class:`StreamLayout` of ``params`` under ``family``'s rules; unknown parameters are refused by name."""
    if family not in FAMILIES:
        raise UnsupportedArchitecture(f"no stream layout for family {family!r}; supported: {', '.join(sorted(FAMILIES))}")
    if tied:
        raise UnsupportedArchitecture(TIED_MESSAGE)
    rules = FAMILIES[family].rules
    gains: dict[str, list[str]] = {}
    biases: dict[str, str] = {}  # gain -> its norm's bias
    tensors: list[StreamTensor] = []
    untouched: list[str] = []
    unknown: list[str] = []
    wanted: dict[str, str] = {}  # reader -> gain
    for name, x in params.items():
        hit = _classify(rules, name)
        if hit is None:
            unknown.append(name)
            continue
        rule, groups = hit
        if rule.role == "refuse":
            raise UnsupportedArchitecture(LAYERNORM_MESSAGE.format(name=name))
        if rule.role == "gain":
            gains[name] = []
        elif rule.role == "other":
            untouched.append(name)
        else:
            if x.dim() < -rule.axis:
                raise SpecError(f"{name}: shape {tuple(x.shape)} has no axis {rule.axis} for the stream")
            tensors.append(StreamTensor(name, rule.role, x.dim() + rule.axis))
            if rule.role == "reader":
                wanted[name] = rule.norm.format(*groups)
            elif rule.role == "bias":
                biases[rule.norm.format(*groups)] = name
    if unknown:
        raise UnsupportedArchitecture(
            f"family {family!r}: no stream rule for parameter(s) {', '.join(unknown[:10])}" + (" ..." if len(unknown) > 10 else "")
        )
    for reader, gain in wanted.items():
        if gain not in gains:
            raise SpecError(f"{reader} reads the norm {gain!r}, which is not among the parameters")
        gains[gain].append(reader)
    orphans = sorted(b for g, b in biases.items() if g not in gains)
    if orphans:
        raise SpecError(f"norm bias(es) {orphans[:10]} without their gain among the parameters")
    _check_tied_storage(params, tensors)
    norms = tuple(NormGain(g, tuple(r), biases.get(g)) for g, r in gains.items())
    centred = FAMILIES[family].norm == "layer"
    offset = FAMILIES[family].gain_offset
    layout = StreamLayout(family, _stream_width(params, gains), norms, tuple(tensors), tuple(untouched), centred, offset)
    _check_layout(params, layout)
    return layout


def _check_tied_storage(params: Params, tensors: list[StreamTensor]) -> None:
    writers = [t.name for t in tensors if t.role == "writer"]
    readers = [t.name for t in tensors if t.role == "reader"]
    for w in writers:
        for r in readers:
            if params[w].shape == params[r].shape and _shared_storage(params[w], params[r]):
                raise UnsupportedArchitecture(f"{w} and {r} are one tensor: " + TIED_MESSAGE)


def _stream_width(params: Params, gains: Mapping[str, list[str]]) -> int:
    if not gains:
        raise UnsupportedArchitecture("no norm gain found: nothing reads the stream through a norm")
    sizes = {name: tuple(params[name].shape) for name in gains}
    widths = {s[0] for s in sizes.values() if len(s) == 1}
    if len(widths) != 1 or any(len(s) != 1 for s in sizes.values()):
        raise SpecError(f"norm gains must all have shape (d,): {sizes}")
    return widths.pop()


def _check_layout(params: Params, layout: StreamLayout) -> None:
    for t in layout.tensors:
        size = params[t.name].shape[t.axis]
        if size != layout.d:
            raise SpecError(f"{t.name} ({t.role}): stream axis {t.axis} has size {size}, expected d = {layout.d}")
    for n in layout.norms:
        if not n.readers:
            raise SpecError(f"norm {n.name}: no reader of this norm found")
    if not layout.writers or not layout.readers:
        found = f"{len(layout.writers)} writers, {len(layout.readers)} readers"
        raise UnsupportedArchitecture(f"family {layout.family!r}: a stream needs writers and readers (found {found})")


def layout_for(model_or_config, params: Params) -> StreamLayout:
    """The layout of ``params`` for a reference ``TransformerLM`` / its config, or a transformers model / config."""
    from .models.transformer import TransformerConfig

    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, TransformerConfig):
        if config.pe == "sinusoidal":
            raise UnsupportedArchitecture("additive sinusoidal PE is a fixed table on the stream: the stream cannot be rotated")
        return derive_layout(params, "reference" if config.norm == "rms" else "reference-layer", tied=config.tied)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise UnsupportedArchitecture(
            f"cannot tell the family of {type(model_or_config).__name__}: pass a TransformerConfig or a transformers model/config"
        )
    if model_type not in FAMILIES:
        raise UnsupportedArchitecture(
            f"no orthogonal-stream layout for Hugging Face model_type {model_type!r}; supported: "
            + ", ".join(sorted(f for f in FAMILIES if not f.startswith("reference")))
        )
    return derive_layout(params, model_type, tied=bool(getattr(config, "tie_word_embeddings", False)))


# ----- the maps -----------------------------------------------------------------------------------------
def _along(x: torch.Tensor, axis: int, fn) -> torch.Tensor:
    """Apply ``fn`` to ``x`` (in float64) with ``axis`` moved last; cast back to ``x``'s dtype."""
    y = fn(x.detach().to(torch.float64).movedim(axis, -1)).movedim(-1, axis)
    return y.to(x.dtype).contiguous()


def _copy(params: Params) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.items()}


def _check_keys(params: Params, layout: StreamLayout) -> None:
    names = set(layout.gains) | {t.name for t in layout.tensors} | set(layout.untouched)
    missing, extra = sorted(names - set(params)), sorted(set(params) - names)
    if missing or extra:
        raise SpecError(f"parameters do not match the stream layout ({layout.family}): missing {missing[:10]}, unexpected {extra[:10]}")


def gains_of(params: Params, layout: StreamLayout) -> dict[str, torch.Tensor]:
    """Copies of the norm gains of ``params``."""
    return {g: params[g].detach().clone() for g in layout.gains}


def is_folded(params: Params, layout: StreamLayout, atol: float = 0.0) -> bool:
    """True when every norm scales by 1 (stored gain + offset = 1)."""
    return all(bool((layout.gain(params[g]) - 1).abs().max() <= atol) for g in layout.gains)


def fold(params: Params, layout: StreamLayout) -> dict[str, torch.Tensor]:
    """Gains into their readers: W -> W diag(g), b -> b / g, g -> 1 (same function; new tensors, computed in
    float64)."""
    _check_keys(params, layout)
    out = _copy(params)
    for norm in layout.norms:
        g = layout.gain(params[norm.name])
        if norm.bias is not None:
            _check_nonzero(g, norm.name, "fold")
            out[norm.bias] = _along(params[norm.bias], 0, lambda b, g=g: b / g)
        for r in norm.readers:
            out[r] = _along(params[r], layout.axis_of(r), lambda w, g=g: w * g)
        out[norm.name] = torch.full_like(params[norm.name], 1.0 - layout.gain_offset)
    return out


def centre_writers(params: Params, layout: StreamLayout) -> dict[str, torch.Tensor]:
    """LayerNorm streams: every writer projected onto the zero-mean subspace, v -> v - mean(v) 1 (same function:
    every reader centres). RMSNorm streams: unchanged."""
    out = dict(params)
    if layout.centred:
        for t in layout.tensors:
            if t.role == "writer":
                out[t.name] = _along(params[t.name], t.axis, lambda v: v - v.mean(-1, keepdim=True))
    return out


def _check_nonzero(g: torch.Tensor, name: str, what: str) -> None:
    if bool((g == 0).any()):
        raise SpecError(f"{what}: gain {name} has {int((g == 0).sum())} zero entries (cannot divide by them)")


def unfold(params: Params, layout: StreamLayout, gains: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Back to an ordinary checkpoint with stored ``gains`` (scales g): W -> W diag(1/g), b -> g * b, gain := stored
    (``params`` folded)."""
    _check_keys(params, layout)
    if not is_folded(params, layout, atol=1e-6):
        raise SpecError("unfold expects folded parameters (every norm gain 1): fold first")
    missing = sorted(set(layout.gains) - set(gains))
    if missing:
        raise SpecError(f"unfold: no gain given for {missing[:10]}")
    out = _copy(params)
    for norm in layout.norms:
        g = gains[norm.name].detach()
        if tuple(g.shape) != (layout.d,):
            raise SpecError(f"unfold: gain {norm.name} has shape {tuple(g.shape)}, expected ({layout.d},)")
        g64 = layout.gain(g)
        _check_nonzero(g64, norm.name, "unfold")
        for r in norm.readers:
            out[r] = _along(params[r], layout.axis_of(r), lambda w, g64=g64: w / g64)
        if norm.bias is not None:
            out[norm.bias] = _along(params[norm.bias], 0, lambda b, g64=g64: b * g64)
        out[norm.name] = g.to(params[norm.name].dtype).clone()
    return out


def check_orthogonal(O: torch.Tensor, d: int, atol: float = 1e-5) -> torch.Tensor:
    """``O`` as float64 after checking its shape (d, d) and O^T O = I to ``atol``."""
    if tuple(O.shape) != (d, d):
        raise SpecError(f"O has shape {tuple(O.shape)}, expected ({d}, {d})")
    O = O.detach().to(torch.float64)
    err = float((O.T @ O - torch.eye(d, dtype=torch.float64)).abs().max())
    if not err <= atol:
        raise SpecError(f"O is not orthogonal: max |O^T O - I| = {err:.3e} > {atol:.0e}")
    return O


def complement_basis(d: int) -> torch.Tensor:
    """An orthonormal basis (d, d-1) of the zero-mean subspace 1^perp (float64, deterministic)."""
    q, _ = torch.linalg.qr(torch.ones(d, 1, dtype=torch.float64), mode="complete")
    return q[:, 1:]


def nearest_orthogonal(m: torch.Tensor, centred: bool = False) -> torch.Tensor:
    """argmax_O <m, O> over orthogonal O (O 1 = 1 if ``centred``): U V^T of the SVD of m (of m on 1^perp)."""
    m = m.to(torch.float64)
    if not centred:
        u, _, vh = torch.linalg.svd(m)
        return u @ vh
    q = complement_basis(m.shape[0])
    u, _, vh = torch.linalg.svd(q.T @ m @ q)
    return q @ (u @ vh) @ q.T + torch.full_like(m, 1.0 / m.shape[0])


def random_orthogonal(d: int, generator: torch.Generator, centred: bool = False) -> torch.Tensor:
    """A Haar-random orthogonal (d, d) matrix in float64 (on 1^perp, fixing 1, if ``centred``)."""
    n = d - 1 if centred else d
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if not centred:
        return q
    c = complement_basis(d)
    return c @ q @ c.T + torch.full((d, d), 1.0 / d, dtype=torch.float64)


def act_orthogonal(params: Params, layout: StreamLayout, O: torch.Tensor, *, require_folded: bool = True) -> dict[str, torch.Tensor]:
    """Every stream vector v -> O v: writers W -> O W, readers W -> W O^T, norm biases b -> O b; gains untouched.

    Keeps the function of folded parameters only (``require_folded=False`` is for negative controls); a centred
    (LayerNorm) stream also needs O 1 = 1."""
    _check_keys(params, layout)
    O = check_orthogonal(O, layout.d)
    if layout.centred and require_folded:
        ones = torch.ones(layout.d, dtype=torch.float64)
        err = float((O @ ones - ones).abs().max())
        if not err <= 1e-6:
            raise SpecError(f"a LayerNorm stream is centred by every reader: O must fix the all-ones vector (|O1 - 1| = {err:.2e})")
    if require_folded and not is_folded(params, layout, atol=1e-6):
        raise SpecError("act_orthogonal keeps the function only with unit norm gains: fold the parameters first")
    out = _copy(params)
    for t in layout.tensors:
        out[t.name] = _along(params[t.name], t.axis, lambda v: v @ O.T)
    return out


def stream_tensors(params: Params, layout: StreamLayout) -> dict[str, torch.Tensor]:
    """Every writer, reader and norm bias as an (n, d) matrix whose rows are stream vectors (v -> O v)."""
    _check_keys(params, layout)
    return {t.name: params[t.name].detach().movedim(t.axis, -1).reshape(-1, layout.d) for t in layout.tensors}


__all__ = [
    "FAMILIES",
    "NormGain",
    "Rule",
    "StreamLayout",
    "StreamTensor",
    "act_orthogonal",
    "centre_writers",
    "check_orthogonal",
    "complement_basis",
    "derive_layout",
    "fold",
    "gains_of",
    "is_folded",
    "layout_for",
    "nearest_orthogonal",
    "random_orthogonal",
    "stream_tensors",
    "unfold",
]
