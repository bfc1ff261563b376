"""Factor kinds: the building blocks of a symmetry group."""

from .base import SIDES, Factor, Side
from .linear import GeneralLinear, PairLayout, RotationScaling
from .permutation import HeadPermutation, Permutation
from .scaling import PositiveScaling, SignFlip
from .translation import Translation

__all__ = [
    "SIDES",
    "Factor",
    "GeneralLinear",
    "HeadPermutation",
    "PairLayout",
    "Permutation",
    "PositiveScaling",
    "RotationScaling",
    "Side",
    "SignFlip",
    "Translation",
]
