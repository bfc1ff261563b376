"""Load and check a checkpoint for alignment: a bare state dict file or a Hugging Face ``save_pretrained`` folder.

Every problem becomes a :class:`CheckpointError` (or :class:`UnsupportedArchitecture`) with one clear message:
unreadable or corrupt config, truncated or corrupt weight files, weights that do not match the config, NaN/Inf.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .adapters import FAMILIES, is_hf_folder, spec_from_hf
from .errors import CheckpointError, UnsupportedArchitecture
from .io import first_line, assert_finite, check_weights_file, checkpoint_format, load_state_dict, safetensors_header

log = logging.getLogger(__name__)

#: config entries that say nothing about the architecture
_NOT_ARCHITECTURE = {"_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_commit_hash", "output_attentions"}


@dataclass
class Checkpoint:
    path: Path
    fmt: str  # "safetensors" | "torch" | "hf"
    params: dict[str, torch.Tensor]
    model: nn.Module | None = None


def hf_config(folder: str | os.PathLike):
    """The config of a ``save_pretrained`` folder, or a clear error (missing, not JSON, unknown model type)."""
    from .adapters.hf import load_config

    folder = Path(folder)
    try:
        config = load_config(folder)
    except UnsupportedArchitecture:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers raises OSError, ValueError, KeyError, ...
        raise CheckpointError(f"{folder / 'config.json'}: cannot read the model config ({type(exc).__name__}: {first_line(exc)})") from None
    if getattr(config, "model_type", None) not in FAMILIES:
        spec_from_hf(config)  # raises the clear "no adapter" error
    return config


def hf_weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder; shards named by an index file must exist."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            raise CheckpointError(f"{index}: not a readable weight index") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing[:6])}")
    return files


def check_hf_weights(folder: str | os.PathLike) -> tuple[int, int]:
    """Check every weight file of a folder completely (lengths, headers, finite values): ``(files, tensors)``."""
    files = hf_weight_files(Path(folder))
    return len(files), sum(check_weights_file(f) for f in files)


def _load_hf(folder: Path) -> nn.Module:
    from .adapters.hf.encoders import auto_class
    from .adapters.hf.gauge import gauge_model

    model_class = auto_class(hf_config(folder))  # the causal LM, or an encoder's head class (config.architectures)
    files = hf_weight_files(folder)
    if not files:
        raise CheckpointError(f"{folder}: a config.json but no weight files (*.safetensors or *.bin)")
    for f in files:
        if f.suffix == ".safetensors":
            safetensors_header(f)
    try:
        model, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{folder}: cannot load the Hugging Face model ({type(exc).__name__}: {first_line(exc)})") from None
    bad = [f"missing {k}" for k in info.get("missing_keys", [])] + [f"wrong shape {k[0] if isinstance(k, tuple) else k}" for k in info.get("mismatched_keys", [])]
    if bad:
        raise CheckpointError(f"{folder}: the weights do not match config.json: {', '.join(map(str, bad[:8]))}")
    return gauge_model(model).eval()


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checked checkpoint: HF folder (model loaded) or a flat state dict file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_hf_folder(path):
        model = _load_hf(path)
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert_finite(params, what=str(path))
        return Checkpoint(path, "hf", params, model)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder without config.json is not a checkpoint")
    return Checkpoint(path, checkpoint_format(path), load_state_dict(path))


def config_difference(a, b) -> str:
    """What differs between two configs: the model types, else the differing architecture entries."""
    if a.model_type != b.model_type:
        return f"model types differ: {a.model_type} vs {b.model_type}"
    da, db = a.to_dict(), b.to_dict()
    keys = sorted(k for k in set(da) | set(db) if k not in _NOT_ARCHITECTURE and da.get(k) != db.get(k))
    return "; ".join(f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in keys[:8])


def spec_difference(a, b) -> str:
    """What differs between two Specs: parameters only in one, shapes, factors."""
    only_a, only_b = sorted(set(a.params) - set(b.params)), sorted(set(b.params) - set(a.params))
    out = []
    if only_a:
        out.append(f"parameters only in A: {', '.join(only_a[:4])}" + (" ..." if len(only_a) > 4 else ""))
    if only_b:
        out.append(f"parameters only in B: {', '.join(only_b[:4])}" + (" ..." if len(only_b) > 4 else ""))
    shapes = [f"{k}: {a.params[k].shape} vs {b.params[k].shape}" for k in sorted(set(a.params) & set(b.params)) if a.params[k].shape != b.params[k].shape]
    out += shapes[:4]
    if not out and len(a.factors) != len(b.factors):
        out.append(f"{len(a.factors)} vs {len(b.factors)} symmetry factors")
    return "; ".join(out) or "their symmetry groups differ"


def hf_architecture_difference(a: Checkpoint, b: Checkpoint) -> str | None:
    """``None`` if A and B (HF models) have the same Spec, else a message naming what differs."""
    spec_a, spec_b = spec_from_hf(a.model), spec_from_hf(b.model)
    if spec_a == spec_b:
        return None
    what = config_difference(a.model.config, b.model.config) or spec_difference(spec_a, spec_b)
    return f"{a.path} and {b.path} have different architectures ({spec_a.name} vs {spec_b.name}): {what}"
