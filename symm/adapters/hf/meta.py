"""Each spec built from a config is checked against the model ``transformers`` builds from it on the meta device."""

from __future__ import annotations

import copy

from ...errors import SpecError, UnsupportedArchitecture
from ...spec import Spec


_META_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}
#: config entries that do not change the model built (the cache key ignores them)
_BOOKKEEPING = frozenset({"_name_or_path", "transformers_version", "architectures", "_commit_hash"})


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the causal LM ``transformers`` builds from ``config``, on the meta device (no memory)."""
    import json

    import torch

    from .encoders import build_model

    values = {k: v for k, v in config.to_dict().items() if k not in _BOOKKEEPING}
    key = json.dumps(values, sort_keys=True, default=str)
    if key not in _META_CACHE:
        try:
            with torch.device("meta"):
                model = build_model(copy.deepcopy(config))  # causal LM, or an encoder's head class
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
