"""Views of a parameter as per-unit rows for one factor use (the raw material of every matching score)."""

from __future__ import annotations

import torch

from symm.factors import HeadPermutation
from symm.spec import On, Spec


def segment_units(spec: Spec, on: On, size: int) -> int:
    factor = spec.factors[on.factor]
    if isinstance(factor, HeadPermutation):
        return factor.level_units(size // (on.repeat * on.block))
    return factor.count


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
