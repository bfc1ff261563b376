"""A small, deterministic classifier training loop (used by the demo, tests and experiments)."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate import functional

log = logging.getLogger(__name__)


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Adam on cross-entropy; ``seed`` fixes initialisation order and minibatch order."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    bar = tqdm(range(epochs), desc=f"train seed={seed}", disable=not progress, leave=False)
    for _ in bar:
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


@torch.no_grad()
def evaluate_classifier(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` evaluated at ``params``."""
    logits = functional(model)(params, x)
    loss = nn.functional.cross_entropy(logits, y).item()
    acc = (logits.argmax(-1) == y).float().mean().item()
    return loss, acc


def train_lm(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """AdamW on next-token cross-entropy over ``windows`` (n, T+1); works for our LMs and transformers models."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    bar = tqdm(range(steps), desc=f"train LM seed={seed}", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, len(windows), (batch_size,), generator=gen)
        x, y = windows[idx, :-1], windows[idx, 1:]
        out = model(x)
        logits = out.logits if hasattr(out, "logits") else out
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model
