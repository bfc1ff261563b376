"""Unit views: a parameter seen per unit of one factor (per neuron, per channel, per head, per KV group).

These are the per-unit quantities every job reads: the aligners correlate unit rows, the canonical scaling
balances per-unit squared norms, heads are compared through their per-role blocks, and conservation laws and
metanet features are built from the same views.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .spec import On, Segment, Spec


def segment_of(spec: Spec, pname: str, axis: int, offset: int) -> Segment:
    """The segment of ``pname`` starting at ``offset`` on ``axis``."""
    for a, o, seg in spec.params[pname].segments():
        if a == axis and o == offset:
            return seg
    raise KeyError(f"{pname}: no segment at axis {axis}, offset {offset}")


def segment_units(spec: Spec, on: On, size: int) -> int:
    """Units of ``on.factor`` in a segment of ``size`` entries (heads or KV groups for head permutations)."""
    return spec.factors[on.factor].level_units(size // (on.repeat * on.block))


def unit_blocks(spec: Spec, x: torch.Tensor, axis: int, offset: int, size: int, on: On) -> torch.Tensor:
    """``(*batch, units, per_unit, rest)``: the segment's units with their entries and all other axes flattened.

    A batched factor keeps its batch axis (experts) in front.
    """
    seg = x.narrow(axis, offset, size)
    units = segment_units(spec, on, size)
    if on.batch_axis is None:
        moved = seg.movedim(axis, 0)
        return moved.reshape(units, size // units, -1)
    moved = seg.movedim((on.batch_axis, axis), (0, 1))
    return moved.reshape(moved.shape[0], units, size // units, -1)


def unit_matrix(spec: Spec, x: torch.Tensor, axis: int, offset: int, size: int, on: On) -> torch.Tensor:
    """``(*batch, units, features)``: one row per unit."""
    blocks = unit_blocks(spec, x, axis, offset, size, on)
    return blocks.reshape(*blocks.shape[:-2], -1)


def use_matrix(spec: Spec, params: Mapping[str, torch.Tensor], pname: str, axis: int, offset: int, on: On) -> torch.Tensor:
    """:func:`unit_matrix` of one use ``(pname, axis, offset, on)`` as returned by ``spec.uses``."""
    size = segment_of(spec, pname, axis, offset).size
    return unit_matrix(spec, params[pname], axis, offset, size, on)


def unit_sq_norms(spec: Spec, params: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit of ``name``: squared norm of everything it acts on as ``out`` and as ``in`` (float64).

    For a neuron these are ||w_in||^2 + b^2 (the row producing it) and ||w_out||^2 (the column reading it).
    """
    f = spec.factors[name]
    out2 = torch.zeros(f.element_shape, dtype=torch.float64)
    in2 = torch.zeros(f.element_shape, dtype=torch.float64)
    for pname, axis, offset, on in spec.uses(name):
        sq = use_matrix(spec, params, pname, axis, offset, on).double().pow(2).sum(-1)
        if on.side == "out":
            out2 += sq
        else:
            in2 += sq
    return out2, in2


def role_blocks(spec: Spec, params: Mapping[str, torch.Tensor], heads: str) -> dict[tuple[str, str], torch.Tensor]:
    """Per (child factor of ``heads``, side): ``(units, d_h, features)`` stacked over the parameters where both act.

    For the Q/K child, side ``out`` holds Q and ``in`` holds K; for the V/O child, V and O. Units are query heads
    or KV groups, whichever the parameter holds.
    """
    children = {n for n, f in spec.factors.items() if f.parent == heads}
    parts: dict[tuple[str, str], list[torch.Tensor]] = {}
    for pname, ps in sorted(spec.params.items()):
        for axis, offset, seg in ps.segments():
            acts = {on.factor: on for on in seg.acts}
            if heads not in acts:
                continue
            for child in children & set(acts):
                blocks = unit_blocks(spec, params[pname].double(), axis, offset, seg.size, acts[heads])
                parts.setdefault((child, acts[child].side), []).append(blocks)
    return {key: torch.cat(b, dim=-1) for key, b in parts.items()}


def group_gram(xa: torch.Tensor, xb: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, d, d)``: per group of units, sum over its units of X_a X_b^T (X: ``(units, d, features)``)."""
    xa = xa.reshape(n, -1, *xa.shape[-2:])
    xb = xb.reshape(n, -1, *xb.shape[-2:])
    return torch.einsum("nkar,nkbr->nab", xa, xb)
