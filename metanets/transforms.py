"""Robustness transformations of test networks: random elements of each architecture's symmetry group.

Every row of a :class:`~metanets.data.ZooData` is moved by its own random element ``g`` of its Spec's group
(``theta -> g . theta`` with :func:`symm.action.act`, float64 inside, cast back to float32), so each transformed network
computes the same function as the original. Transformations:

* ``original``: identity;
* ``permutation``: every permutation factor (plain, grouped, head) uniformly random, every other factor at identity;
* ``scale10`` / ``scale1000``: the permutations plus every positive per-neuron scaling ``a_i ~ U[1, 10]`` /
  ``U[1, 1000]`` (ReLU-like units: in-weights and bias times a_i, out-weights divided by it). A Spec without
  positive scalings (tanh, GELU) gets the permutations only, and the result says so (``scaled_archs``).

Row ``i``'s element depends only on ``(seed, transform, i)``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from symm.action import act
from symm.element import GroupElement
from symm.errors import UsageError
from symm.evaluate import functional
from symm.models import build_model, spec_for
from symm.spec import Spec

from .data import ZooData

log = logging.getLogger(__name__)

PERMUTATION_KINDS = frozenset({"permutation", "grouped-permutation", "head-permutation"})
SCALING_KINDS = frozenset({"positive-scaling"})
#: name -> range of the per-neuron scalings (None: permutations only; "original" is the identity)
SCALE_RANGES: Mapping[str, tuple[float, float] | None] = {"permutation": None, "scale10": (1.0, 10.0), "scale1000": (1.0, 1000.0)}
TRANSFORMS = ("original", "permutation", "scale10", "scale1000")


@dataclass(frozen=True)
class Transformed:
    """Transformed data, with what moved: ``scaled_archs`` got scalings, ``permutation_only_archs`` had none to get."""

    name: str
    data: ZooData
    scaled_archs: tuple[str, ...]
    permutation_only_archs: tuple[str, ...]

    @property
    def note(self) -> str:
        if self.name in ("original", "permutation") or not self.permutation_only_archs:
            return ""
        return (f"{self.name}: architectures {list(self.permutation_only_archs)} have no positive-scaling symmetry; "
                "their networks were permuted only")


def sample_element(spec: Spec, name: str, generator: torch.Generator) -> GroupElement:
    """A random element for transformation ``name``: random permutations, scalings U[lo, hi] for ``scale*``."""
    if name not in SCALE_RANGES:
        raise UsageError(f"unknown transformation {name!r} (known: {', '.join(TRANSFORMS)})")
    perms = [n for n, f in spec.factors.items() if f.kind in PERMUTATION_KINDS]
    g = GroupElement.sample(spec, generator, only=perms)
    scale = SCALE_RANGES[name]
    if scale is None:
        return g
    lo, hi = scale
    values = {n: lo + (hi - lo) * torch.rand(f.element_shape, generator=generator, dtype=torch.float64)
              for n, f in spec.factors.items() if f.kind in SCALING_KINDS}
    return g.replace(**values)


def has_scalings(spec: Spec) -> bool:
    return any(f.kind in SCALING_KINDS for f in spec.factors.values())


def transform(data: ZooData, name: str, seed: int = 0) -> Transformed:
    """Every row of ``data`` moved by its own random element (see the module docstring)."""
    if name == "original":
        return Transformed(name, data, (), ())
    if name not in SCALE_RANGES:
        raise UsageError(f"unknown transformation {name!r} (known: {', '.join(TRANSFORMS)})")
    specs = {a: spec_for(cfg) for a, cfg in data.architectures.items()}
    out = {k: np.empty_like(v) for k, v in data.weights.items()}
    for i in range(len(data)):
        spec = specs[data.arch[i]]
        g = sample_element(spec, name, _generator(seed, name, i))
        moved = act(spec, {k: torch.from_numpy(v[i]) for k, v in data.weights.items()}, g)
        for k, v in moved.items():
            out[k][i] = v.numpy()
    present = sorted(set(data.arch))
    scaled = tuple(a for a in present if SCALE_RANGES[name] is not None and has_scalings(specs[a]))
    unscaled = tuple(a for a in present if SCALE_RANGES[name] is not None and not has_scalings(specs[a]))
    result = Transformed(name, data.with_weights(out), scaled, unscaled)
    if result.note:
        log.info(result.note)
    return result


def _generator(seed: int, name: str, row: int) -> torch.Generator:
    """Per-row torch generator from ``(seed, transform index, row)``."""
    state = np.random.SeedSequence([int(seed), TRANSFORMS.index(name), int(row)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def logits(data: ZooData, rows: Sequence[int], x: torch.Tensor) -> list[torch.Tensor]:
    """The reference torch models' outputs on inputs ``x`` at the weights of ``rows`` (float32)."""
    models = {a: build_model(cfg).eval() for a, cfg in data.architectures.items()}
    out = []
    with torch.no_grad():
        for i in rows:
            f = functional(models[data.arch[i]])
            out.append(f({k: torch.from_numpy(np.ascontiguousarray(v[i])) for k, v in data.weights.items()}, x))
    return out


def max_function_error(before: ZooData, after: ZooData, x: torch.Tensor, rows: Sequence[int] | None = None) -> float:
    """max over rows of max|f(after)(x) - f(before)(x)| / max|f(before)(x)| (0 means the same function)."""
    rows = range(len(before)) if rows is None else rows
    errors = [float((b - a).abs().max() / a.abs().max().clamp_min(1e-30))
              for a, b in zip(logits(before, rows, x), logits(after, rows, x))]
    return max(errors, default=0.0)
