"""Aligners: find the group element that best maps checkpoint B onto checkpoint A, and measure the barrier."""

from .activation_matching import activation_correlations, activation_matching, hookable_factors
from .barrier import BarrierReport, Curve, interpolate, lmc_curve, naive_vs_aligned, reset_batchnorm
from .canonical import balance_scalings
from .plot import plot_barrier
from .repair import repair
from .assignment import linear_assignment
from .weight_matching import MatchInfo, weight_matching

__all__ = [
    "BarrierReport",
    "Curve",
    "MatchInfo",
    "activation_correlations",
    "activation_matching",
    "balance_scalings",
    "hookable_factors",
    "interpolate",
    "linear_assignment",
    "lmc_curve",
    "naive_vs_aligned",
    "plot_barrier",
    "repair",
    "reset_batchnorm",
    "weight_matching",
]
