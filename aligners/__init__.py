"""Aligners: find the group element that best maps checkpoint B onto checkpoint A, and measure the barrier."""

from .activation_matching import activation_correlations, activation_matching, hookable_factors
from .barrier import BarrierReport, Curve, interpolate, lmc_curve, naive_vs_aligned, reset_batchnorm
from .analysis import permutation_part, plot_singular, singular_report, singular_values
from .canonical import balance_scalings
from .merge import MergeInfo, MergeResult, merge_many, weighted_average
from .plot import plot_barrier
from .repair import repair
from .assignment import linear_assignment
from .weight_matching import MatchInfo, weight_matching

__all__ = [
    "BarrierReport",
    "Curve",
    "MatchInfo",
    "MergeInfo",
    "MergeResult",
    "activation_correlations",
    "activation_matching",
    "balance_scalings",
    "hookable_factors",
    "interpolate",
    "linear_assignment",
    "lmc_curve",
    "merge_many",
    "permutation_part",
    "plot_singular",
    "naive_vs_aligned",
    "plot_barrier",
    "repair",
    "reset_batchnorm",
    "singular_report",
    "singular_values",
    "weight_matching",
    "weighted_average",
]
