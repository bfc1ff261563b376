"""Barrier plot: loss and accuracy along the interpolation path, naive vs aligned, endpoints marked."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from symm.io import atomic_write  # noqa: E402

from .barrier import BarrierReport, Curve  # noqa: E402

STYLE = {"naive": ("tab:red", "--"), "aligned": ("tab:blue", "-"), "aligned+REPAIR": ("tab:green", "-.")}


def _panel(ax, curves: dict[str, Curve], metric: str, ylabel: str) -> None:
    for name, curve in curves.items():
        color, ls = STYLE.get(name, ("tab:gray", "-"))
        values = getattr(curve, metric)
        barrier = curve.loss_barrier if metric == "loss" else curve.accuracy_barrier
        ax.plot(curve.alphas, values, ls, color=color, marker="o", markersize=3, label=f"{name} (barrier {barrier:.3g})")
        ax.plot([0, 1], [values[0], values[-1]], ":", color=color, linewidth=1)
    first = next(iter(curves.values()))
    vals = getattr(first, metric)
    ax.scatter([0, 1], [vals[0], vals[-1]], s=60, color="black", zorder=5)
    ax.annotate("A", (0, vals[0]), textcoords="offset points", xytext=(6, 6))
    ax.annotate("B", (1, vals[-1]), textcoords="offset points", xytext=(-12, 6))
    ax.set_xlabel("interpolation alpha (0 = A, 1 = B)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_barrier(report: BarrierReport, path: str | os.PathLike, title: str = "") -> Path:
    """Write a two-panel PNG atomically; returns its path."""
    curves = report.curves
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _panel(axes[0], curves, "loss", "loss")
    _panel(axes[1], curves, "accuracy", "accuracy")
    fig.suptitle(title or "linear mode connectivity")
    fig.tight_layout()
    try:
        return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
