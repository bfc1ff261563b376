"""MergeMany: bring N models into one frame and average them (Ainsworth et al. 2023, Git Re-Basin, Alg. 3).

Each model i gets a group element g_i. A **round** visits the models in a random order and re-matches each one
against the weighted mean of the others, already aligned: ``g_i <- weight_matching(mean_{j != i} g_j.theta_j,
theta_i, init=g_i)``. Rounds stop when a whole round changes no discrete factor (permutations), when ``patience``
rounds in a row do not raise the agreement ``sum_{i<j} w_i w_j <g_i.theta_i, g_j.theta_j>`` (real models can
cycle between equally good matches), or after ``max_rounds``; the elements of the best round are kept. By default the elements start from pairwise weight matching of every model onto the first
(``init="first"``); ``init="identity"`` starts from the identity, as in the paper. At the end every element is
composed with ``g_0^{-1}`` and the continuous factors are re-matched to the first model with the permutations
kept (:func:`pin_frame`): the first model is left exactly as it is, and the others are written in its frame
(as ``symm align`` writes B in A's frame). The merge is the weighted average ``sum_i w_i g_i.theta_i``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from symm.action import act
from symm.element import GroupElement
from symm.errors import SpecError, UsageError
from symm.io import assert_finite
from symm.normal_form import PERMUTATION_KINDS
from symm.spec import Spec

from .weight_matching import weight_matching

log = logging.getLogger(__name__)

Params = Mapping[str, torch.Tensor]
#: ``matcher(target, params, init) -> element`` with ``element . params`` matched to ``target``
Matcher = Callable[[Params, Params, GroupElement], GroupElement]
INITS = ("first", "identity")


@dataclass
class MergeInfo:
    """Diagnostics of :func:`merge_many`: per round, how many models changed a discrete factor."""

    rounds: int = 0
    converged: bool = False
    changed: list[int] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)  # sum_{i<j} w_i w_j <g_i.theta_i, g_j.theta_j> after each round
    best_round: int = 0  # the round whose elements are returned (0: the starting elements)


@dataclass(frozen=True)
class MergeResult:
    """One element per model (``elements[0]`` is the identity), the aligned models, the weights and the average."""

    elements: tuple[GroupElement, ...]
    aligned: tuple[dict[str, torch.Tensor], ...]
    weights: tuple[float, ...]
    merged: dict[str, torch.Tensor]
    info: MergeInfo


def normalise_weights(weights: Sequence[float] | None, n: int) -> tuple[float, ...]:
    """``weights`` (default uniform) scaled to sum 1; each must be finite and > 0."""
    if weights is None:
        return tuple([1.0 / n] * n)
    w = [float(x) for x in weights]
    if len(w) != n:
        raise UsageError(f"{len(w)} merge weights for {n} models: give one weight per model")
    if not all(math.isfinite(x) and x > 0 for x in w):
        raise UsageError(f"merge weights must be finite and positive, got {w}")
    total = sum(w)
    return tuple(x / total for x in w)


def weighted_average(models: Sequence[Params], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``sum_i w_i theta_i`` for floating tensors (accumulated in float64, returned in the first model's dtype);
    integer buffers (BatchNorm's ``num_batches_tracked``) are taken from the first model."""
    out: dict[str, torch.Tensor] = {}
    for k, v0 in models[0].items():
        if not torch.is_floating_point(v0):
            out[k] = v0.clone()
            continue
        acc = sum(w * m[k].to(torch.float64) for w, m in zip(weights, models))
        out[k] = acc.to(v0.dtype)
    return out


def check_models(spec: Spec, models: Sequence[Params], names: Sequence[str] | None = None) -> None:
    """At least two models, every one with the Spec's keys and shapes and finite weights (checked before any work)."""
    if len(models) < 2:
        raise UsageError(f"merging needs at least 2 models, got {len(models)}")
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]
    for name, params in zip(names, models):
        spec.check_params(params, what=name)
        assert_finite(params, what=name)


def agreement(models: Sequence[Params], weights: Sequence[float]) -> float:
    """``sum_{i<j} w_i w_j <theta_i, theta_j>`` over floating tensors: what the rounds raise (weight matching of each
    model against the mean of the others raises its own terms)."""
    total = 0.0
    keys = [k for k, v in models[0].items() if torch.is_floating_point(v)]
    flat = [torch.cat([m[k].reshape(-1).to(torch.float64) for k in keys]) for m in models]
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            total += weights[i] * weights[j] * float(torch.dot(flat[i], flat[j]))
    return total


def _discrete(spec: Spec, g: GroupElement) -> dict[str, torch.Tensor]:
    return {n: v for n, v in g.values.items() if spec.factors[n].kind in PERMUTATION_KINDS}


def _same_discrete(spec: Spec, g: GroupElement, h: GroupElement) -> bool:
    a, b = _discrete(spec, g), _discrete(spec, h)
    return all(torch.equal(a[n], b[n]) for n in a)


def weight_matcher(spec: Spec, *, seed: int = 0, backend: str = "auto", fixed: Mapping[str, torch.Tensor] | None = None) -> Matcher:
    """The default matcher: :func:`weight_matching` warm-started from the current element."""

    def match(target: Params, params: Params, init: GroupElement) -> GroupElement:
        return weight_matching(spec, target, params, init=init, fixed=fixed, seed=seed, backend=backend, progress=False)

    return match


def pin_frame(spec: Spec, models: Sequence[Params], elements: Sequence[GroupElement], *, seed: int = 0,
              backend: str = "auto") -> list[GroupElement]:
    """Move the common frame onto the first model: ``g_i <- g_0^{-1} g_i`` (so ``g_0`` is the identity), then, with
    the permutations kept, the continuous factors (scalings, GL, translations) of every other model re-matched to
    model 0 itself. After rounds that only agree on permutations, the scalings found against means of differently
    scaled models need not agree; this makes them exact wherever the models are the same function."""
    back = elements[0].inverse()
    moved = [GroupElement.identity(spec)] + [back.compose(g) for g in elements[1:]]
    if not any(f.is_continuous for f in spec.factors.values()):
        return moved
    return [moved[0]] + [
        weight_matching(spec, models[0], m, init=g, fixed=_discrete(spec, g), seed=seed, backend=backend, progress=False)
        for m, g in zip(models[1:], moved[1:])
    ]


def merge_many(
    spec: Spec,
    models: Sequence[Params],
    *,
    weights: Sequence[float] | None = None,
    max_rounds: int = 20,
    patience: int = 3,
    init: str = "first",
    seed: int = 0,
    backend: str = "auto",
    matcher: Matcher | None = None,
    progress: bool = True,
    names: Sequence[str] | None = None,
) -> MergeResult:
    """Align every model into the first one's frame by MergeMany rounds and average them (see the module docstring).

    ``weights``: the average's weights (default uniform; normalised to sum 1), also used for the mean of the others.
    ``matcher``: how one model is matched to a target (default :func:`weight_matcher`; STE and activation matching
    plug in here). The models are only read.
    """
    check_models(spec, models, names)
    if init not in INITS:
        raise UsageError(f"init must be one of {INITS}, got {init!r}")
    if max_rounds < 0:
        raise UsageError(f"max_rounds must be >= 0, got {max_rounds}")
    w = normalise_weights(weights, len(models))
    match = matcher or weight_matcher(spec, seed=seed, backend=backend)
    n = len(models)
    identity = GroupElement.identity(spec)
    elements = [identity] * n
    if init == "first":
        elements = [identity] + [match(models[0], models[i], identity) for i in tqdm(range(1, n), desc="pairwise to model 0",
                                                                                      disable=not progress, leave=False)]
    aligned = [act(spec, m, g) for m, g in zip(models, elements)]
    info = MergeInfo()
    best = (agreement(aligned, w), list(elements))
    stale = 0
    gen = torch.Generator().manual_seed(seed)
    bar = tqdm(range(max_rounds), desc="MergeMany", unit="round", disable=not progress, leave=False)
    for _ in bar:
        changed = 0
        for i in torch.randperm(n, generator=gen).tolist():
            others = [j for j in range(n) if j != i]
            total = sum(w[j] for j in others)
            target = weighted_average([aligned[j] for j in others], [w[j] / total for j in others])
            g = match(target, models[i], elements[i])
            if g.spec != spec:
                raise SpecError("the matcher returned an element of another spec")
            changed += not _same_discrete(spec, g, elements[i])
            elements[i], aligned[i] = g, act(spec, models[i], g)
        info.rounds += 1
        info.changed.append(changed)
        objective = agreement(aligned, w)
        info.objective.append(objective)
        bar.set_postfix(changed=changed, objective=f"{objective:.4g}")
        if objective > best[0] + 1e-9 * abs(best[0]):
            best, stale, info.best_round = (objective, list(elements)), 0, info.rounds
        else:
            stale += 1
        if changed == 0:
            info.converged = True
            break
        if stale >= patience:  # rounds can cycle between equally good matches: stop and keep the best seen
            break
    elements = best[1]
    log.info("MergeMany: %d rounds, converged=%s, changed per round %s", info.rounds, info.converged, info.changed)
    elements = pin_frame(spec, models, elements, seed=seed, backend=backend)
    aligned = [dict(models[0])] + [act(spec, m, g) for m, g in zip(models[1:], elements[1:])]
    return MergeResult(tuple(elements), tuple(aligned), w, weighted_average(aligned, w), info)


__all__ = ["INITS", "MergeInfo", "MergeResult", "agreement", "check_models", "merge_many", "normalise_weights", "pin_frame", "weight_matcher", "weighted_average"]
