"""Save and load a metanetwork: its NNX state as safetensors, its class and config as JSON (no orbax needed).

A checkpoint folder holds ``state.safetensors`` (every variable, parameters and fitted statistics alike, keyed by its
path ``mlp/layers/0/kernel``) and ``config.json``::

    {"format": "symm-metanet", "format_version": 1, "model": "StatNN", "config": {...}, "variables": {path: type},
     "metadata": {...}}   # metadata: free JSON (training config, metrics)

A model class ``C`` is loadable when ``C(C.config_from_json(d), rngs=nnx.Rngs(0))`` rebuilds it from the JSON of
``dataclasses.asdict(model.config)``; the baselines are, and :func:`load_checkpoint` takes other classes by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from symm.errors import CheckpointError

from .baselines import BASELINES

FORMAT = "symm-metanet"
FORMAT_VERSION = 1
STATE = "state.safetensors"
CONFIG = "config.json"


def _key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def flat_arrays(model: nnx.Module) -> dict[str, tuple[str, np.ndarray]]:
    """``{path: (variable type, numpy array)}`` of every variable of ``model``."""
    return {_key(p): (type(v).__name__, np.asarray(v.get_value())) for p, v in nnx.to_flat_state(nnx.state(model))}


def save_checkpoint(folder: str | Path, model: nnx.Module, metadata: Mapping | None = None) -> Path:
    """Write ``model`` (state and config) to ``folder`` (created; files replaced atomically)."""
    config = getattr(model, "config", None)
    if not dataclasses.is_dataclass(config):
        raise CheckpointError(f"{type(model).__name__} has no dataclass ``config``: cannot record how to rebuild it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = flat_arrays(model)
    info = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": type(model).__name__,
            "config": json.loads(json.dumps(dataclasses.asdict(config))),
            "variables": {k: t for k, (t, _) in arrays.items()}, "metadata": dict(metadata or {})}
    tmp_state, tmp_config = folder / f".tmp-{STATE}", folder / f".tmp-{CONFIG}"
    save_file({k: np.ascontiguousarray(a) for k, (_, a) in arrays.items()}, str(tmp_state))
    tmp_config.write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp_state, folder / STATE)
    os.replace(tmp_config, folder / CONFIG)
    return folder


def read_config(folder: str | Path) -> dict:
    """``config.json`` of a checkpoint folder, format checked."""
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path} not found: not a metanetwork checkpoint folder")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
    if info.get("format") != FORMAT or not isinstance(info.get("format_version"), int):
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint config")
    if info["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {info['format_version']}; this reader knows {FORMAT_VERSION}")
    return info


def load_checkpoint(folder: str | Path, models: Mapping[str, type] = BASELINES) -> tuple[nnx.Module, dict]:
    """The model saved in ``folder`` and its ``config.json``; ``models`` maps class names to loadable classes."""
    folder = Path(folder)
    info = read_config(folder)
    cls = models.get(info["model"])
    if cls is None:
        raise CheckpointError(f"{folder}: model class {info['model']!r} is not among {', '.join(models)}")
    model = cls(cls.config_from_json(info["config"]), rngs=nnx.Rngs(0))
    saved = load_file(str(folder / STATE))
    flat = nnx.to_flat_state(nnx.state(model))
    want = {_key(p) for p, _ in flat}
    if want != set(saved):
        raise CheckpointError(f"{folder / STATE}: missing {sorted(want - set(saved))}, unexpected {sorted(set(saved) - want)}")
    updated = []
    for path, var in flat:
        array = saved[_key(path)]
        if array.shape != np.shape(var.get_value()):
            raise CheckpointError(f"{folder / STATE}: {_key(path)} has shape {array.shape}, the model expects {np.shape(var.get_value())}")
        updated.append((path, var.replace(jnp.asarray(array))))
    nnx.update(model, nnx.from_flat_state(updated))
    return model, info
