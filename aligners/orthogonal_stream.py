"""Data-free alignment with an orthogonal residual stream (untied RMSNorm decoders; LayerNorm ones with O 1 = 1).

Both checkpoints are folded (:func:`symm.folding.fold`: gains into readers). Then, alternately:
1. O <- Procrustes: O = U V^T from the SVD of M = sum_b X_A,b^T X_B,b / n_b over the stream tensors (rows =
   stream vectors, n_b rows; each block scaled by 1/sqrt(n_b)). The first fit uses only the tensors on which no
   other factor acts (embeddings, lm_head, writer biases); later fits use every stream tensor of the current B.
2. g <- :func:`aligners.weight_matching` on the folded, O-rotated B, every factor of the Spec that acts on the
   stream (its permutation and signs) fixed at the identity: heads, GL / RoPE rotation-scalings per head, FFN units,
   experts, router translations.
Stop when the Procrustes correction is below ``tol``, when ``patience`` rounds in a row barely lower the stream
objective, or after ``max_outer`` rounds; the round with the smallest stream objective is kept. The stream objective
is what step 1 minimises, sqrt(sum_b ||X_A,b - X_B,b||^2 / n_b / sum_b ||X_A,b||^2 / n_b): the plain folded distance
is not (it weighs the (vocab, d) embeddings and LM head far more than Procrustes does), and keeping the round of
smallest folded distance kept the first fit on trained pairs, undoing every later round.
The aligned B is ``unfold(g . O . fold(B), gains of A)``: it computes B's function and carries A's gains exactly,
so a lerp of A and the aligned B is the lerp of the folded models. LayerNorm biases are B's own, rotated
(b -> g_A * O (b_B / g_B)): carrying A's biases too would need a bias on every reader (GPT-2's lm_head has none)
and would make the checkpoint lerp differ from the folded one.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from symm.action import act
from symm.element import GroupElement
from symm.errors import SpecError
from symm.folding import StreamLayout, act_orthogonal, fold, gains_of, nearest_orthogonal, stream_tensors, unfold
from symm.spec import Spec

from .weight_matching import weight_matching

log = logging.getLogger(__name__)

Params = Mapping[str, torch.Tensor]


def _f64(params: Params) -> dict[str, torch.Tensor]:
    return {k: (v.detach().to(torch.float64) if torch.is_floating_point(v) else v) for k, v in params.items()}


def stream_factors(spec: Spec, layout: StreamLayout) -> list[str]:
    """Factors of ``spec`` acting on the stream axis of some stream tensor (the stream permutation, its signs)."""
    axes = {(t.name, t.axis) for t in layout.tensors}
    missing = sorted(t.name for t in layout.tensors if t.name not in spec.params) + sorted(g for g in layout.gains if g not in spec.params)
    if missing:
        raise SpecError(f"stream layout ({layout.family}) and spec ({spec.name}) disagree: {missing[:10]} not in the spec")
    return [f for f in spec.factor_order if any((p, axis) in axes for p, axis, _, _ in spec.uses(f))]


def free_tensors(spec: Spec, layout: StreamLayout, stream: list[str]) -> list[str]:
    """Stream tensors on which no factor other than the stream's acts (embeddings, lm_head, writer biases)."""
    out = []
    for t in layout.tensors:
        ps = spec.params[t.name]
        if not ps.shifts and ps.factors() <= set(stream):
            out.append(t.name)
    return out


def procrustes(a: Params, b: Params, layout: StreamLayout, names: list[str] | None = None) -> torch.Tensor:
    """argmax_O sum_b <X_A,b, X_B,b O^T> / n_b over orthogonal O (fixing 1 on a centred stream): the polar factor
    of sum_b X_A,b^T X_B,b / n_b."""
    xa, xb = stream_tensors(a, layout), stream_tensors(b, layout)
    names = list(xa) if names is None else names
    m = torch.zeros(layout.d, layout.d, dtype=torch.float64)
    for n in names:
        m += xa[n].to(torch.float64).T @ xb[n].to(torch.float64) / xa[n].shape[0]
    return nearest_orthogonal(m, layout.centred)


def stream_objective(a: Params, b: Params, layout: StreamLayout) -> float:
    """sqrt(sum_b ||X_A,b - X_B,b||^2 / n_b / sum_b ||X_A,b||^2 / n_b) over the stream tensors: the relative
    distance :func:`procrustes` minimises over O (each tensor weighted by 1 / its number of stream vectors)."""
    xa, xb = stream_tensors(a, layout), stream_tensors(b, layout)
    num = sum(float((xa[n].to(torch.float64) - xb[n].to(torch.float64)).pow(2).sum()) / xa[n].shape[0] for n in xa)
    den = sum(float(xa[n].to(torch.float64).pow(2).sum()) / xa[n].shape[0] for n in xa)
    return (num / max(den, 1e-300)) ** 0.5


def relative_distance(x: Params, y: Params) -> float:
    """||x - y|| / ||y|| over the floating-point tensors of ``y``."""
    num = sum(float((x[k] - y[k]).pow(2).sum()) for k in y if torch.is_floating_point(y[k]))
    den = sum(float(y[k].pow(2).sum()) for k in y if torch.is_floating_point(y[k]))
    return (num / den) ** 0.5


@dataclass
class OrthogonalMatch:
    """The answer ``(O, g)``: B's folded weights map onto A's as ``g . O . fold(B)``; call it on B to get aligned B."""

    spec: Spec
    layout: StreamLayout
    O: torch.Tensor  # (d, d) float64, orthogonal
    g: GroupElement  # the rest of the group (stream factors at the identity), acting after O
    gains: dict[str, torch.Tensor]  # A's norm gains, carried by the aligned B
    distances: list[float] = field(default_factory=list)  # ||g.O.fold(B) - fold(A)|| / ||fold(A)|| per round
    objectives: list[float] = field(default_factory=list)  # stream_objective(fold(A), g.O.fold(B)) per round
    rounds: int = 0
    converged: bool = False

    def __iter__(self):
        return iter((self.O, self.g))

    def folded(self, params_b: Params) -> dict[str, torch.Tensor]:
        """``g . O . fold(B)`` in float64."""
        return act(self.spec, act_orthogonal(fold(_f64(params_b), self.layout), self.layout, self.O), self.g)

    def __call__(self, params_b: Params) -> dict[str, torch.Tensor]:
        """The aligned B, unfolded with A's gains, in B's own dtypes."""
        out = unfold(self.folded(params_b), self.layout, {k: v.to(torch.float64) for k, v in self.gains.items()})
        out = {k: (v.to(params_b[k].dtype) if torch.is_floating_point(params_b[k]) else v) for k, v in out.items()}
        for k, v in self.gains.items():  # exactly A's gains (no round trip through float64)
            out[k] = v.to(params_b[k].dtype).clone()
        return out


def match_orthogonal(
    spec: Spec,
    layout: StreamLayout,
    params_a: Params,
    params_b: Params,
    *,
    max_outer: int = 15,
    first_fit: str = "free",
    tol: float = 1e-10,
    patience: int = 2,
    min_gain: float = 1e-4,
    seed: int = 0,
    backend: str = "auto",
    max_sweeps: int = 100,
    progress: bool = False,
) -> OrthogonalMatch:
    """Alternate Procrustes for the stream O with weight matching of everything else (see the module doc).

    ``first_fit``: the tensors of the first Procrustes fit, ``"free"`` (those no other factor acts on: embeddings,
    lm_head, writer biases; exact for a planted pair) or ``"all"``. ``tol``: stop when max |delta O - I| of the
    Procrustes correction is below it; ``patience``: rounds in a row that lower the stream objective
    (:func:`stream_objective`) by less than ``min_gain`` (relative) before stopping (float32 inputs stop there, at
    their rounding floor). The round of smallest stream objective is kept.
    """
    if max_outer < 1:
        raise SpecError(f"max_outer must be >= 1, got {max_outer}")
    spec.check_params(params_a, what="checkpoint A")
    spec.check_params(params_b, what="checkpoint B")
    stream = stream_factors(spec, layout)
    if not stream:
        raise SpecError(f"spec {spec.name}: no factor acts on the residual stream (is the layout right?)")
    fixed = {n: spec.factors[n].identity() for n in stream}
    if first_fit not in ("free", "all"):
        raise SpecError(f"first_fit must be 'free' or 'all', got {first_fit!r}")
    a_f, b_f = fold(_f64(params_a), layout), fold(_f64(params_b), layout)
    first = (free_tensors(spec, layout, stream) if first_fit == "free" else []) or None
    O = procrustes(a_f, b_f, layout, first)
    g: GroupElement | None = None
    best: tuple[float, torch.Tensor, GroupElement] | None = None
    distances: list[float] = []
    objectives: list[float] = []
    converged, stale = False, 0
    for r in range(max_outer):
        rotated = act_orthogonal(b_f, layout, O)
        g = weight_matching(spec, a_f, rotated, fixed=fixed, init=g, seed=seed, backend=backend, max_sweeps=max_sweeps, progress=progress)
        current = act(spec, rotated, g)
        distances.append(relative_distance(current, a_f))
        objective = stream_objective(a_f, current, layout)
        objectives.append(objective)
        log.info("orthogonal stream: round %d, stream objective %.4g, folded distance %.4g", r + 1, objective, distances[-1])
        stale = 0 if best is None or objective < best[0] * (1 - min_gain) else stale + 1
        if best is None or objective < best[0]:
            best = (objective, O, g)
        if stale >= patience:  # at the rounding floor, or no more progress
            converged = True
            break
        delta = procrustes(a_f, current, layout)
        if float((delta - torch.eye(layout.d, dtype=torch.float64)).abs().max()) <= tol:
            converged = True
            break
        O = delta @ O
    assert best is not None
    return OrthogonalMatch(spec, layout, best[1], best[2], gains_of(params_a, layout), distances, objectives, len(distances), converged)


def match_orthogonal_activations(
    spec: Spec,
    layout: StreamLayout,
    model: torch.nn.Module,
    params_a: Params,
    params_b: Params,
    inputs: torch.Tensor,
    *,
    batch_size: int = 256,
    seed: int = 0,
    backend: str = "auto",
    max_sweeps: int = 100,
    progress: bool = False,
) -> OrthogonalMatch:
    """The stream O from activations: Procrustes on the cross-covariance of the normalised streams of the folded
    models (every norm's output, summed); heads and units from their activations too
    (:mod:`aligners.activation_matching`); weight matching then solves what is left (GL / RoPE per head, scalings)."""
    from .activation_matching import collect_activations, decide_from_activations

    spec.check_params(params_a, what="checkpoint A")
    spec.check_params(params_b, what="checkpoint B")
    stream = stream_factors(spec, layout)
    if not stream:
        raise SpecError(f"spec {spec.name}: no factor acts on the residual stream (is the layout right?)")
    a_f, b_f = fold(_f64(params_a), layout), fold(_f64(params_b), layout)
    dtype = next(v.dtype for v in params_a.values() if torch.is_floating_point(v))
    acts = collect_activations(spec, model, _cast(a_f, dtype), _cast(b_f, dtype), inputs, batch_size, progress)
    cross = [c for name, c in acts.stream_cross.items() if name in stream]
    if not cross:
        raise SpecError(f"spec {spec.name}: no norm output found for the stream (activation hooks)")
    O = nearest_orthogonal(sum(cross), layout.centred)
    fixed = decide_from_activations(spec, acts, {n: spec.factors[n].identity() for n in stream}, backend)
    rotated = act_orthogonal(b_f, layout, O)
    g = weight_matching(spec, a_f, rotated, fixed=fixed, seed=seed, backend=backend, max_sweeps=max_sweeps, progress=progress)
    current = act(spec, rotated, g)
    dist, objective = relative_distance(current, a_f), stream_objective(a_f, current, layout)
    log.info("orthogonal stream from activations: stream objective %.4g, folded distance %.4g", objective, dist)
    return OrthogonalMatch(spec, layout, O, g, gains_of(params_a, layout), [dist], [objective], 1, True)


def _cast(params: Params, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in params.items()}


def align_orthogonal(spec: Spec, layout: StreamLayout, params_a: Params, params_b: Params, **kwargs) -> dict[str, torch.Tensor]:
    """The aligned B: computes B's function, carries A's gains, stream rotated and heads/units/experts matched to A."""
    return match_orthogonal(spec, layout, params_a, params_b, **kwargs)(params_b)


__all__ = [
    "OrthogonalMatch",
    "align_orthogonal",
    "free_tensors",
    "match_orthogonal",
    "match_orthogonal_activations",
    "procrustes",
    "stream_factors",
    "stream_objective",
]
