"""Activation matching: the activations of A and B on the same inputs (forward hooks), then one assignment per
factor; what activations do not decide (continuous factors, translations) is then solved by weight matching with
these fixed.

- units (MLP neurons, conv channels): the Pearson correlation of the output channels of their module; gated units
  (SwiGLU, whose gate rows carry neither the scaling nor the sign) are read where they are consumed, the input of
  the down projection, ``silu(gate) * up``; units with a sign child are assigned on |corr|, signed by the matched entry;
- residual streams (a permutation named ``*stream``, read through norms): the correlation of every norm's output
  channels times the sign of that model's gain (the normalised stream, up to positive scales), averaged over the
  norms (signed streams: assignment on |corr|, the sign of the matched entry);
- attention heads: head i of A and head j of B are scored by the sum of squared canonical correlations of their
  outputs (the input of the output projection, d_h channels per head), which no per-head GL(d_h) changes; KV groups
  are matched as wholes (:func:`~aligners.solvers.permutation.grouped_assignment`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from symm.element import GroupElement
from symm.evaluate import functional
from symm.factors import HeadPermutation, Permutation, SignFlip
from symm.spec import Spec

from .assignment import linear_assignment
from .solvers.permutation import grouped_assignment
from .weight_matching import MatchInfo, weight_matching

log = logging.getLogger(__name__)


def hookable_factors(spec: Spec, model: nn.Module) -> dict[str, str]:
    """factor -> module name whose output channels (last axis of Linear, axis 1 of Conv) are the factor's units."""
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    streams = stream_hooks(spec, model)
    for name in spec.factor_order:
        f = spec.factors[name]
        if type(f) is not Permutation or f.batch or f.parent or name in streams:
            continue
        for pname, axis, offset, on in spec.uses(name):
            module = modules.get(pname.rsplit(".", 1)[0])
            full = spec.params[pname].shape[0] == f.count
            if axis == 0 and offset == 0 and on.side == "out" and full and pname.endswith(".weight") and isinstance(module, (nn.Linear, nn.Conv2d)):
                out[name] = pname.rsplit(".", 1)[0]
                break
    return out


def unit_hooks(spec: Spec, model: nn.Module) -> dict[str, str]:
    """factor -> where its units' values are read: the producing module's output (:func:`hookable_factors`), or
    ``"in:<consumer>"``, the input of the Linear that consumes them, when the producer does not carry the units' whole
    group (SwiGLU: the gate rows carry neither the scaling nor the sign; ``silu(gate) * up`` does)."""
    modules = dict(model.named_modules())
    out = {}
    for name, producer in hookable_factors(spec, model).items():
        children = {n for n, f in spec.factors.items() if f.parent == name and not f.batch}
        on_producer = {on.factor for _, _, seg in spec.params[f"{producer}.weight"].segments() for on in seg.acts}
        out[name] = producer
        if children <= on_producer:
            continue
        for pname, axis, offset, on in spec.uses(name):
            owner = pname.rsplit(".", 1)[0]
            full = spec.params[pname].shape[-1] == spec.factors[name].count
            if axis == 1 and offset == 0 and on.side == "in" and full and pname.endswith(".weight") and isinstance(modules.get(owner), nn.Linear):
                out[name] = "in:" + owner
                break
    return out


def stream_hooks(spec: Spec, model: nn.Module) -> dict[str, list[str]]:
    """stream factor (a permutation named ``*stream``) -> the norm modules whose outputs are its channels."""
    modules = dict(model.named_modules())
    out: dict[str, list[str]] = {}
    for name, f in spec.factors.items():
        if type(f) is not Permutation or not name.endswith("stream"):
            continue
        norms = []
        for pname, axis, _, on in spec.uses(name):
            owner = pname.rsplit(".", 1)[0]
            if pname.endswith(".weight") and spec.params[pname].shape == (f.count,) and on.side == "out" and owner in modules:
                if not isinstance(modules[owner], (nn.Linear, nn.Conv2d, nn.Embedding)):
                    norms.append(owner)
        if norms:
            out[name] = norms
    return out


def head_hooks(spec: Spec, model: nn.Module) -> dict[str, str]:
    """head factor -> the output projection whose input holds the heads' outputs (where its V/O GL acts ``in``)."""
    modules = dict(model.named_modules())
    out: dict[str, str] = {}
    for name, f in spec.factors.items():
        if not isinstance(f, HeadPermutation):
            continue
        vo = [c for c, cf in spec.factors.items() if cf.parent == name and cf.kind == "general-linear" and c.endswith(".vo")]
        for child in vo:
            for pname, _, _, on in spec.uses(child):
                owner = pname.rsplit(".", 1)[0]
                if on.side == "in" and pname.endswith(".weight") and owner in modules:
                    out[name] = owner
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


def _gain_sign(params, module: str) -> torch.Tensor:
    g = params[module + ".weight"].detach()
    return torch.where(g < 0, -1.0, 1.0).to(torch.float64)


class _Covariance:
    """Running sums for the full (within and cross) covariance of two sets of channels."""

    def __init__(self, cross_only: bool = False) -> None:
        self.n, self.cross_only = 0, cross_only
        self.sa = self.sb = self.saa = self.sbb = self.sab = 0.0

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.double(), b.double()
        self.n += a.shape[0]
        self.sa, self.sb, self.sab = self.sa + a.sum(0), self.sb + b.sum(0), self.sab + a.T @ b
        if not self.cross_only:
            self.saa, self.sbb = self.saa + a.T @ a, self.sbb + b.T @ b

    def blocks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ma, mb = self.sa / self.n, self.sb / self.n
        return (self.saa / self.n - torch.outer(ma, ma), self.sbb / self.n - torch.outer(mb, mb), self.sab / self.n - torch.outer(ma, mb))


def _inverse_sqrt(c: torch.Tensor, rel_eps: float = 1e-8) -> torch.Tensor:
    """C^{-1/2} of a batch of covariance matrices, eigenvalues floored at ``rel_eps`` x the largest."""
    w, v = torch.linalg.eigh(c)
    w = w.clamp_min(rel_eps * w.amax(-1, keepdim=True).clamp_min(1e-300))
    return v @ torch.diag_embed(w.rsqrt()) @ v.transpose(-1, -2)


def head_similarity(cov: _Covariance, n_heads: int) -> torch.Tensor:
    """(n_heads, n_heads): sum of squared canonical correlations of head i of A and head j of B (GL-invariant).

    The output projection's input holds the heads' outputs in head order: d_h = its width / n_heads."""
    caa, cbb, cab = cov.blocks()
    head_dim = caa.shape[0] // n_heads
    idx = torch.arange(n_heads)
    wa = _inverse_sqrt(caa.reshape(n_heads, head_dim, n_heads, head_dim)[idx, :, idx])  # (h, d_h, d_h)
    wb = _inverse_sqrt(cbb.reshape(n_heads, head_dim, n_heads, head_dim)[idx, :, idx])
    cross = cab.reshape(n_heads, head_dim, n_heads, head_dim).permute(0, 2, 1, 3)  # (h_a, h_b, d_h, d_h)
    whitened = wa[:, None] @ cross @ wb[None]
    return whitened.pow(2).sum((-1, -2))


@dataclass
class Activations:
    """What one pass over the inputs gives, per factor (rows: A's units, columns: B's)."""

    units: dict[str, torch.Tensor]  # Pearson correlations of unit outputs
    streams: dict[str, torch.Tensor]  # stream channel correlations, averaged over the norms
    heads: dict[str, torch.Tensor]  # sums of squared canonical correlations of head outputs
    stream_cross: dict[str, torch.Tensor]  # cross-covariance of the normalised stream, summed over the norms


@torch.no_grad()
def collect_activations(
    spec: Spec, model: nn.Module, params_a, params_b, inputs: torch.Tensor, batch_size: int = 256, progress: bool = True
) -> Activations:
    """One pass over ``inputs`` through A and B with hooks on unit modules, norms and output projections."""
    units, streams, heads = unit_hooks(spec, model), stream_hooks(spec, model), head_hooks(spec, model)
    modules = dict(model.named_modules())
    unit_m = {f: _Moments() for f in units}
    stream_m = {(f, m): _Moments() for f, ms in streams.items() for m in ms}
    stream_c = {(f, m): _Covariance(cross_only=True) for f, ms in streams.items() for m in ms}
    head_c = {f: _Covariance() for f in heads}
    captured: dict[str, torch.Tensor] = {}
    handles = [modules[m].register_forward_hook(lambda mod, inp, out, key=m: captured.__setitem__(key, _channels(out, mod)))
               for m in {m for m in units.values() if not m.startswith("in:")} | {m for ms in streams.values() for m in ms}]
    consumers = {m.removeprefix("in:") for m in units.values() if m.startswith("in:")} | set(heads.values())
    handles += [modules[m].register_forward_pre_hook(lambda mod, inp, key=m: captured.__setitem__("in:" + key, inp[0].reshape(-1, inp[0].shape[-1])))
                for m in consumers]
    f_model = functional(model)
    try:
        for start in tqdm(range(0, len(inputs), batch_size), desc="activations", disable=not progress, leave=False):
            x = inputs[start : start + batch_size]
            f_model(params_a, x)
            acts_a = dict(captured)
            f_model(params_b, x)
            for f, m in units.items():
                unit_m[f].add(acts_a[m], captured[m])
            for (f, m), mom in stream_m.items():  # norm output x sign(gain): the normalised stream, up to scale
                xa, xb = acts_a[m] * _gain_sign(params_a, m), captured[m] * _gain_sign(params_b, m)
                mom.add(xa, xb)
                stream_c[(f, m)].add(xa, xb)
            for f, m in heads.items():
                head_c[f].add(acts_a["in:" + m], captured["in:" + m])
    finally:
        for h in handles:
            h.remove()
    return Activations(
        {f: m.correlation() for f, m in unit_m.items()},
        {f: torch.stack([stream_m[(f, m)].correlation() for m in ms]).mean(0) for f, ms in streams.items()},
        {f: head_similarity(c, spec.factors[f].count) for f, c in head_c.items()},
        {f: sum(stream_c[(f, m)].blocks()[2] for m in ms) for f, ms in streams.items()},
    )


def activation_correlations(
    spec: Spec, model: nn.Module, params_a, params_b, inputs: torch.Tensor, batch_size: int = 256, progress: bool = True
) -> dict[str, torch.Tensor]:
    """factor -> (units of A, units of B) correlation, for unit and stream factors."""
    acts = collect_activations(spec, model, params_a, params_b, inputs, batch_size, progress)
    return {**acts.units, **acts.streams}


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
    """Match units, streams and heads on activations, then everything else by weight matching.

    ``fixed``: factor values decided elsewhere (kept exactly; their units are not matched by activations)."""
    given = dict(fixed or {})
    acts = collect_activations(spec, model, params_a, params_b, inputs, batch_size, progress)
    fixed = decide_from_activations(spec, acts, given, backend)
    log.info("activation matching fixed %d factors: %s", len(fixed), sorted(fixed))
    return weight_matching(spec, params_a, params_b, fixed=fixed, backend=backend, progress=progress, info=info, **weight_kwargs)


def decide_from_activations(spec: Spec, acts: Activations, given: Mapping[str, torch.Tensor], backend: str = "auto") -> dict[str, torch.Tensor]:
    """``given`` plus every unit, stream (and its signs) and head permutation the activations decide."""
    fixed = dict(given)
    for name, c in {**acts.units, **acts.streams}.items():
        if name in given:
            continue
        sign = next((n for n, f in spec.factors.items() if f.parent == name and isinstance(f, SignFlip) and n not in given), None)
        sigma = linear_assignment(c.abs() if sign else c, backend)
        fixed[name] = sigma
        if sign:
            matched = c.gather(-1, sigma.unsqueeze(-1)).squeeze(-1)
            element = torch.ones(len(sigma), dtype=torch.float64)
            element.scatter_(-1, sigma, torch.where(matched < 0, -1.0, 1.0).to(torch.float64))
            fixed[sign] = element
    for name, score in acts.heads.items():
        if name not in given:
            fixed[name] = grouped_assignment(score, spec.factors[name].groups, backend)
    return fixed
