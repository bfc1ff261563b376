"""Metanetworks (JAX/Flax) parameterised by the catalogue's Spec.

:mod:`metanets.weight_space`: a zoo batch as features in the Spec's normal form (virtual parameters with labelled
sub-axes, a trailing channel axis) and the group action on them, in JAX.
"""

from symm.normal_form import NormalForm, normal_form

from .weight_space import act_features, element_arrays, from_features, jit_action, to_features

__all__ = ["NormalForm", "act_features", "element_arrays", "from_features", "jit_action", "normal_form", "to_features"]
