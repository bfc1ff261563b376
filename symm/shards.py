"""Hugging Face safetensors folders read and written tensor by tensor, without instantiating the torch model.

For alignment at scale (``symm align --barrier none``): weights are memory-mapped from the shards
(``safetensors.safe_open``: a tensor's pages are read when first touched, no copy is made), the aligned model is
written shard by shard in B's own layout (same shard files, same index, same dtype) with the config, tokenizer
and side files copied, and a model skeleton with parameters on the meta device computes logits from any state
dict (``load_state_dict(assign=True)``), so checking the function needs no second copy of the weights.

A folder qualifies (:func:`lazy_layout`) when every weight file is ``.safetensors`` and its on-disk keys are the
in-memory state dict's (dense families; a tied head is the embedding's tensor under both keys). MoE families whose
``transformers`` layout differs on disk (fused experts) do not, and are loaded with ``from_pretrained`` instead.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError
from .io import assert_finite, first_line, safetensors_header

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".msgpack", ".h5")


@dataclass
class LazyFolder:
    """A ``save_pretrained`` folder's weights as memory-mapped tensors (``key -> shard`` from the index)."""

    path: Path
    config: object
    shards: dict[str, list[str]]  # shard file name -> keys stored in it, in file order
    aliases: dict[str, str] = field(default_factory=dict)  # in-memory key -> on-disk key (tied head)
    _handles: dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def disk_keys(self) -> list[str]:
        return [k for keys in self.shards.values() for k in keys]

    def _handle(self, shard: str):
        from safetensors import safe_open

        if shard not in self._handles:
            try:
                self._handles[shard] = safe_open(str(self.path / shard), framework="pt", device="cpu")
            except Exception as exc:  # noqa: BLE001
                raise CheckpointError(f"{self.path / shard}: cannot read ({type(exc).__name__}: {first_line(exc)})") from None
        return self._handles[shard]

    def tensor(self, key: str) -> torch.Tensor:
        """One tensor, memory-mapped (pages are read from the file when touched)."""
        key = self.aliases.get(key, key)
        for shard, keys in self.shards.items():
            if key in keys:
                try:
                    return self._handle(shard).get_tensor(key)
                except Exception as exc:  # noqa: BLE001
                    raise CheckpointError(f"{self.path / shard}: cannot read {key} ({type(exc).__name__}: {first_line(exc)})") from None
        raise KeyError(key)

    def state_dict(self, check_finite: bool = True, copy: bool = False) -> dict[str, torch.Tensor]:
        """The in-memory state dict, aliases sharing their target's tensor. Every tensor is memory-mapped, or with
        ``copy`` read through the mapping into its own memory (the mapping is then released): tensors that a
        caller replaces can be freed one by one, which a shared file mapping does not allow."""
        out: dict[str, torch.Tensor] = {}
        for shard, keys in self.shards.items():
            handle = self._handle(shard)
            for key in keys:
                value = handle.get_tensor(key)
                if check_finite:
                    assert_finite({key: value}, what=str(self.path / shard))
                out[key] = value.clone() if copy else value
            if copy:
                self._handles.pop(shard, None)
        for key, target in self.aliases.items():
            out[key] = out[target]
        return out

    def read(self, keys: list[str], check_finite: bool = True) -> dict[str, torch.Tensor]:
        """Copies of some tensors, the shard mappings released afterwards (nothing of the file stays mapped)."""
        out = {}
        try:
            for key in keys:
                value = self.tensor(key)
                if check_finite:
                    assert_finite({key: value}, what=str(self.path))
                out[key] = value.clone()
                del value
        finally:
            self.close()
        return out

    def check_finite(self) -> int:
        """Every tensor finite (read shard by shard, nothing kept); returns the number of tensors read."""
        n = 0
        for shard, keys in self.shards.items():
            handle = self._handle(shard)
            for key in keys:
                assert_finite({key: handle.get_tensor(key)}, what=str(self.path / shard))
                n += 1
            self._handles.pop(shard, None)
        return n

    def dtypes(self) -> dict[str, str]:
        """The stored dtype of every in-memory key, from the shard headers (nothing is read)."""
        out = {}
        for shard, keys in self.shards.items():
            header = safetensors_header(self.path / shard)
            for key in keys:
                out[key] = header[key]["dtype"]
        for key, target in self.aliases.items():
            out[key] = out[target]
        return out

    def close(self) -> None:
        self._handles.clear()


def shard_table(folder: Path) -> dict[str, list[str]] | None:
    """``shard -> keys`` of a folder whose weights are all safetensors (index or a single file), else ``None``."""
    files = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack"))
    if not files or any(not f.endswith(".safetensors") for f in files):
        return None
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(f"{index}: not a readable weight index") from None
        table: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            table.setdefault(shard, []).append(key)
        missing = sorted(s for s in table if not (folder / s).is_file())
        if missing:
            raise CheckpointError(f"{index} names shards that do not exist: {', '.join(missing[:6])}")
        for shard, keys in table.items():  # the index must agree with the shards' own headers
            stored = set(safetensors_header(folder / shard))
            if stored != set(keys):
                raise CheckpointError(f"{index} does not match {shard}: keys {sorted(stored ^ set(keys))[:4]} differ")
        return table
    if len(files) != 1:
        return None  # several files and no index: let from_pretrained decide
    return {files[0]: list(safetensors_header(folder / files[0]))}


def lazy_layout(folder: Path, config, spec_params: Mapping[str, object]) -> LazyFolder | None:
    """The folder as a :class:`LazyFolder` when its on-disk keys are the Spec's (in-memory) keys, else ``None``."""
    table = shard_table(folder)
    if table is None:
        return None
    disk = {k for keys in table.values() for k in keys}
    aliases = {}
    if HEAD in spec_params and HEAD not in disk and EMBED in disk and getattr(config, "tie_word_embeddings", False):
        aliases[HEAD] = EMBED
    if disk | set(aliases) != set(spec_params):
        log.info("%s: on-disk keys differ from the in-memory layout; loading with from_pretrained", folder)
        return None
    return LazyFolder(folder, config, table, aliases)


def check_shapes(folder: LazyFolder, spec) -> None:
    """Every tensor has the shape the config implies (headers only; nothing is read)."""
    bad = []
    for shard, keys in folder.shards.items():
        header = safetensors_header(folder.path / shard)
        for key in keys:
            shape = tuple(header[key]["shape"])
            if key in spec.params and shape != tuple(spec.params[key].shape):
                bad.append(f"wrong shape {key}: {shape} vs {tuple(spec.params[key].shape)} from config.json")
    if bad:
        raise CheckpointError(f"{folder.path}: the weights do not match config.json: {', '.join(bad[:8])}")


#: torch dtype -> safetensors dtype name
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


def stream_save(path: Path, layout: Mapping[str, dict], tensor_of: Callable[[str], torch.Tensor], metadata: Mapping[str, str] | None,
                after_tensor: Callable[[str], None] | None = None) -> None:
    """Write one ``.safetensors`` file tensor by tensor (one tensor in memory at a time).

    ``layout``: the file's table (``key -> {dtype, shape, data_offsets}``, a source file's header): the same keys,
    dtypes, shapes and byte ranges are written, in offset order; each ``tensor_of(key)`` must match its entry."""
    order = sorted(layout, key=lambda k: int(layout[k]["data_offsets"][0]))
    header: dict[str, object] = {k: {"dtype": layout[k]["dtype"], "shape": list(layout[k]["shape"]), "data_offsets": list(layout[k]["data_offsets"])} for k in order}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        position = 0
        for key in order:
            start, stop = (int(x) for x in layout[key]["data_offsets"])
            tensor = tensor_of(key).contiguous()
            if SAFETENSORS_DTYPES.get(tensor.dtype) != layout[key]["dtype"] or list(tensor.shape) != list(layout[key]["shape"]):
                raise OSError(f"cannot write {path}: {key} is {tensor.dtype} {list(tensor.shape)}, the layout says {layout[key]['dtype']} {layout[key]['shape']}")
            if start != position:
                raise OSError(f"cannot write {path}: the layout's byte ranges have a hole before {key}")
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            position = stop
            del tensor, data
            if after_tensor is not None:
                after_tensor(key)


def write_like(source: LazyFolder, dest: Path, tensor_of: Callable[[str], torch.Tensor], after_shard: Callable[[str], None] | None = None) -> None:
    """Write ``dest`` in ``source``'s layout: every shard with the same name, keys, dtypes, byte ranges and metadata
    (index, config, tokenizer and side files copied), each tensor from ``tensor_of(key)``, written one tensor at a time
    with the source's mappings released after each (one tensor of each in memory, whatever the shard size)."""
    dest.mkdir(parents=True, exist_ok=False)
    for shard in source.shards:
        metadata = source._handle(shard).metadata() or {"format": "pt"}
        table = safetensors_header(source.path / shard)
        stream_save(dest / shard, table, tensor_of, metadata, after_tensor=lambda _key: source.close())
        if after_shard is not None:
            after_shard(shard)
    for extra in source.path.iterdir():
        if extra.is_file() and (extra.name == INDEX or not extra.name.endswith(_WEIGHT_SUFFIXES)):
            shutil.copy2(extra, dest / extra.name)


# ----- a model skeleton that computes logits from any state dict ---------------------------------------------------
def skeleton(config) -> torch.nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device (buffers such as RoPE tables real):
    no weight memory until a state dict is assigned."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def logits_probe(config, tokens: torch.Tensor, dtype: torch.dtype) -> Callable[[Mapping[str, torch.Tensor]], list[torch.Tensor]]:
    """``params -> [logits on tokens]``, computed in ``dtype`` by the real ``transformers`` forward pass."""
    model = skeleton(config)

    @torch.no_grad()
    def probe(params: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        cast = {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in params.items()}
        model.load_state_dict(cast, strict=True, assign=True)
        try:
            return [model(tokens).logits]
        finally:
            for name, _ in list(model.named_parameters()):  # release the assigned weights
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                setattr(module, attr, torch.nn.Parameter(torch.empty_like(getattr(module, attr), device="meta"), requires_grad=False))

    return probe
