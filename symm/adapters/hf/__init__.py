"""Hugging Face adapters: ``spec_from_hf(model | config | folder)``, one declarative :class:`Family` per ``model_type``.

Supported: GPT-2, GPT-NeoX (Pythia), XGLM, Llama, Mistral, Qwen2, Qwen3, OLMo2, Phi-3, Gemma, Gemma2, Gemma3, Mixtral, Qwen2-MoE, OLMoE,
Qwen3-MoE, Dots1 (DeepSeek-V3-style sigmoid router). Refused with the reason (:data:`REFUSED`): multi-head latent attention (DeepSeek-V2/V3 and every config
with ``kv_lora_rank``). A family is data: its layer
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

import os
from pathlib import Path

from ...errors import SpecError, UnsupportedArchitecture
from ...spec import Spec
from . import encoders as _encoders
from .family import Family
from .gauge import checkpoint_state_dict, gauge_model, is_gauged
from .meta import check_against_meta, meta_shapes
from .records import FAMILIES, RECORDS, REFUSED, family_spec, refusal


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
        try:
            spec.check_params(model_or_config.state_dict(), what=f"{type(model_or_config).__name__} weights")
        except SpecError as exc:
            if fam.model_type == "gpt_neox" and not is_gauged(model_or_config):
                raise SpecError(
                    f"{exc}. GPT-NeoX is read gauged: call symm.adapters.hf.gauge_model(model) first (same function; "
                    "query_key_value held as contiguous q/k/v blocks)"
                ) from None
            raise
    elif check_meta:
        check_against_meta(spec, config)
    return spec


def load_hf(folder: str | os.PathLike, dtype=None):
    """Load a causal LM (or a supported encoder's head model) from a ``save_pretrained`` folder (offline, CPU), in
    eval mode, gauged (:func:`gauge_model`: GPT-NeoX's fused per-head QKV held as contiguous blocks)."""
    config = load_config(folder)
    if config.model_type not in FAMILIES:
        spec_from_hf(config)  # raises the clear error
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    model = _encoders.auto_class(config).from_pretrained(str(folder), **kwargs)  # causal LM, or an encoder's head class
    return gauge_model(model).eval()


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


_encoders.register(RECORDS, FAMILIES)  # encoder families (BERT, RoBERTa, ViT) live in encoders.py

__all__ = [
    "FAMILIES",
    "RECORDS",
    "REFUSED",
    "Family",
    "check_against_meta",
    "checkpoint_state_dict",
    "gauge_model",
    "is_gauged",
    "family_spec",
    "is_hf_folder",
    "load_config",
    "load_hf",
    "meta_shapes",
    "refusal",
    "spec_from_hf",
]
