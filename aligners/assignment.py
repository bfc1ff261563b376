"""Linear assignment: ``argmax_sigma sum_i S[i, sigma(i)]``, scipy by default or lapx when installed (same optimum)."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

log = logging.getLogger(__name__)

BACKENDS = ("auto", "scipy", "lapx")


def lapx_available() -> bool:
    return importlib.util.find_spec("lap") is not None


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"linear-assignment backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "lapx" if lapx_available() else "scipy"
    if backend == "lapx" and not lapx_available():
        raise ValueError("backend 'lapx' requested but the lapx package is not installed")
    return backend


def _solve(score: np.ndarray, backend: str) -> np.ndarray:
    if backend == "lapx":
        import lap

        # lapjv minimises cost; maximise the score by negating it
        _, col_of_row, _ = lap.lapjv(-score, extend_cost=False)
        return np.asarray(col_of_row, dtype=np.int64)
    rows, cols = linear_sum_assignment(score, maximize=True)
    out = np.empty(score.shape[0], dtype=np.int64)
    out[rows] = cols
    return out


def linear_assignment(score: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Gather index ``sigma`` maximising ``sum_i score[i, sigma[i]]``; batched over leading axes."""
    if score.dim() < 2 or score.shape[-1] != score.shape[-2]:
        raise ValueError(f"linear assignment needs square score matrices, got shape {tuple(score.shape)}")
    if not bool(torch.isfinite(score).all()):
        raise ValueError("linear assignment score contains NaN or Inf")
    name = resolve_backend(backend)
    flat = score.detach().to(torch.float64).reshape(-1, score.shape[-2], score.shape[-1]).cpu().numpy()
    out = np.stack([_solve(s, name) for s in flat])
    return torch.from_numpy(out).reshape(score.shape[:-1])


def assignment_value(score: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return score.gather(-1, sigma.unsqueeze(-1)).squeeze(-1).sum(-1)
