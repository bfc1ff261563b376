"""``manifest.json`` of a zoo: format version, architectures (reference-model configs), dataset, search space.

Format version 1 (this module writes it; a reader refuses newer versions):

```
{"format": "symm-zoo", "format_version": 1,
 "architectures": {"<arch id>": {"type": "MLPConfig", "sizes": [...], ...}, ...},
 "dataset": {"name": "digits", "split_seed": 0, "sizes": {"train": .., "val": .., "test": ..}},
 "space": {...search space...}, "seed": 0, "checkpoint_epochs": [...], "batch_size": 64,
 "columns": {"<metadata column>": "<meaning>", ...}}
```
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import CheckpointError
from ..models import MODEL_CLASSES

FORMAT = "symm-zoo"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
METADATA = "metadata.csv"
SHARDS = "shards"


def config_types() -> dict[str, type]:
    """Reference-model config classes by name (the architectures a zoo may name)."""
    return {cls.__name__: cls for cls in MODEL_CLASSES}


def config_to_json(config: object) -> dict:
    if type(config).__name__ not in config_types():
        raise CheckpointError(f"{type(config).__name__} is not a reference-model config ({', '.join(config_types())})")
    return {"type": type(config).__name__, **json.loads(json.dumps(dataclasses.asdict(config)))}


def config_from_json(data: Mapping) -> object:
    data = dict(data)
    name = data.pop("type", None)
    cls = config_types().get(name)
    if cls is None:
        raise CheckpointError(f"unknown architecture config type {name!r} (known: {', '.join(config_types())})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise CheckpointError(f"{name}: unknown fields {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def arch_id(config: object) -> str:
    """A readable, stable name for an architecture, e.g. ``mlp-64-32-10-relu-a1b2`` (its Spec name and a hash of
    its config JSON, so configs the Spec name does not tell apart get different ids)."""
    from ..models import spec_for

    blob = json.dumps(config_to_json(config), sort_keys=True).encode()
    name = re.sub(r"[^a-z0-9]+", "-", spec_for(config).name.lower()).strip("-")
    return f"{name}-{hashlib.sha1(blob).hexdigest()[:4]}"


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder} is not a zoo: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a symm zoo manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    version = data.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has zoo format version {version}, newer than this symm reads ({FORMAT_VERSION}); upgrade symm"
        )
    return data


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` by temp file, fsync and rename (readers see the old or the new file, whole)."""
    tmp = path.parent / f".tmp-{path.name}.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
