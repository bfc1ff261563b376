"""Activation matching: per factor, the correlation of hidden activations of A and B on the same inputs
(collected with forward hooks), then one linear assignment. Factors whose units are not the output of one
module (residual streams, heads, continuous factors) are then solved by weight matching with these fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from symm.element import GroupElement
from symm.evaluate import functional
from symm.factors import Permutation, SignFlip
from symm.spec import Spec

from .assignment import linear_assignment
from .weight_matching import MatchInfo, weight_matching

log = logging.getLogger(__name__)


def hookable_factors(spec: Spec, model: nn.Module) -> dict[str, str]:
    """factor -> module name whose output channels (last axis of Linear, axis 1 of Conv) are the factor's units."""
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for name in spec.factor_order:
        f = spec.factors[name]
        if type(f) is not Permutation or f.batch or f.parent:
            continue
        for pname, axis, offset, on in spec.uses(name):
            module = modules.get(pname.rsplit(".", 1)[0])
            full = spec.params[pname].shape[0] == f.count
            if axis == 0 and offset == 0 and on.side == "out" and full and pname.endswith(".weight") and isinstance(module, (nn.Linear, nn.Conv2d)):
                out[name] = pname.rsplit(".", 1)[0]
                break
    return out


class _Moments:
    """Running sums for the Pearson correlation of two sets of channels."""

    def __init__(self) -> None:
        self.n = 0
        self.sa = self.sb = self.saa = self.sbb = self.sab = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.n += a.shape[0]
        self.sa = self.sa + a.sum(0)
        self.sb = self.sb + b.sum(0)
        self.saa = self.saa + (a * a).sum(0)
        self.sbb = self.sbb + (b * b).sum(0)
        self.sab = self.sab + a.T @ b

    def correlation(self) -> torch.Tensor:
        ma, mb = self.sa / self.n, self.sb / self.n
        va = (self.saa / self.n - ma * ma).clamp_min(1e-12)
        vb = (self.sbb / self.n - mb * mb).clamp_min(1e-12)
        cov = self.sab / self.n - torch.outer(ma, mb)
        return cov / torch.outer(va.sqrt(), vb.sqrt())


def _channels(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def activation_correlations(
    spec: Spec, model: nn.Module, params_a, params_b, inputs: torch.Tensor, batch_size: int = 256, progress: bool = True
) -> dict[str, torch.Tensor]:
    targets = hookable_factors(spec, model)
    modules = dict(model.named_modules())
    moments = {f: _Moments() for f in targets}
    captured: dict[str, torch.Tensor] = {}
    handles = [
        modules[m].register_forward_hook(lambda mod, inp, out, key=f: captured.__setitem__(key, _channels(out, mod)))
        for f, m in targets.items()
    ]
    f_model = functional(model)
    try:
        for start in tqdm(range(0, len(inputs), batch_size), desc="activations", disable=not progress, leave=False):
            x = inputs[start : start + batch_size]
            f_model(params_a, x)
            acts_a = dict(captured)
            f_model(params_b, x)
            for name in targets:
                moments[name].add(acts_a[name], captured[name])
    finally:
        for h in handles:
            h.remove()
    return {name: m.correlation() for name, m in moments.items()}


def activation_matching(
    spec: Spec,
    model: nn.Module,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    inputs: torch.Tensor,
    *,
    batch_size: int = 256,
    backend: str = "auto",
    progress: bool = True,
    info: MatchInfo | None = None,
    fixed: Mapping[str, torch.Tensor] | None = None,
    **weight_kwargs,
) -> GroupElement:
    """Match hookable units by activation correlation, then everything else by weight matching.

    ``fixed``: factor values decided elsewhere (kept exactly; their units are not matched by activations)."""
    given = dict(fixed or {})
    corr = {n: c for n, c in activation_correlations(spec, model, params_a, params_b, inputs, batch_size, progress).items() if n not in given}
    fixed = dict(given)
    for name, c in corr.items():
        sign = next((n for n, f in spec.factors.items() if f.parent == name and isinstance(f, SignFlip) and n not in given), None)
        sigma = linear_assignment(c.abs() if sign else c, backend)
        fixed[name] = sigma
        if sign:
            matched = c.gather(-1, sigma.unsqueeze(-1)).squeeze(-1)
            element = torch.ones(len(sigma), dtype=torch.float64)
            element.scatter_(-1, sigma, torch.where(matched < 0, -1.0, 1.0).to(torch.float64))
            fixed[sign] = element
    log.info("activation matching fixed %d factors: %s", len(fixed), sorted(fixed))
    return weight_matching(spec, params_a, params_b, fixed=fixed, backend=backend, progress=progress, info=info, **weight_kwargs)
