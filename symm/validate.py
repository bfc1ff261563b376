"""Spec validation: every malformed case gets a SpecError naming the parameter, axis and factor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import SpecError
from .factors import Factor, HeadPermutation, PositiveScaling, SignFlip, Translation

if TYPE_CHECKING:
    from .spec import On, ParamSpec, Spec


def validate_spec(spec: "Spec") -> None:
    if not spec.params:
        raise SpecError("a spec needs at least one parameter")
    _check_factor_table(spec)
    for name, ps in spec.params.items():
        _check_param(spec, name, ps)
    _check_usage(spec)


def _check_factor_table(spec: "Spec") -> None:
    for name, f in spec.factors.items():
        if f.name != name:
            raise SpecError(f"factor table key {name!r} holds a factor named {f.name!r}")
        if len(f.batch) > 1:
            raise SpecError(f"factor {name!r}: at most one batch axis is supported, got batch {f.batch}")
        if f.parent is None:
            if f.batch:
                raise SpecError(f"factor {name!r} is batched but has no parent to index its batch")
            continue
        parent = spec.factors.get(f.parent)
        if parent is None:
            raise SpecError(f"factor {name!r}: unknown parent factor {f.parent!r}")
        if not parent.is_permutation:
            raise SpecError(f"factor {name!r}: parent {f.parent!r} is a {parent.kind}; a parent must permute units")
        _check_parent_units(f, parent)
    for name in spec.factors:  # cycles
        seen = {name}
        parent = spec.factors[name].parent
        while parent is not None:
            if parent in seen:
                raise SpecError(f"factor {name!r}: parent chain has a cycle through {parent!r}")
            seen.add(parent)
            parent = spec.factors[parent].parent


def _check_parent_units(child: Factor, parent: Factor) -> None:
    n = child.n_units
    ok = n % parent.n_units == 0 or (isinstance(parent, HeadPermutation) and n == parent.groups)
    if not ok:
        raise SpecError(
            f"factor {child.name!r} has {n} units, which its parent {parent.name!r} ({parent.n_units} units) cannot index"
        )


def _ancestors(spec: "Spec", name: str) -> list[str]:
    out = []
    parent = spec.factors[name].parent
    while parent is not None:
        out.append(parent)
        parent = spec.factors[parent].parent
    return out


def _check_param(spec: "Spec", name: str, ps: "ParamSpec") -> None:
    if len(ps.axes) != len(ps.shape):
        raise SpecError(f"parameter {name!r}: {len(ps.axes)} axis entries for shape {ps.shape}")
    for axis, segs in enumerate(ps.axes):
        if segs and sum(s.size for s in segs) != ps.shape[axis]:
            sizes = "+".join(str(s.size) for s in segs)
            raise SpecError(f"parameter {name!r} axis {axis}: segments {sizes} do not add up to its size {ps.shape[axis]}")
    for axis, _, seg in ps.segments():
        for on in seg.acts:
            _check_on(spec, name, ps, axis, seg.size, on)
        _check_chain(spec, name, axis, seg.acts)
    for shift in ps.shifts:
        _check_shift(spec, name, ps, shift)


def _check_on(spec: "Spec", name: str, ps: "ParamSpec", axis: int, size: int, on: "On") -> None:
    where = f"parameter {name!r} axis {axis}"
    f = spec.factors.get(on.factor)
    if f is None:
        raise SpecError(f"{where}: unknown factor {on.factor!r}")
    if isinstance(f, Translation):
        raise SpecError(f"{where}: translation {on.factor!r} acts through Shift(...), not On(...)")
    per_unit = on.repeat * f.unit_size * on.block
    if isinstance(f, HeadPermutation):
        units_ok = size in (f.count * per_unit, f.groups * per_unit)
        expected = f"{f.count} heads or {f.groups} KV groups x {per_unit}"
    else:
        units_ok = size == f.count * per_unit
        expected = f"{f.count} units x {per_unit}"
    if not units_ok:
        raise SpecError(f"{where}: factor {on.factor!r} needs {expected} entries, the segment has {size}")
    if f.batch:
        b = on.batch_axis
        if b is None or not 0 <= b < len(ps.shape) or b == axis:
            raise SpecError(f"{where}: batched factor {on.factor!r} needs batch_axis naming another axis of the parameter")
        if ps.shape[b] != f.batch[0]:
            raise SpecError(f"{where}: factor {on.factor!r} batch {f.batch[0]} != size {ps.shape[b]} of batch axis {b}")
        on_batch = {o.factor for s in ps.axes[b] for o in s.acts}
        if not on_batch & set(_ancestors(spec, on.factor)):
            raise SpecError(f"{where}: batch axis {b} of batched factor {on.factor!r} does not carry its parent {f.parent!r}")
    elif on.batch_axis is not None:
        raise SpecError(f"{where}: factor {on.factor!r} is not batched but batch_axis={on.batch_axis} was given")


def _check_chain(spec: "Spec", name: str, axis: int, acts: tuple["On", ...]) -> None:
    """Factors sharing a segment must nest (each a descendant of the next), except diagonal siblings (a scaling and a
    sign of one permutation's units: they commute); unbatched children sit with their parent."""
    names = [on.factor for on in acts]
    if len(set(names)) != len(names):
        raise SpecError(f"parameter {name!r} axis {axis}: a factor is listed twice on one segment: {names}")
    for a in names:
        for b in names:
            if a < b and a not in _ancestors(spec, b) and b not in _ancestors(spec, a) and not _diagonal_siblings(spec, a, b):
                raise SpecError(
                    f"parameter {name!r} axis {axis}: factors {a!r} and {b!r} share a segment but neither is the "
                    "other's parent; declare the continuous factor with parent=<the permutation>"
                )
    for a in names:
        f = spec.factors[a]
        if f.parent and not f.batch and f.parent not in names:
            raise SpecError(
                f"parameter {name!r} axis {axis}: factor {a!r} acts without its parent {f.parent!r} on the same segment"
            )


def _diagonal_siblings(spec: "Spec", a: str, b: str) -> bool:
    """Two per-unit diagonal factors (scaling, sign) of the same parent: elementwise, so they commute."""
    fa, fb = spec.factors[a], spec.factors[b]
    return fa.parent is not None and fa.parent == fb.parent and isinstance(fa, (PositiveScaling, SignFlip)) and isinstance(fb, (PositiveScaling, SignFlip))


def _check_shift(spec: "Spec", name: str, ps: "ParamSpec", shift) -> None:
    where = f"parameter {name!r}"
    f = spec.factors.get(shift.factor)
    if not isinstance(f, Translation):
        raise SpecError(f"{where}: Shift names {shift.factor!r}, which is not a translation factor")
    if not 0 <= shift.axis < len(ps.shape):
        raise SpecError(f"{where}: shift axis {shift.axis} out of range for shape {ps.shape}")
    row = 1
    for i, s in enumerate(ps.shape):
        if i != shift.axis:
            row *= s
    if row != f.count:
        raise SpecError(f"{where}: translation {shift.factor!r} has {f.count} entries, a row along axis {shift.axis} has {row}")
    for seg in ps.axes[shift.axis]:
        for on in seg.acts:
            if not spec.factors[on.factor].is_permutation:
                raise SpecError(f"{where}: shift axis {shift.axis} carries non-permutation factor {on.factor!r}")
    for axis, _, seg in ps.segments():
        for on in seg.acts:
            if on.batch_axis == shift.axis:
                raise SpecError(f"{where}: factor {on.factor!r} is batched along the shift axis {shift.axis}")


def _check_usage(spec: "Spec") -> None:
    sides: dict[str, set[str]] = {n: set() for n in spec.factors}
    places: dict[str, list[str]] = {n: [] for n in spec.factors}
    for pname, ps in spec.params.items():
        for axis, _, seg in ps.segments():
            for on in seg.acts:
                sides[on.factor].add(on.side)
                places[on.factor].append(f"{pname}[{axis}]")
        for s in ps.shifts:
            sides[s.factor].add("shift")
            places[s.factor].append(pname)
    for fname, used in sides.items():
        if not used:
            raise SpecError(f"factor {fname!r} is declared but acts on no parameter")
        if isinstance(spec.factors[fname], Translation):
            if len(places[fname]) != 1:
                raise SpecError(f"translation {fname!r} must shift exactly one parameter, shifts {places[fname]}")
            continue
        where = ", ".join(places[fname][:6])
        if spec.factors[fname].one_sided:
            _check_one_sided(spec, fname, used)
            continue
        if "in" not in used:
            raise SpecError(
                f"factor {fname!r} is only produced (side 'out' on {where}) and never consumed: "
                "add it with side 'in' on the axis that reads these units"
            )
        if "out" not in used:
            raise SpecError(
                f"factor {fname!r} is only consumed (side 'in' on {where}) and never produced: "
                "add it with side 'out' on the axis that writes these units"
            )


def _check_one_sided(spec: "Spec", fname: str, used: set[str]) -> None:
    """A one-sided factor (a norm scale) acts as ``out`` on the rows a normalisation reads, and never as ``in``."""
    f = spec.factors[fname]
    if "in" in used:
        consumers = [f"{p}[{axis}]" for p, axis, _, on in _uses(spec, fname) if on.side == "in"]
        raise SpecError(
            f"factor {fname!r} ({f.kind}) acts on the producer side only, but has side 'in' on {', '.join(consumers[:6])}: "
            "a following normalisation absorbs it, so no layer consumes it"
        )
    if "out" not in used:
        raise SpecError(f"factor {fname!r} ({f.kind}) must act with side 'out' on the rows its normalisation reads")


def _uses(spec: "Spec", fname: str):
    for pname, ps in spec.params.items():
        for axis, offset, seg in ps.segments():
            for on in seg.acts:
                if on.factor == fname:
                    yield pname, axis, offset, on
