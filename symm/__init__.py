"""symm: a catalogue of weight-space symmetries (Spec / Factor / GroupElement) for torch state dicts."""

from .action import act
from .element import GroupElement
from .errors import CheckpointError, SpecError, SymmError, UnsupportedArchitecture
from .factors import (
    Factor,
    GeneralLinear,
    GroupedPermutation,
    HeadPermutation,
    Permutation,
    PositiveScaling,
    RotationScaling,
    SignFlip,
    Translation,
)
from .graph import coupled_factors, describe, to_networkx
from .spec import Fragment, On, ParamSpec, Segment, Shift, Spec, merge, param

__all__ = [
    "CheckpointError",
    "Factor",
    "Fragment",
    "GeneralLinear",
    "GroupElement",
    "GroupedPermutation",
    "HeadPermutation",
    "On",
    "ParamSpec",
    "Permutation",
    "PositiveScaling",
    "RotationScaling",
    "Segment",
    "Shift",
    "SignFlip",
    "Spec",
    "SpecError",
    "SymmError",
    "Translation",
    "UnsupportedArchitecture",
    "act",
    "coupled_factors",
    "describe",
    "merge",
    "param",
    "to_networkx",
]
