"""The user's own evaluation data (``symm align --data FILE|DIR``), read offline and checked.

* Text for language models: a UTF-8 file, tokenised by the checkpoint folder's own tokenizer when the folder has
  one (``AutoTokenizer.from_pretrained(folder, local_files_only=True)``), else its bytes folded modulo the
  vocabulary. The first ``max_tokens`` tokens are used; train and test windows come from disjoint halves.
* Tensors for classifiers: a folder holding ``train.npz|train.safetensors`` and ``test.npz|test.safetensors``,
  or one ``.npz``/``.safetensors`` file split 80/20 by a seeded permutation. Each holds ``inputs`` (float,
  ``[n, d]``; for an image classifier ``[n, C, H, W]``, or ``[n, C*H*W]`` flattened) and ``labels`` (integer,
  ``[n]``), optionally a scalar ``n_classes``.

Every problem is a :class:`~symm.errors.DataError` naming the file (the command line exits with status 2).
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from .data import Split, TokenSplit, byte_tokens, text_corpus, token_windows
from .errors import DataError

#: files that mean "this folder ships a tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
TENSOR_SUFFIXES = (".npz", ".safetensors")
#: tokens read from a text file (or from the shipped text through a tokenizer) unless ``max_tokens`` says otherwise
DEFAULT_MAX_TOKENS = 200_000
#: the language-model evaluation: windows of ``SEQ_LEN + 1`` tokens, ``N_TRAIN`` train and ``N_TEST`` test windows
SEQ_LEN, N_TRAIN, N_TEST = 64, 256, 64

Encoder = Callable[[str], list[int]]


def data_kind(path: str | os.PathLike) -> str:
    """``"tensors"`` for a folder or a ``.npz``/``.safetensors`` file, ``"text"`` for any other file."""
    path = Path(path)
    return "tensors" if path.is_dir() or path.suffix.lower() in TENSOR_SUFFIXES else "text"


def has_tokenizer(folder: str | os.PathLike | None) -> bool:
    return folder is not None and Path(folder).is_dir() and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


# ---- text ----------------------------------------------------------------------------------------------------


def text_encoder(folder: str | os.PathLike | None, vocab_size: int) -> tuple[Encoder, str]:
    """``(encode, description)``: the folder's own tokenizer if it has one, else UTF-8 bytes modulo the vocabulary."""
    if not has_tokenizer(folder):
        modulus = min(vocab_size, 256)
        where = f"no tokenizer in {folder}" if folder is not None else "no tokenizer"
        return (lambda text: [b % modulus for b in text.encode("utf-8")]), (
            f"bytes modulo {modulus}, {where}" if modulus < 256 else f"bytes, {where}"
        )
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - tokenizer loading raises OSError, ValueError, ImportError, ...
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"cannot load the tokenizer in {folder} ({type(exc).__name__}: {message})") from None

    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    return encode, f"tokenizer of {folder}"


def _file_pieces(path: Path, chunk_bytes: int = 1 << 18) -> Iterator[str]:
    """The file's text in pieces that end at a line break (or at the end); binary or non-UTF-8 data is an error."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, pending = 0, ""
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            nul = block.find(b"\0")
            if nul >= 0:
                raise DataError(f"--data {path}: binary data (a NUL byte at offset {offset + nul}); expected UTF-8 text")
            try:
                pending += decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise DataError(f"--data {path}: not UTF-8 text (invalid byte near offset {offset + exc.start})") from None
            offset += len(block)
            cut = pending.rfind("\n") + 1 or (len(pending) if len(pending) > 4 * chunk_bytes else 0)
            if cut:
                yield pending[:cut]
                pending = pending[cut:]
        try:
            pending += decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"--data {path}: not UTF-8 text (it ends inside a character)") from None
    if pending:
        yield pending


def _text_pieces(text: str, chunk_chars: int = 1 << 18) -> Iterator[str]:
    """``text`` in pieces of about ``chunk_chars`` characters ending at line breaks."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars) + 1 or len(text)
        yield text[start:end]
        start = end


def _encode(pieces: Iterable[str], encode: Encoder, max_tokens: int) -> list[int]:
    """Tokens of the pieces, in order, up to ``max_tokens`` (stops reading once there are enough)."""
    ids: list[int] = []
    for piece in pieces:
        ids.extend(encode(piece))
        if len(ids) >= max_tokens:
            break
    return ids[:max_tokens]


def _windows(ids: list[int], vocab_size: int, name: str, what: str, seq_len: int, n_train: int, n_test: int, seed: int) -> TokenSplit:
    """Check the token ids (enough of them, inside the vocabulary) and cut train/test windows."""
    if not ids:
        raise DataError(f"{what} is empty (no tokens)")
    need = 2 * (seq_len + 2)
    if len(ids) < need:
        raise DataError(f"{what} has only {len(ids)} tokens; at least {need} are needed (two disjoint halves of {seq_len + 2}-token windows)")
    tokens = torch.tensor(ids, dtype=torch.long)
    top = int(tokens.max())
    if top >= vocab_size or int(tokens.min()) < 0:
        raise DataError(f"{what}: the tokenizer produced token id {top}, but the model's vocabulary has {vocab_size} entries; "
                        "the tokenizer does not belong to this model")
    return token_windows(tokens, vocab_size, name, seq_len=seq_len, n_train=n_train, n_test=n_test, seed=seed)


def load_text_tokens(
    path: str | os.PathLike,
    folder: str | os.PathLike | None,
    vocab_size: int,
    *,
    max_tokens: int | None = None,
    seq_len: int = SEQ_LEN,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    seed: int = 0,
) -> TokenSplit:
    """The first ``max_tokens`` (default :data:`DEFAULT_MAX_TOKENS`) tokens of a UTF-8 text file, tokenised by
    ``folder``'s tokenizer (bytes modulo the vocabulary without one), as train/test windows from disjoint halves."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file" if not path.exists() else f"--data {path}: not a file")
    if path.stat().st_size == 0:
        raise DataError(f"--data {path} is empty")
    encode, how = text_encoder(folder, vocab_size)
    ids = _encode(_file_pieces(path), encode, max_tokens or DEFAULT_MAX_TOKENS)
    return _windows(ids, vocab_size, f"{path} ({len(ids)} tokens, {how})", f"--data {path}", seq_len, n_train, n_test, seed)


def folder_tokenizer_tokens(
    folder: str | os.PathLike | None,
    vocab_size: int,
    *,
    max_tokens: int | None = None,
    seq_len: int = SEQ_LEN,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    seed: int = 0,
) -> TokenSplit:
    """The default text evaluation of a language model: the shipped text (:func:`symm.data.text_corpus`) tokenised by
    ``folder``'s tokenizer when it has one (first ``max_tokens``, default :data:`DEFAULT_MAX_TOKENS`), else its
    bytes folded modulo the vocabulary (the whole text, or its first ``max_tokens`` bytes)."""
    if not has_tokenizer(folder) and max_tokens is None:
        return byte_tokens(vocab_size=min(vocab_size, 256), seq_len=seq_len, n_train=n_train, n_test=n_test, seed=seed)
    text, source = text_corpus()
    encode, how = text_encoder(folder, vocab_size)
    ids = _encode(_text_pieces(text.decode("utf-8", errors="ignore")), encode, max_tokens or DEFAULT_MAX_TOKENS)
    return _windows(ids, vocab_size, f"{source}: {len(ids)} tokens, {how}", source, seq_len, n_train, n_test, seed)


# ---- tensors ---------------------------------------------------------------------------------------------------


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as npz:
                return {k: torch.from_numpy(np.ascontiguousarray(npz[k])) for k in npz.files}
        from safetensors.torch import load_file

        return load_file(path)
    except Exception as exc:  # noqa: BLE001 - numpy, zipfile and safetensors raise many kinds
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"--data {path}: cannot read the tensors ({type(exc).__name__}: {message})") from None


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def read_tensors(path: str | os.PathLike, sample_shape: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    """``(inputs [n, d] float32, labels [n] int64, n_classes or None)`` of one ``.npz``/``.safetensors`` file, checked.

    ``sample_shape`` (images, e.g. ``(C, H, W)``): inputs are ``[n, *sample_shape]`` or flattened ``[n, prod]``, and
    come back as ``[n, *sample_shape]``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file")
    found = _read_file(path)
    missing = [k for k in ("inputs", "labels") if k not in found]
    if missing:
        raise DataError(f"--data {path}: no tensor named {' or '.join(map(repr, missing))} (found: {', '.join(sorted(found)) or 'none'}); "
                        "expected 'inputs' [n, d] and 'labels' [n]")
    x, y = found["inputs"], found["labels"]
    if sample_shape is not None:
        x = _as_images(x, sample_shape, path)
    elif not x.is_floating_point() or x.dim() != 2:
        raise DataError(f"--data {path}: 'inputs' must be a floating-point [n, d] tensor, got {str(x.dtype)[6:]} of shape {list(x.shape)}")
    if not _is_integer(y) or y.dim() != 1:
        raise DataError(f"--data {path}: 'labels' must be an integer [n] tensor, got {str(y.dtype)[6:]} of shape {list(y.shape)}")
    if len(x) != len(y):
        raise DataError(f"--data {path}: {len(x)} inputs but {len(y)} labels")
    if len(x) == 0 or x[0].numel() == 0:
        raise DataError(f"--data {path}: no samples (inputs of shape {list(x.shape)})")
    x, y = x.float(), y.long()
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).reshape(len(x), -1).any(1).sum())
        raise DataError(f"--data {path}: 'inputs' holds NaN or Inf ({bad} of {len(x)} samples)")
    if int(y.min()) < 0:
        raise DataError(f"--data {path}: negative label {int(y.min())}; labels are class indices 0, 1, ...")
    n_classes = None
    if "n_classes" in found:
        k = found["n_classes"]
        if k.numel() != 1 or not _is_integer(k) or int(k.reshape(())) < 1:
            raise DataError(f"--data {path}: 'n_classes' must be one positive integer")
        n_classes = int(k.reshape(()))
    return x, y, n_classes


def _as_images(x: torch.Tensor, sample_shape: tuple[int, ...], path: Path) -> torch.Tensor:
    """``[n, *sample_shape]`` from inputs of that shape or flattened ``[n, prod(sample_shape)]``."""
    want = "[n, " + ", ".join(map(str, sample_shape)) + "]"
    if not x.is_floating_point():
        raise DataError(f"--data {path}: 'inputs' must be floating-point images {want}, got {str(x.dtype)[6:]}")
    numel = 1
    for s in sample_shape:
        numel *= s
    if x.dim() == 2 and x.shape[1] == numel:
        return x.reshape(len(x), *sample_shape)
    if tuple(x.shape[1:]) != tuple(sample_shape):
        raise DataError(f"--data {path}: 'inputs' of shape {list(x.shape)}; the model takes images {want} (or flattened [n, {numel}])")
    return x


def _split_file(folder: Path, stem: str) -> Path:
    found = [folder / f"{stem}{s}" for s in TENSOR_SUFFIXES if (folder / f"{stem}{s}").is_file()]
    if not found:
        raise DataError(f"--data {folder}: no {stem}.npz or {stem}.safetensors (a tensor folder holds train.* and test.*)")
    if len(found) > 1:
        raise DataError(f"--data {folder}: both {found[0].name} and {found[1].name}; keep one")
    return found[0]


def _subset(x: torch.Tensor, y: torch.Tensor, max_samples: int | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``max_samples`` samples: a seeded random subset, in the original order."""
    if max_samples is None or len(x) <= max_samples:
        return x, y
    keep = torch.randperm(len(x), generator=gen)[:max_samples].sort().values
    return x[keep], y[keep]


def limit_samples(split: Split, max_samples: int | None, seed: int = 0) -> Split:
    """``split`` with at most ``max_samples`` samples per split (seeded random subsets)."""
    if max_samples is None:
        return split
    gen = torch.Generator().manual_seed(seed)
    x_tr, y_tr = _subset(split.x_train, split.y_train, max_samples, gen)
    x_te, y_te = _subset(split.x_test, split.y_test, max_samples, gen)
    return Split(x_tr, y_tr, x_te, y_te, split.n_classes, split.name)


def load_tensor_split(
    path: str | os.PathLike, *, max_samples: int | None = None, seed: int = 0, test_fraction: float = 0.2, sample_shape: tuple[int, ...] | None = None
) -> Split:
    """Classifier data: a folder with ``train.*`` and ``test.*`` or one file split by a seeded permutation.

    ``n_classes`` is the stored scalar if any (the same in both files), else the largest label + 1; ``max_samples``
    caps each split (a seeded random subset); ``sample_shape``: image inputs (see :func:`read_tensors`)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"--data {path}: no such file or folder")
    gen = torch.Generator().manual_seed(seed)
    if path.is_dir():
        (x_tr, y_tr, k_tr), (x_te, y_te, k_te) = (read_tensors(_split_file(path, stem), sample_shape) for stem in ("train", "test"))
        if x_tr.shape[1] != x_te.shape[1]:
            raise DataError(f"--data {path}: train inputs have {x_tr.shape[1]} features, test inputs {x_te.shape[1]}")
        if None not in (k_tr, k_te) and k_tr != k_te:
            raise DataError(f"--data {path}: n_classes is {k_tr} in the train file but {k_te} in the test file")
        stored = k_tr if k_tr is not None else k_te
    else:
        if path.suffix.lower() not in TENSOR_SUFFIXES:
            raise DataError(f"--data {path}: tensors must be a .npz or .safetensors file, or a folder with train.* and test.*")
        x, y, stored = read_tensors(path, sample_shape)
        if len(x) < 2:
            raise DataError(f"--data {path}: {len(x)} sample; at least 2 are needed to split off a test set")
        n_test = min(len(x) - 1, max(1, round(test_fraction * len(x))))
        order = torch.randperm(len(x), generator=gen)
        test, train = order[:n_test].sort().values, order[n_test:].sort().values
        x_tr, y_tr, x_te, y_te = x[train], y[train], x[test], y[test]
    top = int(max(y_tr.max(), y_te.max()))
    if stored is not None and top >= stored:
        raise DataError(f"--data {path}: label {top} is out of range for n_classes = {stored}")
    n_classes = stored if stored is not None else top + 1
    x_tr, y_tr = _subset(x_tr, y_tr, max_samples, gen)
    x_te, y_te = _subset(x_te, y_te, max_samples, gen)
    return Split(x_tr, y_tr, x_te, y_te, n_classes, f"{path} ({len(x_tr)} train + {len(x_te)} test samples)")
