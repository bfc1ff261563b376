"""Factor kinds: the building blocks of a symmetry group."""

from .base import SIDES, Factor, Side
from .linear import GeneralLinear, PairLayout, RotationScaling
from .permutation import GroupedPermutation, HeadPermutation, Permutation
from .scaling import NormScale, PositiveScaling, SignFlip
from .translation import Translation

__all__ = [
    "SIDES",
    "Factor",
    "GeneralLinear",
    "GroupedPermutation",
    "HeadPermutation",
    "NormScale",
    "PairLayout",
    "Permutation",
    "PositiveScaling",
    "RotationScaling",
    "Side",
    "SignFlip",
    "Translation",
]
