"""Aligners: find the group element that best maps checkpoint B onto checkpoint A, and measure the barrier."""

from .solvers import linear_assignment
from .weight_matching import MatchInfo, weight_matching

__all__ = ["MatchInfo", "linear_assignment", "weight_matching"]
