"""Metanetworks (JAX/Flax NNX) parameterised by the catalogue's Spec, trained on model zoos.

* :mod:`metanets.weight_space`: a zoo batch as features in the Spec's normal form (virtual parameters with labelled
  sub-axes, a trailing channel axis) and the group action on them, in JAX;
* :mod:`metanets.plan` + :mod:`metanets.equivariant`: permutation-equivariant layers whose parameter sharing is
  enumerated from the normal form's labels, and an invariant predictor built from them;
* :mod:`metanets.quasi`: scale-equivariant / quasi-equivariant networks ``F = alpha . beta`` for permutations x
  positive scalings (canonical scale, per-channel alpha through the factor's exponential map), invariant head;
* :mod:`metanets.baselines`: flattened-weights MLP, StatNN, hyperparameters-only MLP;
* :mod:`metanets.data`, :mod:`metanets.transforms`, :mod:`metanets.train`, :mod:`metanets.checkpoint`: zoo arrays and
  by-run splits, robustness transformations (permutations, U[1,10] / U[1,1000] scalings), the optax loop sharded
  over ``jax.devices()``, Kendall's tau / R^2 reports, safetensors checkpoints.
"""

from symm.normal_form import NormalForm, normal_form

from .baselines import BASELINES, BaselineConfig, FlatMLP, HParamsMLP, StatNN
from .checkpoint import load_checkpoint, save_checkpoint
from .data import ZooData, from_zoo, load_splits, minibatches
from .equivariant import EquivariantLinear, EquivariantMetaNet, invariant_pool
from .plan import SharingPlan, sharing_plan
from .quasi import QuasiMetaNet, ScalingPlan, scaling_plan
from .train import TrainConfig, TrainResult, evaluate, predict, train, transformed_views
from .transforms import TRANSFORMS, transform
from .weight_space import act_features, element_arrays, from_features, jit_action, to_features

__all__ = [
    "BASELINES", "BaselineConfig", "EquivariantLinear", "EquivariantMetaNet", "FlatMLP", "HParamsMLP", "NormalForm",
    "QuasiMetaNet", "ScalingPlan", "SharingPlan", "StatNN", "TRANSFORMS", "TrainConfig", "TrainResult", "ZooData", "act_features", "element_arrays",
    "evaluate", "from_features", "from_zoo", "invariant_pool", "jit_action", "load_checkpoint", "load_splits",
    "minibatches", "normal_form", "predict", "save_checkpoint", "scaling_plan", "sharing_plan", "to_features", "train", "transform",
    "transformed_views",
]
