"""Checkpoint I/O for flat state dicts: ``.safetensors`` and torch ``.pt``/``.pth``/``.bin`` (``weights_only=True``).

Reading never modifies a file; writing is atomic (temporary file + rename) and refuses to overwrite an
existing file unless asked, and never overwrites a protected input.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
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

            safetensors_header(path)
            data = load_file(str(path), device="cpu")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:
        raise CheckpointError(_pickled_objects_message(path, exc)) from None
    except Exception as exc:  # noqa: BLE001 - every reader error becomes one clear message
        raise CheckpointError(f"{path}: cannot read as {fmt} checkpoint ({type(exc).__name__}: {first_line(exc)})") from None
    params = _as_flat_tensors(data, path)
    if check_finite:
        assert_finite(params, what=str(path))
    return params


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:limit]


def _pickled_objects_message(path: Path, exc: BaseException) -> str:
    """A refused ``weights_only`` load: the file pickles Python objects, which we never unpickle."""
    found = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    what = f" (it refers to {', '.join(dict.fromkeys(found))})" if found else ""
    return (
        f"{path}: the file holds pickled Python objects, not only tensors{what}; it was not loaded, because "
        "unpickling arbitrary objects can run code. Save a plain state dict instead: "
        "torch.save(model.state_dict(), path) or safetensors.torch.save_file(model.state_dict(), path)"
    )


#: bytes per element of the safetensors dtypes
SAFETENSORS_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
    "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: cannot read as a safetensors checkpoint: {why}")


def safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor table of a ``.safetensors`` file, after checking it against the file's length.

    Raises :class:`CheckpointError` naming the problem (truncated file, header not JSON, sizes that disagree).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise _bad(path, f"not a safetensors file, or truncated ({size} bytes, no complete header)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise _bad(path, "not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (its header is not a table)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, info in tensors.items():
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            numel = math.prod(int(d) for d in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise _bad(path, f"not a safetensors file (bad entry for {name!r})") from None
        itemsize = SAFETENSORS_ITEMSIZE.get(info.get("dtype"))
        if itemsize is not None and stop - start != numel * itemsize:
            raise _bad(path, f"corrupt: {name} has {stop - start} bytes for {numel} {info['dtype']} values")
        end = max(end, stop)
    data = size - 8 - n
    if end > data:
        raise _bad(path, f"truncated: its header describes {end} bytes of tensor data but the file holds {data} (an interrupted copy or download?)")
    if end < data:
        raise _bad(path, f"corrupt: {data - end} bytes after the last tensor")
    return tensors


def check_weights_file(path: str | os.PathLike) -> int:
    """Check one weights file completely (header, length, every tensor finite), one tensor at a time.

    Returns the number of tensors; raises :class:`CheckpointError`.
    """
    path = Path(path)
    if checkpoint_format(path) != "safetensors":
        return len(load_state_dict(path))
    from safetensors import safe_open

    count = len(safetensors_header(path))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                assert_finite({name: f.get_tensor(name)}, what=str(path))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot read as safetensors ({type(exc).__name__}: {first_line(exc)})") from None
    return count


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
    dtypes = [f"{k} ({str(a[k].dtype)[6:]} vs {str(b[k].dtype)[6:]})" for k in sorted(a) if a[k].dtype != b[k].dtype]
    if dtypes:
        raise CheckpointError(
            f"{names[0]} and {names[1]} store weights in different dtypes: {', '.join(dtypes[:6])}"
            + (" ..." if len(dtypes) > 6 else "") + "; convert one so that both use the same dtype"
        )


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


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    """The mode ``open``/``mkdir`` would give a new file or folder under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def atomic_write(path: Path, write) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The result gets the umask's default mode (not ``mkstemp``'s 0600).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically (temporary file in the same folder, then rename)."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))
