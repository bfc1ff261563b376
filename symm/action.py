"""``act(spec, params, g)``: apply a group element to a flat state dict.

Normal form of an element on a parameter: ``W -> L(W + shifts)`` where ``L`` applies, on every axis
segment, the deepest factors first (continuous blocks, then child permutations, then their parents), i.e.
``M = P_root ... P_leaf C`` per axis. Computation is in float64 and cast back to the input dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from .errors import SpecError
from .factors import Permutation, PositiveScaling, SignFlip, Translation

if TYPE_CHECKING:
    from .element import GroupElement
    from .spec import ParamSpec, Spec


def act(spec: "Spec", params: Mapping[str, torch.Tensor], g: "GroupElement") -> dict[str, torch.Tensor]:
    """Return ``g . params`` as a new dict of new tensors; ``params`` is never modified."""
    if g.spec is not spec and g.spec != spec:
        raise SpecError("group element belongs to a different spec than the one acting")
    spec.check_params(params)
    return {name: act_param(spec, spec.params[name], x, g.values) for name, x in params.items()}


def act_differentiable(spec: "Spec", params: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``g . params`` in float64 with gradients flowing to ``params`` and to the element ``values`` (a mapping
    factor -> value, not checked: learned matching moves continuous values by gradient steps)."""
    spec.check_params(params)
    return {name: act_param(spec, spec.params[name], x, values, differentiable=True) for name, x in params.items()}


def act_param(
    spec: "Spec", ps: "ParamSpec", x: torch.Tensor, values: Mapping[str, torch.Tensor], differentiable: bool = False
) -> torch.Tensor:
    """Apply shifts then linear factors to one tensor (``differentiable``: keep the graph, return float64)."""
    if not ps.shifts and not any(seg.acts for _, _, seg in ps.segments()):
        return x.to(torch.float64) if differentiable else x.clone()
    if not torch.is_floating_point(x):
        raise SpecError(f"cannot transform a tensor of dtype {x.dtype}: symmetry factors act on floating-point weights")
    if differentiable:
        y = x.to(torch.float64)
        for shift in ps.shifts:
            y = spec.factors[shift.factor].shift(y, values[shift.factor], shift.axis)
        return apply_linear(spec, ps, y, values, keep_identities=True)
    y = x.detach() if _exact_in_any_dtype(spec, ps, values) else x.detach().to(torch.float64)
    for shift in ps.shifts:
        factor = spec.factors[shift.factor]
        assert isinstance(factor, Translation)
        y = factor.shift(y, values[shift.factor], shift.axis)
    y = apply_linear(spec, ps, y, values)
    out = y.to(x.dtype)
    return out.clone() if out.data_ptr() == x.data_ptr() else out


def _exact_in_any_dtype(spec: "Spec", ps: "ParamSpec", values: Mapping[str, torch.Tensor]) -> bool:
    """True when only discrete factors (gathers, sign flips) act non-trivially: exact in the tensor's own dtype."""
    if ps.shifts:
        return False
    names = {on.factor for _, _, seg in ps.segments() for on in seg.acts}
    return all(not spec.factors[n].is_continuous or spec.factors[n].is_identity(values[n], atol=0.0) for n in names)


def apply_linear(
    spec: "Spec", ps: "ParamSpec", y: torch.Tensor, values: Mapping[str, torch.Tensor], skip_axis: int | None = None,
    keep_identities: bool = False,
) -> torch.Tensor:
    """Apply every linear (non-translation) factor of ``ps`` to ``y``, deepest factors first (identity elements
    skipped unless ``keep_identities``: a gradient must reach them)."""
    jobs = [
        (spec.depth(on.factor), axis, offset, seg.size, on)
        for axis, offset, seg in ps.segments()
        if axis != skip_axis
        for on in seg.acts
    ]
    jobs.sort(key=lambda job: -job[0])
    for _, axis, offset, size, on in jobs:
        factor = spec.factors[on.factor]
        element = values[on.factor]
        if not (keep_identities and factor.is_continuous) and factor.is_identity(element, atol=0.0):
            continue
        seg = y.narrow(axis, offset, size)
        if on.batch_axis is None and isinstance(factor, Permutation):  # fast path: gather along the axis itself
            done = seg.index_select(axis, factor.entry_index(element, size, on.repeat, on.block))
        elif on.batch_axis is None and isinstance(factor, (PositiveScaling, SignFlip)):
            scale = factor.entry_values(element.to(y.dtype), on.side, on.repeat, on.block)
            done = seg * scale.reshape((-1,) + (1,) * (y.dim() - axis - 1))
        elif on.batch_axis is None:
            moved = seg.movedim(axis, -1)
            done = factor.apply(moved, element, on.side, on.repeat, on.block).movedim(-1, axis)
        else:
            moved = seg.movedim((on.batch_axis, axis), (0, -1))
            done = factor.apply(moved, values[on.factor], on.side, on.repeat, on.block)
            done = done.movedim((0, -1), (on.batch_axis, axis))
        if size == y.shape[axis]:
            y = done
        else:
            y = torch.cat([y.narrow(axis, 0, offset), done, y.narrow(axis, offset + size, y.shape[axis] - offset - size)], axis)
    return y
