"""Linear mode connectivity: interpolate theta(alpha) = (1-alpha) theta_A + alpha theta_B and measure the barrier.

Loss barrier: max_alpha L(theta(alpha)) - [(1-alpha) L(theta_A) + alpha L(theta_B)].
Accuracy barrier: max_alpha [(1-alpha) acc_A + alpha acc_B] - acc(theta(alpha)) (the drop below the chord).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

Params = Mapping[str, torch.Tensor]
Evaluate = Callable[[Params], tuple[float, float]]


def interpolate(a: Params, b: Params, alpha: float) -> dict[str, torch.Tensor]:
    """Floating tensors are mixed; integer buffers (e.g. BatchNorm's num_batches_tracked) are taken from A."""
    out = {}
    for k, va in a.items():
        vb = b[k]
        out[k] = torch.lerp(va, vb.to(va.dtype), alpha) if torch.is_floating_point(va) else va.clone()
    return out


@dataclass(frozen=True)
class Curve:
    alphas: list[float]
    loss: list[float]
    accuracy: list[float]

    @property
    def loss_barrier(self) -> float:
        la, lb = self.loss[0], self.loss[-1]
        return max(l - ((1 - t) * la + t * lb) for t, l in zip(self.alphas, self.loss))

    @property
    def accuracy_barrier(self) -> float:
        aa, ab = self.accuracy[0], self.accuracy[-1]
        return max(((1 - t) * aa + t * ab) - acc for t, acc in zip(self.alphas, self.accuracy))

    def to_dict(self) -> dict:
        return {**asdict(self), "loss_barrier": self.loss_barrier, "accuracy_barrier": self.accuracy_barrier}


def lmc_curve(
    evaluate: Evaluate,
    a: Params,
    b: Params,
    n_points: int = 25,
    progress: bool = True,
    desc: str = "interpolating",
    correct: Callable[[dict, float], dict] | None = None,
) -> Curve:
    """Loss and accuracy at ``n_points`` evenly spaced alphas; ``correct(params, alpha)`` may renormalise (REPAIR)."""
    if n_points < 2:
        raise ValueError(f"need at least 2 interpolation points, got {n_points}")
    alphas = [i / (n_points - 1) for i in range(n_points)]
    losses, accs = [], []
    for t in tqdm(alphas, desc=desc, unit="point", disable=not progress, leave=False):
        mixed = interpolate(a, b, t)
        if correct is not None and 0.0 < t < 1.0:
            mixed = correct(mixed, t)
        loss, acc = evaluate(mixed)
        losses.append(float(loss))
        accs.append(float(acc))
    return Curve(alphas, losses, accs)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_batchnorm(model: nn.Module, params: Params, inputs: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """Recompute every BatchNorm's running statistics at ``params`` on ``inputs`` (cumulative average).

    Interpolated weights make the interpolated running statistics meaningless; this is the standard reset.
    """
    work = copy.deepcopy(model)
    work.load_state_dict(dict(params))
    for m in work.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    work.train()
    for start in range(0, len(inputs), batch_size):
        work(inputs[start : start + batch_size])
    work.eval()
    return {k: v.detach().clone() for k, v in work.state_dict().items()}


@dataclass(frozen=True)
class BarrierReport:
    naive: Curve
    aligned: Curve
    repaired: Curve | None = None

    @property
    def curves(self) -> dict[str, Curve]:
        out = {"naive": self.naive, "aligned": self.aligned}
        if self.repaired is not None:
            out["aligned+REPAIR"] = self.repaired
        return out

    def to_dict(self) -> dict:
        curves = self.curves
        return {
            **{name: c.to_dict() for name, c in curves.items()},
            "loss_barrier": {name: c.loss_barrier for name, c in curves.items()},
            "accuracy_barrier": {name: c.accuracy_barrier for name, c in curves.items()},
        }


def naive_vs_aligned(
    evaluate: Evaluate,
    a: Params,
    b: Params,
    b_aligned: Params,
    n_points: int = 25,
    progress: bool = True,
    correct: Callable[[dict, float], dict] | None = None,
) -> BarrierReport:
    """Naive and aligned curves; with ``correct`` (e.g. REPAIR) also the corrected aligned curve."""
    return BarrierReport(
        naive=lmc_curve(evaluate, a, b, n_points, progress, "naive interpolation"),
        aligned=lmc_curve(evaluate, a, b_aligned, n_points, progress, "aligned interpolation"),
        repaired=None if correct is None else lmc_curve(evaluate, a, b_aligned, n_points, progress, "aligned + REPAIR", correct),
    )
