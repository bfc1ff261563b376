"""Checkpoint I/O for flat state dicts: ``.safetensors`` and torch ``.pt``/``.pth``/``.bin`` (``weights_only=True``).

Reading never modifies a file; writing is atomic (temporary file + rename) and refuses to overwrite an
existing file unless asked, and never overwrites a protected input.
"""

from __future__ import annotations

import logging

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def checkpoint_format(path: str | os.PathLike) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise CheckpointError(f"{path}: unknown checkpoint suffix {suffix!r}; use .safetensors or one of {', '.join(TORCH_SUFFIXES)}")


def load_state_dict(path: str | os.PathLike, *, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read a flat ``name -> tensor`` dict; raise :class:`CheckpointError` on any problem."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    fmt = checkpoint_format(path)
    try:
        if fmt == "safetensors":
            from safetensors.torch import load_file

            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader error becomes one clear message
        raise CheckpointError(f"{path}: cannot read as {fmt} checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    params = _as_flat_tensors(data, path)
    if check_finite:
        assert_finite(params, what=str(path))
    return params


def _as_flat_tensors(data: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(data, Mapping) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        for key in WRAPPER_KEYS:
            if isinstance(data.get(key), Mapping):
                log.info("%s: using the state dict under %r", path, key)
                data = data[key]
                break
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(data).__name__}")
    bad = [str(k) for k, v in data.items() if not isinstance(v, torch.Tensor) or not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not named tensors: {', '.join(bad[:8])}")
    if not data:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    return dict(data)


def assert_finite(params: Mapping[str, torch.Tensor], what: str = "parameters") -> None:
    """Raise :class:`CheckpointError` naming every tensor holding NaN or Inf."""
    bad = []
    for name, value in params.items():
        if torch.is_floating_point(value) and not bool(torch.isfinite(value).all()):
            n_nan = int(torch.isnan(value).sum())
            n_inf = int(torch.isinf(value).sum())
            bad.append(f"{name} ({n_nan} NaN, {n_inf} Inf)")
    if bad:
        raise CheckpointError(f"{what}: non-finite weights in {', '.join(bad[:8])}" + (" ..." if len(bad) > 8 else ""))


def compare_state_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], names: tuple[str, str] = ("A", "B")) -> None:
    """Raise :class:`CheckpointError` if the two state dicts differ in keys or shapes."""
    problems = []
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a:
        problems.append(f"keys only in {names[0]}: {', '.join(only_a[:8])}")
    if only_b:
        problems.append(f"keys only in {names[1]}: {', '.join(only_b[:8])}")
    for k in sorted(set(a) & set(b)):
        if tuple(a[k].shape) != tuple(b[k].shape):
            problems.append(f"{k}: {tuple(a[k].shape)} in {names[0]} vs {tuple(b[k].shape)} in {names[1]}")
    if problems:
        raise CheckpointError(f"{names[0]} and {names[1]} are not the same architecture: " + "; ".join(problems[:10]))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def save_state_dict(
    params: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``params`` atomically in the format given by the suffix.

    Refuses to replace an existing file unless ``overwrite``; never replaces a path in ``protect`` (the inputs).
    """
    path = Path(path)
    fmt = checkpoint_format(path)
    for p in protect:
        if _same_file(path, Path(p)):
            raise CheckpointError(f"{path}: refusing to overwrite an input checkpoint")
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    assert_finite(params, what=f"refusing to write {path}")
    tensors = {k: v.detach().contiguous().clone() for k, v in params.items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        return atomic_write(path, lambda tmp: save_file(tensors, tmp))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
