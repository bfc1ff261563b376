"""Normal form of a Spec: virtual parameters whose every axis is acted on by whole factors.

A Spec lets one tensor axis carry several segments (GPT-2 ``c_attn``: [Q | K | V] along one axis) and one segment
carry a chain of factors (heads, the per-KV-group GL(d_h) with ``repeat``, a per-channel scale with ``block``).
The normal form removes both:

* every real parameter is cut into **virtual parameters**, one per combination of its axes' segments, named
  ``name`` (no axis has several segments) or ``name[i,j]`` (segment ``i`` of axis 0, ``j`` of axis 1; ``:`` for an
  axis with a single segment), e.g. ``attn.c_attn.weight[:,1]`` is the K block of GPT-2's fused projection;
* every virtual axis is **unflattened** into sub-axes, the common refinement of the factorisations
  ``units x repeat x unit entries x block`` of the factors acting on it (sizes 1 dropped: a level with one unit
  acts trivially), so each factor acts on whole sub-axes. Each sub-axis carries :class:`Label` s ``(factor, kind, role, side)`` with role

  ``unit``    the units a factor moves (neurons, channels, experts, KV groups of a GL(d_h) factor)
  ``group``   outer level of a two-level permutation (KV groups of a head permutation, GroupNorm groups)
  ``member``  inner level (a query head within its KV group, a channel within its norm group)
  ``repeat``  consecutive units sharing one element (query heads sharing their group's E)
  ``dim``     entries of one unit (head dims; a GL(d) block mixes them)
  ``pair``, ``coord``  RoPE frequency pairs and their two coordinates, always in the order (pair, coord):
              the ``half`` (rotate_half) layout is transposed so both layouts share one normal form
  ``block``   entries per scalar unit (the h*w pixels of a flattened channel).

``split`` / ``merge`` are exact index maps (slice, reshape, transpose; round trip exact) for torch tensors, numpy and
JAX arrays with ``lead`` leading batch axes and any trailing (channel) axes: a virtual tensor is
``[*lead, *sub-axes, *trailing]``. Pure data (frozen dataclasses); the action on virtual tensors lives with its
users (``metanets.weight_space``). Factor kinds it cannot express are refused with a :class:`SpecError`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .errors import SpecError
from .factors import Factor, Side
from .spec import On, ParamSpec, Segment, Spec

#: factor kinds the normal form can express (dispatch is on ``Factor.kind``, never on classes)
KINDS = frozenset(
    {"permutation", "grouped-permutation", "head-permutation", "positive-scaling", "norm-scale", "sign-flip",
     "general-linear", "rotation-scaling", "translation"}
)  # fmt: skip
PERMUTATION_KINDS = frozenset({"permutation", "grouped-permutation", "head-permutation"})
#: roles whose sub-axes index a factor's units (what a permutation moves, what a per-unit element is indexed by)
UNIT_ROLES = ("unit", "group", "member")


@dataclass(frozen=True)
class Label:
    """Factor ``factor`` (of ``kind``) acts on a sub-axis in ``role`` from ``side`` (``out``: g, ``in``: g^{-T})."""

    factor: str
    kind: str
    role: str
    side: Side

    def __str__(self) -> str:
        return f"{self.factor}:{self.role}/{self.side}"


@dataclass(frozen=True)
class SubAxis:
    size: int
    param_axis: int
    labels: tuple[Label, ...] = ()

    def __str__(self) -> str:
        return f"{self.size}" + (f"<{', '.join(map(str, self.labels))}>" if self.labels else "")


@dataclass(frozen=True)
class FactorUse:
    """One factor acting on one virtual parameter: the sub-axes of each role (indices into the virtual axes).

    ``level`` is ``heads`` or ``groups`` for a head permutation (query heads or KV groups), else ``units``;
    ``batch``: the sub-axes indexing a batched factor's batch (experts).
    """

    factor: str
    kind: str
    side: Side
    depth: int
    level: str
    parts: tuple[tuple[str, tuple[int, ...]], ...]
    batch: tuple[int, ...] = ()

    def axes(self, *roles: str) -> tuple[int, ...]:
        return tuple(sorted(i for role, idx in self.parts if role in roles for i in idx))


@dataclass(frozen=True)
class Piece:
    """Segment ``[offset, offset + size)`` of real axis ``param_axis``: sub-axes ``memory`` (memory order);
    normal sub-axis ``i`` is memory sub-axis ``order[i]``."""

    param_axis: int
    offset: int
    size: int
    memory: tuple[int, ...]
    order: tuple[int, ...]


@dataclass(frozen=True)
class VirtualParam:
    """One block of a real parameter (a combination of segments), unflattened into labelled sub-axes."""

    name: str
    param: str
    param_shape: tuple[int, ...]
    segments: tuple[int, ...]
    pieces: tuple[Piece, ...]
    axes: tuple[SubAxis, ...]
    uses: tuple[FactorUse, ...]  # in the order they act: deepest factors first, as symm.action does
    shifts: tuple[tuple[str, int], ...] = ()  # (translation factor, real axis it shifts along)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(a.size for a in self.axes)

    def carve(self, x: Any, lead: int = 0, broadcast_axis: int | None = None) -> Any:
        """``x`` ``[*lead, *param_shape, *trail]`` -> ``[*lead, *self.shape, *trail]`` (slice, reshape, transpose).

        ``broadcast_axis``: that real axis has size 1 in ``x`` (a translation row) and becomes size-1 sub-axes.
        """
        index = [slice(None)] * lead
        mem: list[int] = []
        for p in self.pieces:
            bcast = p.param_axis == broadcast_axis
            index.append(slice(None) if bcast else slice(p.offset, p.offset + p.size))
            mem.extend([1] * len(p.memory) if bcast else p.memory)
        y = x[tuple(index)]
        trail = tuple(y.shape[lead + len(self.pieces) :])
        y = y.reshape((*y.shape[:lead], *mem, *trail))
        return _permute(y, self._perm(lead, len(trail)))

    def uncarve(self, y: Any, lead: int = 0) -> Any:
        """Inverse of :meth:`carve`: ``[*lead, *self.shape, *trail]`` -> the segment block ``[*lead, *sizes, *trail]``."""
        n_trail = y.ndim - lead - len(self.axes)
        perm = self._perm(lead, n_trail)
        y = _permute(y, tuple(int(i) for i in np.argsort(perm)))
        trail = tuple(y.shape[y.ndim - n_trail :]) if n_trail else ()
        return y.reshape((*y.shape[:lead], *(p.size for p in self.pieces), *trail))

    def _perm(self, lead: int, n_trail: int) -> tuple[int, ...]:
        perm, start = list(range(lead)), lead
        for p in self.pieces:
            perm.extend(start + o for o in p.order)
            start += len(p.memory)
        return tuple(perm + list(range(start, start + n_trail)))

    def source_index(self) -> np.ndarray:
        """Flat indices into the real parameter, shaped like the virtual tensor: ``virtual = real.reshape(-1)[index]``."""
        return self.carve(np.arange(math.prod(self.param_shape)).reshape(self.param_shape))


@dataclass(frozen=True)
class NormalForm:
    """The virtual parameters of a Spec, with its factors (see the module docstring)."""

    name: str
    factors: tuple[Factor, ...]
    params: tuple[tuple[str, tuple[int, ...]], ...]
    virtual: tuple[VirtualParam, ...]

    @cached_property
    def factor(self) -> Mapping[str, Factor]:
        return {f.name: f for f in self.factors}

    @cached_property
    def by_name(self) -> Mapping[str, VirtualParam]:
        return {vp.name: vp for vp in self.virtual}

    @cached_property
    def of_param(self) -> Mapping[str, tuple[VirtualParam, ...]]:
        return {p: tuple(vp for vp in self.virtual if vp.param == p) for p, _ in self.params}

    def where(self, factor: str) -> list[tuple[str, int, Label]]:
        """Every ``(virtual param, sub-axis, label)`` where ``factor`` acts."""
        return [(vp.name, i, lab) for vp in self.virtual for i, ax in enumerate(vp.axes) for lab in ax.labels if lab.factor == factor]

    def split(self, params: Mapping[str, Any], lead: int = 0) -> dict[str, Any]:
        """Real ``[*lead, *shape, *trail]`` tensors -> virtual ``[*lead, *sub-axes, *trail]`` tensors."""
        _check_keys(dict(self.params), params, lead, "parameters")
        return {vp.name: vp.carve(params[vp.param], lead) for vp in self.virtual}

    def merge(self, virtual: Mapping[str, Any], lead: int = 0) -> dict[str, Any]:
        """Inverse of :meth:`split` (exact)."""
        _check_keys({vp.name: vp.shape for vp in self.virtual}, virtual, lead, "virtual tensors")
        out = {}
        for pname, _ in self.params:
            blocks = {vp.segments: vp.uncarve(virtual[vp.name], lead) for vp in self.of_param[pname]}
            out[pname] = _assemble(blocks, lead)
        return out

    def describe(self) -> str:
        """One line per virtual parameter: ``name (shape): sub-axis x sub-axis ...``."""
        lines = []
        for vp in self.virtual:
            shifts = "".join(f" + shift {f} along axis {a}" for f, a in vp.shifts)
            lines.append(f"{vp.name} {vp.shape}: " + " x ".join(map(str, vp.axes)) + shifts)
        return "\n".join(lines)


# ----- construction ---------------------------------------------------------------------------------------
def normal_form(spec: Spec) -> NormalForm:
    """The normal form of ``spec``; refuses factor kinds and layouts it cannot express."""
    for name, f in spec.factors.items():
        if f.kind not in KINDS:
            raise SpecError(f"normal form: factor {name!r} has kind {f.kind!r}, which it cannot express (known: {', '.join(sorted(KINDS))})")
    virtual = [vp for pname, ps in spec.params.items() for vp in _virtual_params(spec, pname, ps)]
    params = tuple((p, ps.shape) for p, ps in spec.params.items())
    return NormalForm(spec.name, tuple(spec.factors[n] for n in spec.factor_order), params, tuple(virtual))


def _axis_segments(ps: ParamSpec, axis: int) -> list[tuple[int, Segment]]:
    segs = ps.axes[axis] or (Segment(ps.shape[axis]),)
    offsets = itertools.accumulate((s.size for s in segs), initial=0)
    return list(zip(offsets, segs))


def _virtual_params(spec: Spec, pname: str, ps: ParamSpec) -> list[VirtualParam]:
    per_axis = [_axis_segments(ps, a) for a in range(len(ps.shape))]
    out = []
    for combo in itertools.product(*[range(len(s)) for s in per_axis]):
        carved = [_carve(spec, pname, a, *per_axis[a][i]) for a, i in enumerate(combo)]
        pieces = tuple(c[0] for c in carved)
        axes = tuple(ax for c in carved for ax in c[1])
        starts = list(itertools.accumulate((len(c[1]) for c in carved), initial=0))
        uses = [_use(spec, pname, ps, on, level, parts, starts, a) for a, c in enumerate(carved) for on, level, parts in c[2]]
        uses.sort(key=lambda u: -u.depth)
        name = _virtual_name(pname, combo, [len(s) for s in per_axis])
        shifts = tuple((s.factor, s.axis) for s in ps.shifts)
        out.append(VirtualParam(name, pname, ps.shape, tuple(combo), pieces, axes, tuple(uses), shifts))
    return out


def _virtual_name(pname: str, combo: tuple[int, ...], n_segments: list[int]) -> str:
    """``pname`` or ``pname[i,:]`` (segment index on axes with several segments, ``:`` elsewhere)."""
    if all(n == 1 for n in n_segments):
        return pname
    return f"{pname}[{','.join(':' if n == 1 else str(i) for i, n in zip(combo, n_segments))}]"


def _use(spec: Spec, pname: str, ps: ParamSpec, on: On, level: str, parts, starts: list[int], axis: int) -> FactorUse:
    f = spec.factors[on.factor]
    shifted = tuple((role, tuple(starts[axis] + i for i in idx)) for role, idx in parts)
    batch: tuple[int, ...] = ()
    if on.batch_axis is not None:
        b = on.batch_axis
        batch = tuple(range(starts[b], starts[b + 1]))
        if len(ps.axes[b]) > 1 or len(batch) != 1:
            raise SpecError(f"normal form: {pname!r} axis {b} batches factor {on.factor!r} ({f.kind}) but is not one plain sub-axis")
    return FactorUse(on.factor, f.kind, on.side, spec.depth(on.factor), level, shifted, batch)


def _factorisation(spec: Spec, where: str, size: int, on: On) -> tuple[str, list[tuple[str, int]]]:
    """How one factor factorises a segment, in memory order: ``(level, [(role, size), ...])``."""
    f = spec.factors[on.factor]
    level = "units"
    if f.kind == "head-permutation":
        try:
            units = f.level_units(size // (on.repeat * on.block))
        except ValueError as exc:
            raise SpecError(f"normal form: {where}: {exc}") from None
        level = "heads" if units == f.count else "groups"
        parts = [("group", f.groups)] + ([("member", f.heads_per_group)] if level == "heads" else [])
        parts += [("repeat", on.repeat), ("dim", f.head_dim)]
    elif f.kind == "grouped-permutation":
        parts = [("group", f.groups), ("member", f.per_group), ("repeat", on.repeat)]
    else:
        parts = [("unit", f.count), ("repeat", on.repeat)]
    if f.kind == "general-linear":
        parts.append(("dim", f.dim))
    elif f.kind == "rotation-scaling":
        pair, coord = ("pair", f.dim // 2), ("coord", 2)
        parts += [pair, coord] if f.layout == "interleaved" else [coord, pair]
    parts.append(("block", on.block))
    if math.prod(s for _, s in parts) != size:
        raise SpecError(f"normal form: {where}: factor {on.factor!r} ({f.kind}) factorises into {parts}, not the segment's {size} entries")
    return level, parts


def _refine(where: str, size: int, factorisations: list[list[tuple[str, int]]]) -> list[int]:
    """Common refinement: the sorted cumulative sizes (from the outermost sub-axis) of every factorisation."""
    cuts = {1, size}
    for parts in factorisations:
        cuts.update(itertools.accumulate((s for _, s in parts), lambda a, b: a * b))
    ordered = sorted(cuts)
    for a, b in zip(ordered, ordered[1:]):
        if b % a:
            raise SpecError(f"normal form: {where}: the factors' unit structures do not nest (cumulative sizes {ordered})")
    return ordered


def _carve(spec: Spec, pname: str, axis: int, offset: int, seg: Segment):
    """One segment -> (Piece, sub-axes in normal order, [(On, level, [(role, normal sub-axis indices)])])."""
    where = f"parameter {pname!r} axis {axis} (segment at {offset}, size {seg.size})"
    facts = [(on, *_factorisation(spec, where, seg.size, on)) for on in seg.acts]
    cuts = _refine(where, seg.size, [parts for _, _, parts in facts])
    memory = tuple(b // a for a, b in zip(cuts, cuts[1:])) or (seg.size,)
    spans = [(on, level, _spans(cuts, parts)) for on, level, parts in facts]
    order = _normal_order(spans, len(memory))
    position = {m: n for n, m in enumerate(order)}
    labels: list[list[Label]] = [[] for _ in memory]
    resolved = []
    for on, level, parts in spans:
        kind = spec.factors[on.factor].kind
        normal = tuple((role, tuple(position[m] for m in idx)) for role, idx in parts)
        for role, idx in normal:
            if kind not in PERMUTATION_KINDS and list(idx) != sorted(idx):
                raise SpecError(f"normal form: {where}: factor {on.factor!r} ({kind}) role {role!r} spans reordered sub-axes")
            for i in idx:
                labels[i].append(Label(on.factor, kind, role, on.side))
        resolved.append((on, level, tuple((role, tuple(sorted(idx))) for role, idx in normal)))
    axes = tuple(SubAxis(memory[m], axis, tuple(labels[n])) for n, m in enumerate(order))
    return Piece(axis, offset, seg.size, memory, tuple(order)), axes, resolved


def _spans(cuts: list[int], parts: list[tuple[str, int]]) -> list[tuple[str, tuple[int, ...]]]:
    """Memory sub-axes covered by each part of a factorisation (size-1 parts cover none)."""
    index = {c: i for i, c in enumerate(cuts)}
    out, c = [], 1
    for role, s in parts:
        if s > 1:
            out.append((role, tuple(range(index[c], index[c * s]))))
        c *= s
    return out


def _normal_order(spans, n: int) -> list[int]:
    """Memory order, except a RoPE ``coord`` sub-axis moves after its ``pair`` sub-axes (the ``half`` layout)."""
    order = list(range(n))
    for _, _, parts in spans:
        roles = dict(parts)
        coord, pair = roles.get("coord"), roles.get("pair")
        if coord and pair and coord[0] < pair[0]:
            order = [m for m in order if m not in coord]
            at = order.index(pair[-1]) + 1
            order[at:at] = list(coord)
    return order


# ----- array helpers (torch, numpy, JAX) ----------------------------------------------------------------
def _permute(x: Any, perm: tuple[int, ...]) -> Any:
    if perm == tuple(range(len(perm))):
        return x
    return x.permute(*perm) if isinstance(x, torch.Tensor) else x.transpose(perm)


def _concat(xs: list[Any], axis: int) -> Any:
    if isinstance(xs[0], torch.Tensor):
        return torch.cat(xs, dim=axis)
    namespace = getattr(xs[0], "__array_namespace__", None)
    return namespace().concat(xs, axis=axis) if namespace else np.concatenate(xs, axis=axis)


def _assemble(blocks: dict[tuple[int, ...], Any], lead: int) -> Any:
    """Concatenate segment blocks keyed by segment index per axis, innermost axis first."""
    while next(iter(blocks)):
        axis = len(next(iter(blocks))) - 1
        grouped: dict[tuple[int, ...], list[Any]] = {}
        for key in sorted(blocks):
            grouped.setdefault(key[:-1], []).append(blocks[key])
        blocks = {k: (xs[0] if len(xs) == 1 else _concat(xs, lead + axis)) for k, xs in grouped.items()}
    return blocks[()]


def _check_keys(expected: Mapping[str, tuple[int, ...]], given: Mapping[str, Any], lead: int, what: str) -> None:
    missing, extra = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    problems = [f"missing {missing[:6]}"] * bool(missing) + [f"unexpected {extra[:6]}"] * bool(extra)
    for name in sorted(set(expected) & set(given)):
        shape = tuple(given[name].shape)
        core = shape[lead : lead + len(expected[name])]
        if len(shape) < lead + len(expected[name]) or core != tuple(expected[name]):
            problems.append(f"{name}: shape {shape} does not hold {expected[name]} after {lead} leading axes")
    if problems:
        raise SpecError(f"normal form: {what} do not match: " + "; ".join(problems[:8]))


__all__ = ["KINDS", "FactorUse", "Label", "NormalForm", "Piece", "SubAxis", "VirtualParam", "normal_form"]
