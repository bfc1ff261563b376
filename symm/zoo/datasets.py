"""Datasets a zoo trains on (shipped in packages or generated), split train/val/test by a recorded seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError

DATASETS = ("digits", "mnist1d", "text")
TEXT_VOCAB, TEXT_SEQ, TEXT_WINDOWS = 64, 32, 1024
VAL_FRACTION = 0.15


@dataclass(frozen=True)
class ZooData:
    name: str
    split_seed: int
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int

    @property
    def is_sequence(self) -> bool:
        """Language modelling: ``x`` are token windows, ``y`` the next tokens (same shape)."""
        return self.y_train.dim() == 2

    @property
    def n_features(self) -> int:
        return int(self.x_train[0].numel())

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


def load_dataset(name: str, split_seed: int = 0) -> ZooData:
    """``digits`` (sklearn, 1797 8x8 images), ``mnist1d`` (4000 generated 40-d signals): test 20%, val 15% of the
    rest, stratified; ``text``: next-byte prediction on windows of the shipped Shakespeare corpus (bytes mod 64)."""
    from sklearn.model_selection import train_test_split

    from .. import data

    if name == "text":
        return _text(split_seed)
    if name == "digits":
        split = data.digits(test_fraction=0.2, seed=split_seed)
    elif name == "mnist1d":
        split = data.mnist1d(n_samples=4000, seed=split_seed, test_fraction=0.2)
    else:
        raise UsageError(f"unknown zoo dataset {name!r} (known: {', '.join(DATASETS)})")
    x_tr, x_va, y_tr, y_va = train_test_split(
        split.x_train.numpy(), split.y_train.numpy(), test_size=VAL_FRACTION, random_state=split_seed, stratify=split.y_train.numpy()
    )
    return ZooData(
        name, split_seed, torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_va), torch.from_numpy(y_va),
        split.x_test, split.y_test, split.n_classes,
    )


def _text(split_seed: int) -> ZooData:
    from .. import data

    tok = data.byte_tokens(vocab_size=TEXT_VOCAB, seq_len=TEXT_SEQ, n_train=TEXT_WINDOWS, n_test=TEXT_WINDOWS // 4, seed=split_seed)
    n_val = round(VAL_FRACTION * len(tok.train))
    order = torch.randperm(len(tok.train), generator=torch.Generator().manual_seed(split_seed))
    train, val = tok.train[order[n_val:]], tok.train[order[:n_val]]
    return ZooData("text", split_seed, train[:, :-1], train[:, 1:], val[:, :-1], val[:, 1:], tok.test[:, :-1], tok.test[:, 1:], TEXT_VOCAB)
