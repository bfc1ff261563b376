"""Hugging Face encoder families: BERT, RoBERTa (post-LN masked LMs) and ViT (pre-LN image classifier).

Registered into :mod:`symm.adapters.hf` (``RECORDS`` / ``FAMILIES``) as declarative :class:`~symm.adapters.hf.Family`
records with their own builders; the model class is read from ``config.architectures`` (offline), not
``AutoModelForCausalLM`` (:func:`auto_class`). Supported heads: ``BertForMaskedLM``, ``RobertaForMaskedLM``,
``ViTForImageClassification``; any other architecture of these model types is refused naming it.

Groups, derived from the installed ``transformers`` forward passes (tested on their logits in
``tests/test_hf_encoders.py``):

**BERT / RoBERTa (post-LN).** ``e = LN_0(word[x] + pos + type)``, then per layer ``h = LN_a(e + attn(e))``,
``e' = LN_m(h + mlp(h))``; MLM head ``t = LN_h(act(W_t e_L + b_t))``, logits ``E t + bias`` (E tied to the word
embeddings). LayerNorm is channelwise after the (permutation-invariant) mean and variance, so its output channel i
depends on its input channel i only: a permutation of an LN's input forces the same permutation of its output (gain
and bias move with it). Every LN output is added to the next sublayer's output and fed to the next LN, so one
permutation P of the d channels is shared by every embedding, every LN, every sublayer's input columns and output
rows: one stream permutation. Per-channel signs do not survive: LN centres its input (mean(Sx) != S mean(x)). Heads
permute, Q/K keep GL(d_h) per head (learned absolute PE, no RoPE: scores q^T k are all they read), V/O keep GL(d_h)
per head, the GELU units of each MLP permute (no scaling: GELU is not homogeneous). The tied decoder reads the head's
LN output t in the word embeddings' column space, so t, LN_h and the head transform's d units carry the stream
permutation P itself; untied, the transform units have their own permutation. Not catalogued (discrete or
LN-output factors, tested on the logits): a global sign (writers, readers and every LN bias negated; the head LN's
gain and bias negated so t flips with the tied decoder), and a per-channel nonzero scaling of the last layer's LN
output (its gain and bias times a_i, the head transform's columns / a_i: that output feeds no residual).

**ViT (pre-LN).** Patch embedding (Conv2d, the stream on its out channels), CLS token and position embeddings are
stream writers; blocks read ``LN(x)`` and add their outputs to the raw stream; a final LayerNorm is read by the
classifier at the CLS position. One stream permutation, LN gains and biases move with it; centring kills per-channel
signs; heads permute, GL(d_h) on Q/K and on V/O per head; GELU units permute. Not catalogued (tested on logits): per
LayerNorm output a per-channel nonzero scaling (gain and bias times a_i, the readers' columns / a_i; with a_i = -1
for every channel of every LN and negated writers this is the global sign).
"""

from __future__ import annotations

import torch

from ... import catalogue
from ...catalogue.attention import AttentionShape
from ...catalogue.units import Units
from ...errors import DataError, UnsupportedArchitecture
from ...spec import Fragment, param
from .family import Family
from .options import _activation, handled, must_be_false, plain_activation

#: model_type -> the head classes (``config.architectures``) the spec describes; the first is the default
ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "bert": ("BertForMaskedLM",),
    "roberta": ("RobertaForMaskedLM",),
    "vit": ("ViTForImageClassification",),
}
#: model types whose task is masked-LM / image classification
MASKED_LM = ("bert", "roberta")
IMAGE_CLASSIFIERS = ("vit",)
#: fraction of positions masked in the masked-LM evaluation
MASK_FRACTION = 0.15

_OTHER_HEADS = (
    "only the masked-LM head ({known}) is described: a pooler (tanh dense on the first token) or a task head reads the "
    "stream and would need its own rows in the spec, and a bare encoder outputs the stream itself (not invariant)"
)


def is_encoder(config) -> bool:
    return getattr(config, "model_type", None) in ARCHITECTURES


def architecture(config) -> str:
    """The head class named by ``config.architectures`` (the family's default when unset); refused when the spec does
    not describe it (a pooler, a classification head, a bare encoder)."""
    model_type = config.model_type
    known = ARCHITECTURES[model_type]
    archs = list(getattr(config, "architectures", None) or [known[0]])
    unknown = [a for a in archs if a not in known]
    if unknown or len(archs) != 1:
        raise UnsupportedArchitecture(
            f"hf-{model_type}: architecture {', '.join(archs)} is not supported: " + _OTHER_HEADS.format(known=", ".join(known))
        )
    return archs[0]


def auto_class(config):
    """The ``transformers`` class to build or load ``config`` with: the encoder's head class, else the causal LM."""
    import transformers

    if is_encoder(config):
        return getattr(transformers, architecture(config))
    return transformers.AutoModelForCausalLM


def build_model(config):
    """A model of ``config`` (random init): ``AutoModelForCausalLM.from_config`` or the encoder's head class, gauged
    (:func:`~.gauge.gauge_model`)."""
    from .gauge import gauge_model

    cls = auto_class(config)
    return gauge_model(cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config))


# --------------------------------------------------------------------------------------------------- BERT / RoBERTa


_UNIT_GROUPS = {"none": "permutation only", "scaling": "permutation x positive scaling", "sign": "permutation x sign flips",
                "scaling-sign": "permutation x positive scaling x sign flips"}


def _embedding(name: str, shape, stream: Units) -> dict:
    return {name: param(shape, None, stream.out())}


def _post_ln_encoder(config, fam: Family) -> Fragment:
    """BERT / RoBERTa masked LM: post-LN encoder, learned absolute PE, GELU MLP, MLM head tied to the word embeddings."""
    arch = architecture(config)
    p = fam.model_type  # "bert" | "roberta": the base model's prefix
    d, h = config.hidden_size, config.num_attention_heads
    if d % h:
        raise UnsupportedArchitecture(f"{fam.name}: hidden_size {d} is not a multiple of num_attention_heads {h}")
    act = _activation(config.hidden_act) if isinstance(config.hidden_act, str) else None
    if act is None:
        raise UnsupportedArchitecture(f"{fam.name}: hidden_act must be a name, got {config.hidden_act!r}")
    stream = catalogue.stream("stream", d)  # LayerNorm stream: permutations only (centring kills signs)
    e = f"{p}.embeddings"
    params = {}
    params.update(_embedding(f"{e}.word_embeddings.weight", (config.vocab_size, d), stream))
    params.update(_embedding(f"{e}.position_embeddings.weight", (config.max_position_embeddings, d), stream))
    params.update(_embedding(f"{e}.token_type_embeddings.weight", (config.type_vocab_size, d), stream))
    frag = Fragment.of(stream.factors, params) + catalogue.layernorm(f"{e}.LayerNorm", stream)
    shape = AttentionShape(d, h, h, d // h)
    for i in range(config.num_hidden_layers):
        b = f"{p}.encoder.layer.{i}"
        frag = frag + catalogue.attention(
            f"{b}.attention", shape, "learned", stream, names=("self.query", "self.key", "self.value", "output.dense"), bias=(True,) * 4
        )
        frag = frag + catalogue.layernorm(f"{b}.attention.output.LayerNorm", stream)
        frag = frag + catalogue.mlp([f"{b}.intermediate.dense", f"{b}.output.dense"], [d, config.intermediate_size, d], act,
                                    input_units=stream, output_units=stream)
        frag = frag + catalogue.layernorm(f"{b}.output.LayerNorm", stream)
    head, dense, norm = ("cls.predictions", "cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm")
    if p == "roberta":
        head, dense, norm = "lm_head", "lm_head.dense", "lm_head.layer_norm"
    tied = bool(getattr(config, "tie_word_embeddings", True))
    # the head transform's d units: LayerNorm follows the activation, so no per-unit scaling or sign (permutation only);
    # tied, the decoder (= word embeddings) reads them in the stream's column order: they are the stream permutation
    units = stream if tied else catalogue.neurons(f"{head}.transform.units", d, "any")
    frag = frag + Fragment.of(units.factors) + catalogue.linear(dense, d, d, units.out(), stream.inn())
    frag = frag + catalogue.layernorm(norm, units)
    frag = frag + Fragment.of(
        params={
            f"{head}.decoder.weight": param((config.vocab_size, d), None, units.inn()),
            f"{head}.decoder.bias": param((config.vocab_size,), None),
            f"{head}.bias": param((config.vocab_size,), None),
        }
    )
    notes = [
        f"{fam.name}: post-LN: every LayerNorm output is added to the next sublayer's output and normalised again, and "
        "LayerNorm is channelwise, so one permutation of the d channels is shared by all embeddings, LayerNorms, "
        "sublayer inputs and outputs; LayerNorm centres its input, so no per-channel signs",
        f"{fam.name}: learned absolute position embeddings (no RoPE): Q/K and V/O keep GL(d_h) per head",
        f"{fam.name}: {config.hidden_act} MLP units: {_UNIT_GROUPS[catalogue.activation_group(act)]}",
        f"{fam.name}: the MLM head's LayerNorm follows its activation: its units only permute"
        + ("; the decoder is tied to the word embeddings, so they carry the stream permutation" if tied else " (own permutation: untied decoder)"),
        f"{fam.name}: not catalogued (tested on logits): a global sign of the stream (every LN bias negated, the head "
        "LN's gain and bias too), and a per-channel nonzero scaling of the last layer's LN output (gain, bias x a_i; "
        "head transform columns / a_i)",
        f"{fam.name}: architecture {arch}; token types and padding only select embedding rows",
    ]
    return frag + Fragment.of(notes=notes)


# --------------------------------------------------------------------------------------------------- ViT


def _size2(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _vit(config, fam: Family) -> Fragment:
    """ViTForImageClassification: pre-LN encoder, Conv2d patch embedding, CLS token, learned PE, final LN, classifier."""
    arch = architecture(config)
    d, h = config.hidden_size, config.num_attention_heads
    dh = getattr(config, "head_dim", None) or d // h
    if not config.num_labels or config.num_labels < 1:
        raise UnsupportedArchitecture(f"{fam.name}: num_labels must be >= 1 (an identity classifier outputs the stream)")
    act = _activation(config.hidden_act)
    (ih, iw), (ph, pw) = _size2(config.image_size), _size2(config.patch_size)
    n_patches = (ih // ph) * (iw // pw)
    stream = catalogue.stream("stream", d)
    e = "vit.embeddings"
    params = {
        f"{e}.cls_token": param((1, 1, d), None, None, stream.out()),
        f"{e}.position_embeddings": param((1, n_patches + 1, d), None, None, stream.out()),
        f"{e}.patch_embeddings.projection.weight": param((d, config.num_channels, ph, pw), stream.out()),
        f"{e}.patch_embeddings.projection.bias": param((d,), stream.out()),
    }
    frag = Fragment.of(stream.factors, params)
    shape = AttentionShape(d, h, h, dh)
    qkv_bias = bool(getattr(config, "qkv_bias", True))
    for i in range(config.num_hidden_layers):
        b = f"vit.layers.{i}"
        frag = frag + catalogue.layernorm(f"{b}.layernorm_before", stream) + catalogue.layernorm(f"{b}.layernorm_after", stream)
        frag = frag + catalogue.attention(f"{b}.attention", shape, "learned", stream, bias=(qkv_bias,) * 3 + (True,))
        frag = frag + catalogue.mlp([f"{b}.mlp.fc1", f"{b}.mlp.fc2"], [d, config.intermediate_size, d], act, input_units=stream, output_units=stream)
    frag = frag + catalogue.layernorm("vit.layernorm", stream)
    frag = frag + catalogue.linear("classifier", config.num_labels, d, None, stream.inn())
    notes = [
        f"{fam.name}: pre-LN: blocks read LayerNorm(x) and add to the raw stream; the patch Conv2d's out channels, the "
        "CLS token and the position embeddings write the stream: one permutation; LayerNorm centres, so no per-channel signs",
        f"{fam.name}: learned position embeddings (no RoPE): Q/K and V/O keep GL(d_h) per head; GELU units permute",
        f"{fam.name}: not catalogued (tested on logits): per LayerNorm output a per-channel nonzero scaling (gain and "
        "bias x a_i, the readers' columns / a_i), which includes a global sign",
        f"{fam.name}: architecture {arch}; the classifier reads the final LayerNorm at the CLS position",
    ]
    return frag + Fragment.of(notes=notes)


# --------------------------------------------------------------------------------------------------- the records

_ENCODER_INERT = frozenset({"attention_probs_dropout_prob", "hidden_dropout_prob"})
_BERT_SIZES = {
    "d": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads", "ffn": "intermediate_size",
    "vocab": "vocab_size", "positions": "max_position_embeddings", "token_types": "type_vocab_size",
}


def absolute_positions(config, value) -> str | None:
    """Older configs carry ``position_embedding_type``; the installed BERT / RoBERTa implement absolute positions only
    (relative-key weights would be dropped at load), so anything else is refused."""
    if value in (None, "absolute"):
        return None
    return f"position_embedding_type {value!r}: the installed transformers implements absolute position embeddings only"


_BERT_OPTIONS = {
    "hidden_act": plain_activation,
    "position_embedding_type": absolute_positions,
    "add_cross_attention": must_be_false("cross-attention layers are not in the spec"),
    "tie_word_embeddings": handled,
}
_BERT_GROUP = (
    "one permutation of the post-LN stream shared by every embedding and LayerNorm (no signs: LayerNorm centres); "
    "heads permute; GL(d_h) on Q/K and on V/O per head (learned absolute PE); GELU units permute; the MLM head's "
    "units carry the stream permutation (decoder tied to the word embeddings)"
)

ENCODER_RECORDS: tuple[Family, ...] = (
    Family(
        "bert", _post_ln_encoder, group=_BERT_GROUP, pe="learned", norm="layernorm", norms="post", layer="bert.encoder.layer.{i}",
        tied=("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"), sizes=_BERT_SIZES,
        options=_BERT_OPTIONS, inert=_ENCODER_INERT,
    ),
    Family(
        "roberta", _post_ln_encoder, group=_BERT_GROUP + " (as BERT; padding-offset position ids only select rows)", pe="learned",
        norm="layernorm", norms="post", layer="roberta.encoder.layer.{i}",
        tied=("roberta.embeddings.word_embeddings.weight", "lm_head.decoder.weight"), sizes=_BERT_SIZES,
        options=_BERT_OPTIONS, inert=_ENCODER_INERT,
    ),
    Family(
        "vit", _vit, pe="learned", norm="layernorm", layer="vit.layers.{i}", tied=("", ""),
        group="one permutation of the pre-LN stream (patch Conv2d out channels, CLS token and position embeddings write "
        "it; LayerNorm gains move with it; no signs: LayerNorm centres); heads permute; GL(d_h) on Q/K and on V/O per "
        "head (learned PE); GELU units permute",
        sizes={
            "d": "hidden_size", "layers": "num_hidden_layers", "heads": "num_attention_heads", "ffn": "intermediate_size",
            "head_dim": "head_dim", "image": "image_size", "patch": "patch_size", "channels": "num_channels",
        },
        options={"hidden_act": plain_activation, "qkv_bias": handled},
        # encoder_stride: the masked-image-modeling decoder only; pooler_*: ViTForImageClassification has no pooler
        inert=_ENCODER_INERT | {"encoder_stride", "pooler_act", "pooler_output_size"},
    ),
)


def register(records: dict, families: dict) -> None:
    """Add the encoder records to :data:`symm.adapters.hf.RECORDS` and their builders to ``FAMILIES``."""
    from .records import _build

    for fam in ENCODER_RECORDS:
        records[fam.model_type] = fam
        families[fam.model_type] = _build(fam.model_type)


# --------------------------------------------------------------------------------------------------- evaluation data


def mask_token_id(config, tokenizer_folder=None) -> int:
    """The tokenizer's mask token when the folder ships one, else the last vocabulary id (byte tokens then fold modulo
    ``vocab_size - 1``, so the mask id never occurs as data)."""
    if tokenizer_folder is not None:
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
            if tok.mask_token_id is not None and tok.mask_token_id < config.vocab_size:
                return int(tok.mask_token_id)
        except Exception:  # noqa: BLE001 - no tokenizer: the byte fallback
            pass
    return int(config.vocab_size) - 1


def mlm_context(config) -> int:
    """Usable positions: ``max_position_embeddings`` (RoBERTa: minus the padding offset ``pad_token_id + 1``)."""
    limit = int(config.max_position_embeddings)
    if config.model_type == "roberta":
        limit -= int(config.pad_token_id or 0) + 1
    return limit


def mask_windows(windows: torch.Tensor, mask_id: int, seed: int = 0, fraction: float = MASK_FRACTION) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)``: ``fraction`` of the positions of every window (at least one) replaced by ``mask_id``
    (seeded); labels are the original tokens there and -100 elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    n, length = windows.shape
    k = max(1, round(fraction * length))
    order = torch.rand(n, length, generator=gen).argsort(dim=1)[:, :k]
    masked = torch.zeros(n, length, dtype=torch.bool).scatter_(1, order, True)
    inputs = torch.where(masked, torch.full_like(windows, mask_id), windows)
    labels = torch.where(masked, windows, torch.full_like(windows, -100))
    return inputs, labels


def image_shape(config) -> tuple[int, int, int]:
    """``(num_channels, H, W)`` of a ViT's ``pixel_values``."""
    return (config.num_channels, *_size2(config.image_size))


def digit_images(config, seed: int = 0):
    """scikit-learn digits as ``pixel_values`` for a ViT: ``(n, num_channels, H, W)`` (grey replicated over channels,
    resized bilinearly when ``image_size`` is not 8), with the 10 labels; refuses a classifier with fewer outputs."""
    from ...data import digits

    if config.num_labels < 10:
        raise DataError(f"the digits evaluation has 10 classes; this ViT has num_labels={config.num_labels}")
    split = digits(seed=seed)
    size = _size2(config.image_size)

    def images(x: torch.Tensor) -> torch.Tensor:
        img = x.reshape(-1, 1, 8, 8)
        if size != (8, 8):
            img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", align_corners=False)
        return img.expand(-1, config.num_channels, -1, -1).contiguous()

    return images(split.x_train), split.y_train, images(split.x_test), split.y_test

