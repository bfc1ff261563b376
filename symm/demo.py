"""The embedded default job: two ReLU MLPs trained on digits, a random symmetry, and what the catalogue knows."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

from .data import digits
from .models import MLP, MLPConfig, spec_for
from .evaluate import functional, state_dict_of
from .testing import relative_error
from .train import evaluate_classifier, train_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    spec_name: str
    spec_description: str
    n_factors: int
    continuous_dimension: int
    accuracy_a: float
    accuracy_b: float
    accuracy_transformed: float
    logit_relative_error: float
    weight_change_relative: float
    one_sided_accuracy: float
    distance_a_b: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("spec_description")
        return d


def _flat(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in params.values()])


def run_demo(width: int = 128, depth: int = 2, epochs: int = 30, seed: int = 0, progress: bool = True) -> DemoResult:
    data = digits()
    config = MLPConfig((64, *([width] * depth), data.n_classes), "relu")
    models = []
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        models.append(train_classifier(MLP(config), data.x_train, data.y_train, epochs=epochs, seed=s, progress=progress))
    a, b = models
    pa, pb = state_dict_of(a), state_dict_of(b)
    spec = spec_for(a)
    g = spec.sample(seed)
    moved = spec.act(pa, g)
    f = functional(a)
    with torch.no_grad():
        logit_err = relative_error(f(moved, data.x_test), f(pa, data.x_test))
    one_sided = dict(pa)
    perm = g.values[spec.permutation_factors[0]]
    one_sided["layers.0.weight"] = pa["layers.0.weight"][perm]
    one_sided["layers.0.bias"] = pa["layers.0.bias"][perm]
    fa, fb = _flat(pa), _flat(pb)
    result = DemoResult(
        spec_name=spec.name,
        spec_description=spec.describe(),
        n_factors=len(spec.factors),
        continuous_dimension=spec.dimension,
        accuracy_a=evaluate_classifier(a, pa, data.x_test, data.y_test)[1],
        accuracy_b=evaluate_classifier(b, pb, data.x_test, data.y_test)[1],
        accuracy_transformed=evaluate_classifier(a, moved, data.x_test, data.y_test)[1],
        logit_relative_error=logit_err,
        weight_change_relative=float((_flat(moved) - fa).norm() / fa.norm()),
        one_sided_accuracy=evaluate_classifier(a, one_sided, data.x_test, data.y_test)[1],
        distance_a_b=float((fa - fb).norm() / fa.norm()),
    )
    log.info("demo finished: %s", result.to_dict())
    return result
