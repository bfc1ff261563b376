"""Small, deterministic training loops (classifiers and LMs) used by the demo, tests and experiments."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .evaluate import functional

log = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")


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


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step``: linear warm-up over ``warmup`` steps, then constant or a
    cosine decay to 0 at ``steps`` (lr_k = lr * min(1, (k+1)/warmup) * (1 + cos(pi k / steps)) / 2)."""
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "constant":
        return ramp
    return ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))


def train_lm(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    steps: int = 300,
    batch_size: int = 32,
    lr: float = 3e-3,
    weight_decay: float = 0.0,
    warmup: int = 0,
    schedule: str = "constant",
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """AdamW on next-token cross-entropy over ``windows`` (n, T+1); works for our LMs and transformers models.
    ``schedule``: ``"constant"`` or ``"cosine"`` (to 0 at the last step), after ``warmup`` linear warm-up steps."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: lr_factor(k, steps, warmup, schedule))
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
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model
