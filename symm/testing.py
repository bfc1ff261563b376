"""Assertion helpers for symmetry properties (public, and tested to fail on broken symmetries).

All transforms run in float64 (:func:`symm.action.act`), so the check itself is never the source of error.
Errors are relative: ``max|f(g.theta)(x) - f(theta)(x)| / max|f(theta)(x)|``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .action import act
from .element import GroupElement
from .spec import Spec

Params = Mapping[str, torch.Tensor]
Fn = Callable[[Params], torch.Tensor]

#: default relative tolerance per dtype
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def tolerance_for(params: Params) -> float:
    dtypes = {v.dtype for v in params.values() if torch.is_floating_point(v)}
    return max(TOLERANCE.get(d, 1e-3) for d in dtypes) if dtypes else 1e-10


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.detach().abs().max().clamp_min(1e-30)
    return float((a.detach() - b.detach()).abs().max() / scale)


def max_param_difference(a: Params, b: Params) -> tuple[float, str]:
    """Largest absolute entry difference and the parameter holding it."""
    worst, where = 0.0, ""
    for k in a:
        d = float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
        if d > worst:
            worst, where = d, k
    return worst, where


def invariance_error(f: Fn, spec: Spec, params: Params, g: GroupElement) -> float:
    with torch.no_grad():
        return relative_error(f(act(spec, params, g)), f(params))


def assert_invariant(f: Fn, spec: Spec, params: Params, n_samples: int = 20, seed: int = 0, rtol: float | None = None) -> float:
    """Check ``f(g.theta) == f(theta)`` for ``n_samples`` random elements; returns the worst relative error.

    On failure, names the factor whose sampled element alone gives the largest error, and its parameters.
    """
    rtol = tolerance_for(params) if rtol is None else rtol
    worst = 0.0
    for i in range(n_samples):
        g = GroupElement.sample(spec, seed * 10007 + i)
        err = invariance_error(f, spec, params, g)
        worst = max(worst, err)
        if not err <= rtol:
            raise AssertionError(f"f(g.theta) != f(theta): relative error {err:.3e} > {rtol:.1e} (sample {i}); {_blame(f, spec, params, g)}")
    return worst


def _blame(f: Fn, spec: Spec, params: Params, g: GroupElement) -> str:
    errors = {name: invariance_error(f, spec, params, g.restrict([name])) for name in spec.factors}
    name = max(errors, key=errors.get)
    touched = sorted({p for p, *_ in spec.uses(name)} | {p for p, _ in spec.shifts_of(name)})
    return f"worst factor {name!r} ({spec.factors[name].kind}, relative error {errors[name]:.3e} alone) acting on {', '.join(touched[:6])}"


def assert_not_invariant(f: Fn, params: Params, transformed: Params, min_error: float = 1e-3) -> float:
    """Negative control: ``transformed`` must change ``f`` by at least ``min_error`` (relative)."""
    with torch.no_grad():
        err = relative_error(f(transformed), f(params))
    if not err >= min_error:
        raise AssertionError(f"negative control did not change the function: relative error {err:.3e} < {min_error:.1e}")
    return err


def assert_group_axioms(spec: Spec, params: Params, n_samples: int = 5, seed: int = 0, atol: float | None = None) -> None:
    """Identity, inverse and composition agree with the action; ``act`` never mutates its input."""
    atol = 1e-4 if atol is None else atol
    snapshot = {k: v.clone() for k, v in params.items()}
    identity = GroupElement.identity(spec)
    _assert_close(act(spec, params, identity), params, atol, "identity.act(theta) != theta")
    for i in range(n_samples):
        g, h = GroupElement.sample(spec, seed * 7919 + 2 * i), GroupElement.sample(spec, seed * 7919 + 2 * i + 1)
        _assert_close(act(spec, params, g.compose(g.inverse())), params, atol, f"(g g^-1).theta != theta (sample {i})")
        _assert_close(act(spec, params, g.inverse().compose(g)), params, atol, f"(g^-1 g).theta != theta (sample {i})")
        _assert_close(act(spec, params, g.compose(h)), act(spec, act(spec, params, h), g), atol, f"(g h).theta != g.(h.theta) (sample {i})")
        _assert_close(act(spec, act(spec, params, g), g.inverse()), params, atol, f"g^-1.(g.theta) != theta (sample {i})")
    _assert_close(params, snapshot, 0.0, "act mutated its input")


def _assert_close(a: Params, b: Params, atol: float, message: str) -> None:
    diff, where = max_param_difference(a, b)
    scale = max((float(v.double().abs().max()) for v in b.values() if v.numel()), default=1.0)
    if not diff <= atol * max(scale, 1.0):
        raise AssertionError(f"{message}: max difference {diff:.3e} in {where!r}")
