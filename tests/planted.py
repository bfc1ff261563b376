"""Helpers shared by the planted-recovery aligner tests (imported by test modules; not a conftest).

A *planted* problem: reference parameters A (float64, norms and running statistics moved away from their
defaults so that no two channels are interchangeable), an answer element ``h_star`` and ``B = h_star^{-1} . A``.
An aligner must return ``h`` with ``h . B == A``; for generic A the answer is unique, so every permutation
factor of ``h`` must equal ``h_star``'s exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from symm.action import act
from symm.element import GroupElement
from symm.errors import UnsupportedArchitecture
from symm.evaluate import state_dict_of
from symm.models import build_model, spec_for
from symm.spec import Spec

#: relative parameter distance ||h.B - A|| / ||A|| accepted as exact recovery (float64)
DIST_TOL = 1e-6
#: catalogue activations that exist only in Specs (no torch function): their parameters come from a stand-in
#: activation with the same parameter layout ("any" = an unknown elementwise activation: permutation only)
SPEC_ONLY_ACTIVATIONS = {"any": "gelu"}


def _replace(config, **changes):
    from dataclasses import replace

    return replace(config, **changes)


def reference_params(config, seed: int) -> dict[str, torch.Tensor]:
    """float64 state dict of ``build_model(config)`` initialised with ``seed``, norms and running stats perturbed.

    Norm gains/biases get N(0, 0.3^2) added (gains stay away from 0), BatchNorm running means N(0, 0.3^2),
    running variances ``+ U(0, 1)``. Spec-only activations take their stand-in's parameters.
    """
    torch.manual_seed(seed)
    try:
        model = build_model(config)
    except UnsupportedArchitecture:
        act = getattr(config, "activation", None)
        if act not in SPEC_ONLY_ACTIVATIONS:
            raise
        model = build_model(_replace(config, activation=SPEC_ONLY_ACTIVATIONS[act]))
    params = state_dict_of(model.double().eval())
    gen = torch.Generator().manual_seed(10_000 + seed)
    for k, v in params.items():
        if not torch.is_floating_point(v):
            continue
        if "running_var" in k:
            params[k] = v + torch.rand(v.shape, generator=gen, dtype=v.dtype)
        elif "norm" in k or "running_mean" in k:
            params[k] = v + 0.3 * torch.randn(v.shape, generator=gen, dtype=v.dtype)
    return params


def buildable(config) -> bool:
    """Whether the catalogue has both a Spec and (possibly via a stand-in activation) a reference model."""
    try:
        spec_for(config)
        reference_params(config, 0)
    except (UnsupportedArchitecture, ValueError):
        return False
    return True


def rel_distance(x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor]) -> float:
    """||x - y|| / ||y|| over every floating-point parameter (all concatenated)."""
    num = sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in y if torch.is_floating_point(y[k]))
    den = sum(float(y[k].double().pow(2).sum()) for k in y if torch.is_floating_point(y[k]))
    return (num / den) ** 0.5


def value_mismatch(spec: Spec, name: str, got: torch.Tensor, want: torch.Tensor, atol: float = 1e-12) -> str | None:
    """None if ``got`` is ``want`` (exactly for discrete factors, to ``atol`` relative for continuous ones)."""
    f = spec.factors[name]
    if got.shape != want.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if f.is_continuous:
        scale = max(1.0, float(want.abs().max()))
        err = float((got.double() - want.double()).abs().max())
        return None if err <= atol * scale else f"{name} ({f.kind}): max |diff| {err:.3e}"
    if torch.equal(got.to(want.dtype), want):
        return None
    return f"{name} ({f.kind}): got {got.flatten()[:12].tolist()} want {want.flatten()[:12].tolist()}"


def recovery_problems(
    spec: Spec, params: Mapping[str, torch.Tensor], planted: Mapping[str, torch.Tensor], h: GroupElement, h_star: GroupElement
) -> list[str]:
    """Everything wrong with ``h`` as the answer to ``planted = h_star^{-1} . params`` (empty when recovered)."""
    problems = []
    dist = rel_distance(act(spec, planted, h), params)
    if not dist <= DIST_TOL:
        problems.append(f"||h.B - A|| / ||A|| = {dist:.3e} > {DIST_TOL:.0e}")
    for name in spec.permutation_factors:
        bad = value_mismatch(spec, name, h.values[name], h_star.values[name])
        if bad:
            problems.append("permutation not recovered: " + bad)
    return problems


def plant(spec: Spec, params: Mapping[str, torch.Tensor], h_star: GroupElement) -> dict[str, torch.Tensor]:
    """``B = h_star^{-1} . A``; asserts that it really moved the weights (else the test proves nothing)."""
    planted = act(spec, params, h_star.inverse())
    assert rel_distance(planted, params) > 1e-3, "the planted element does not move the weights"
    return planted
