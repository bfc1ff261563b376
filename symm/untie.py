"""``symm untie``: write an untied copy of a checkpoint whose LM head is tied to its token embedding.

With tied embeddings E is both the first stream writer and the last reader, so the residual stream only admits
O with O diag(g) O^T diagonal (g: the final norm's gain): signed permutations, and for LayerNorm permutations.
The untied copy holds the same function (lm_head = a copy of E, ``tie_word_embeddings: false``); on it the
orthogonal stream exists (``symm align --stream orthogonal``). Untying is never done silently by ``symm align``:
this command is the explicit step, and its output is a new folder (the input is never modified).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .checkpoint import Checkpoint, hf_config, load_checkpoint
from .errors import CheckpointError, OutputError, UsageError
from .publish import publish, staged_output

log = logging.getLogger(__name__)

#: files ``save_pretrained`` writes (every other regular file of the input, e.g. the tokenizer's, is copied)
WRITTEN = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def _check_paths(src: Path, out: Path) -> None:
    if os.path.lexists(out):
        raise OutputError(f"{out} already exists; untie writes a new folder (choose another name)")
    real_src, real_out = os.path.realpath(src), os.path.realpath(out)
    if real_out == real_src or real_out.startswith(real_src.rstrip(os.sep) + os.sep):
        raise OutputError(f"{out} is inside the input folder {src}; inputs are never modified")


def tied_pair(model: nn.Module) -> tuple[str, str]:
    """(embedding key, LM-head key) of a model whose head weight is its input embedding (one tensor)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        raise UsageError(f"{type(model).__name__} has no input embedding and output head pair to untie")
    if head.weight is not embed.weight and head.weight.data_ptr() != embed.weight.data_ptr():
        raise CheckpointError("config.json says the embeddings are tied, but the loaded LM head is a separate tensor")
    names = {id(m): n for n, m in model.named_modules()}
    return f"{names[id(embed)]}.weight", f"{names[id(head)]}.weight"


def untied_model(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with ``tie_word_embeddings`` false and its LM head a separate copy of the embedding."""
    from .adapters.hf.encoders import auto_class

    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = False
    for sub in ("text_config", "decoder"):  # composite configs carry the flag on a sub-config as well
        if hasattr(getattr(config, sub, None), "tie_word_embeddings"):
            setattr(getattr(config, sub), "tie_word_embeddings", False)
    embed_key, head_key = tied_pair(model)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state[head_key] = state[embed_key].clone()
    cls = auto_class(config)
    new = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    new = new.to(next(model.parameters()).dtype)  # the checkpoint's own dtype (from_config builds the default one)
    new.load_state_dict(state, strict=True)
    if new.get_output_embeddings().weight.data_ptr() == new.get_input_embeddings().weight.data_ptr():
        raise CheckpointError(f"{type(model).__name__}: the LM head stays tied with tie_word_embeddings false")
    return new.eval()


@torch.no_grad()
def logits_difference(a: nn.Module, b: nn.Module, vocab: int, seed: int = 0) -> float:
    """max |logits_a - logits_b| / max |logits_a| on random token windows (4 x 16)."""
    x = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(seed))
    la, lb = a(x).logits.double(), b(x).logits.double()
    return float((la - lb).abs().max() / la.abs().max().clamp_min(1e-30))


def untie(src: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the untied copy of the tied Hugging Face checkpoint ``src`` to the new folder ``out`` (all or nothing);
    returns a report (keys, the logits difference of the written copy, which must be 0 up to float rounding)."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file():
        raise UsageError(f"{src}: not a Hugging Face model folder (untie reads save_pretrained folders)")
    config = hf_config(src)
    if not getattr(config, "tie_word_embeddings", False):
        raise UsageError(f"{src}: the embeddings are not tied (tie_word_embeddings is false); nothing to untie")
    if config.model_type == "gpt_neox":  # held gauged in memory (symm.adapters.hf.gauge); untied by default anyway
        raise UsageError(f"{src}: untie does not handle gpt_neox checkpoints")
    _check_paths(src, out)
    ckpt: Checkpoint = load_checkpoint(src)  # weights complete, shapes right, finite
    model = ckpt.model
    embed_key, head_key = tied_pair(model)
    new = untied_model(model)
    vocab = model.get_input_embeddings().weight.shape[0]
    in_memory = logits_difference(model, new, vocab)
    if in_memory > 1e-6:
        raise CheckpointError(f"{src}: the untied copy changes the logits (relative {in_memory:.1e}); nothing written")
    copied = [p for p in sorted(src.iterdir()) if p.is_file() and p.name not in WRITTEN and p.suffix not in WEIGHT_SUFFIXES
              and not p.name.endswith(".index.json") and not p.name.startswith(".")]
    with staged_output(out, lambda: _check_paths(src, out)) as stage:
        new.save_pretrained(stage)
        for p in copied:
            shutil.copy2(p, stage / p.name)
        written = load_checkpoint(stage)
        if written.model.config.tie_word_embeddings:
            raise CheckpointError(f"{stage}: the written config still ties the embeddings")
        on_disk = logits_difference(model, written.model, vocab)
        if on_disk > 1e-6:
            raise CheckpointError(f"the written untied copy changes the logits (relative {on_disk:.1e}); nothing published")
        names = sorted(p.name for p in stage.iterdir())
        publish(stage, out, names)
    log.info("untied %s -> %s (%s is a copy of %s)", src, out, head_key, embed_key)
    return {"source": str(src), "out": str(out), "model_type": config.model_type, "embedding": embed_key, "lm_head": head_key,
            "copied": [p.name for p in copied], "logits_difference": on_disk}


__all__ = ["untie", "untied_model", "tied_pair"]
