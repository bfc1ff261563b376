"""The embedded default job: train two ReLU MLPs on digits, check a random symmetry, align them, plot the barrier."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .action import act
from .data import digits
from .element import GroupElement
from .evaluate import functional, state_dict_of
from .graph import describe
from .io import save_state_dict
from .models import MLP, MLPConfig, spec_for
from .testing import relative_error
from .train import train_classifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoResult:
    spec_summary: str
    symmetry_error: float
    report: dict


def run_demo(out_dir: str | Path = "demo_out", width: int = 512, depth: int = 2, epochs: int = 30, seed: int = 0,
             method: str = "weights", progress: bool = True) -> DemoResult:
    """Writes ``A.safetensors``, ``B.safetensors``, the aligned B, ``report.json`` and ``barrier.png`` to ``out_dir``."""
    from aligners.job import align

    data = digits()
    config = MLPConfig((64, *([width] * depth), data.n_classes), "relu")
    out = Path(out_dir)
    paths = []
    for name, s in (("A", seed), ("B", seed + 1)):
        torch.manual_seed(s)
        model = train_classifier(MLP(config), data.x_train, data.y_train, epochs=epochs, seed=s, progress=progress)
        paths.append(save_state_dict(state_dict_of(model), out / f"{name}.safetensors", overwrite=True))
    spec = spec_for(model)
    params = state_dict_of(model)
    f = functional(model)
    with torch.no_grad():
        err = relative_error(f(act(spec, params, GroupElement.sample(spec, seed)), data.x_test), f(params, data.x_test))
    report = align(paths[0], paths[1], out, method=method, activation="relu", seed=seed, overwrite=True, progress=progress)
    summary = describe(spec).split("parameters (")[0].rstrip()
    return DemoResult(summary, err, report)
