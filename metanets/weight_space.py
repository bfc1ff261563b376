"""Weight-space features for JAX metanetworks: a zoo batch in the Spec's normal form, and the group acting on it.

A metanetwork reads a zoo batch as a pytree keyed by **virtual parameter**, each ``[batch, *sub-axes, channels]``,
and every sub-axis is labelled by the factors acting on it (:func:`symm.normal_form.normal_form`; ``nf.describe()``
prints the table). The normal form is derived from the Spec in one place: a real parameter is cut into one virtual
parameter per combination of its axes' segments (``name[:,1]``: segment 1 of axis 1), and each axis is unflattened
into units x per-unit sub-axes so that every factor acts on whole sub-axes, labelled ``factor:role/side`` with role
``unit``, ``group`` / ``member`` (the two levels of a head or GroupNorm-channel permutation), ``repeat``, ``dim``,
``pair`` / ``coord`` (RoPE, always (pair, coord) whatever the layout) or ``block``. Worked examples:

* GPT-2 ``c_attn`` (Conv1D (d, 3d) = [Q | K | V] columns; d = 16, 4 heads of 4) becomes three virtual parameters::

    h.0.attn.c_attn.weight[:,0] (16, 4, 4): 16<stream:unit/in> x 4<heads:group/out, qk:unit/out> x 4<heads:dim/out, qk:dim/out>
    h.0.attn.c_attn.weight[:,1] (16, 4, 4): 16<stream:unit/in> x 4<heads:group/in, qk:unit/in> x 4<heads:dim/in, qk:dim/in>
    h.0.attn.c_attn.weight[:,2] (16, 4, 4): 16<stream:unit/in> x 4<heads:group/out, vo:unit/out> x 4<heads:dim/out, vo:dim/out>

  (Q takes E, K takes E^{-T}, V takes F; with one query head per KV group every head is its own ``group``).
* GQA with RoPE (4 query heads in 2 KV groups, head_dim 8, ``half`` layout): the head permutation acts at two
  levels, on query heads (``group`` x ``member``) and on KV heads (``group`` only); the rotation-scaling acts per KV
  group, shared by its query heads (``repeat``), on (pair, coord)::

    q_proj.weight (2, 2, 4, 2, 32): 2<heads:group/out, qk:unit/out> x 2<heads:member/out, qk:repeat/out>
                                    x 4<heads:dim/out, qk:pair/out> x 2<heads:dim/out, qk:coord/out> x 32<stream:unit/in>
    k_proj.weight (2, 4, 2, 32):    2<heads:group/in, qk:unit/in> x 4<heads:dim/in, qk:pair/in> x 2<heads:dim/in, qk:coord/in> x 32<stream:unit/in>
    o_proj.weight (32, 2, 2, 8):    32<stream:unit/out> x 2<heads:group/in, vo:unit/in> x 2<heads:member/in, vo:repeat/in> x 8<heads:dim/in, vo:dim/in>

* A CNN whose head reads the flattened (16 channels x 2 x 2 pixels) feature map::

    head.weight (10, 16, 4): 10 x 16<convs.1.channels:unit/in, convs.1.channels.scale:unit/in> x 4<convs.1.channels:block/in, ...>

The action (:func:`act_features`, pure JAX, jit-able with :func:`element_arrays` as a pytree) applies a
:class:`~symm.element.GroupElement` to features with a trailing channel axis, each channel as a copy of the weights:
``merge(act_features(split(theta)[..., None], g))[..., 0] == act(spec, theta, g)`` (float32 to 1e-6, float64 to
1e-12, tested for every catalogue entry). Kinds: permutations (plain, grouped, head at both levels, batched per
expert), positive scalings, norm scales (``out`` only), sign flips, GL(d) blocks and RoPE rotation-scalings (as a
2x2 matrix per pair), translations. A translation (softmax router shift) makes the action affine, ``x -> L(x + t)``:
every channel receives the same ``t``, right for channels that are weights (a zoo, interpolated weights); for
features that transform linearly (differences of weights, gradients, hidden metanet features) pass ``affine=False``.

Usage::

    nf = normal_form(spec)
    features = to_features(nf, zoo_batch)              # {virtual name: [batch, *sub-axes, 1]}
    moved = act_features(nf, features, GroupElement.sample(spec, 0))
    act = jit_action(nf); moved = act(features, element_arrays(g))
    weights = from_features(nf, moved)                 # {name: [batch, *shape, 1]} numpy
"""

from __future__ import annotations

import functools
import string
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import torch

from symm.element import GroupElement
from symm.errors import SpecError
from symm.factors import Factor
from symm.normal_form import UNIT_ROLES, FactorUse, NormalForm, VirtualParam

#: ``{virtual parameter name: [*batch, *sub-axes, channels]}``
Features = dict[str, jax.Array]
#: ``{"out": {factor: array}, "in": {factor: array}}``: each factor's element as it acts on each side
ElementArrays = dict[str, dict[str, jax.Array]]


# ----- zoo batches <-> features ---------------------------------------------------------------------------
def to_features(nf: NormalForm, params_batch: Mapping[str, Any], *, dtype: Any = jnp.float32) -> Features:
    """``{name: [batch, *shape]}`` (torch or numpy) -> ``{virtual name: [batch, *sub-axes, 1]}`` JAX arrays of ``dtype``.

    Every parameter becomes features, integer buffers (BatchNorm's ``num_batches_tracked``) included, cast to ``dtype``.
    """
    virtual = nf.split({k: _numpy(v) for k, v in params_batch.items()}, lead=1)
    return {name: jnp.asarray(v[..., None], dtype=dtype) for name, v in virtual.items()}


def from_features(nf: NormalForm, features: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Inverse of :func:`to_features`, channels kept: ``{name: [*batch, *shape, channels]}`` numpy arrays."""
    lead = _lead(nf, features)
    return nf.merge({k: np.asarray(v) for k, v in features.items()}, lead=lead)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64) else x).numpy()
    return np.asarray(x)


def _lead(nf: NormalForm, features: Mapping[str, Any]) -> int:
    """Leading batch axes, the same for every feature: ``ndim - len(sub-axes) - 1`` (one trailing channel axis)."""
    leads = {features[vp.name].ndim - len(vp.shape) - 1 for vp in nf.virtual if vp.name in features}
    if len(leads) != 1 or min(leads) < 0:
        raise SpecError(f"features must be [*batch, *sub-axes, channels] with one batch rank for all; got batch ranks {sorted(leads)}")
    return leads.pop()


# ----- the group element as JAX arrays ---------------------------------------------------------------------
def _perm_arrays(f: Factor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Gather indices; a permutation matrix is orthogonal, so both sides use them."""
    index = v.numpy().astype(np.int32)
    return index, index


def _diag_arrays(f: Factor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-unit multipliers a (``out``) and 1/a (``in``)."""
    a = v.double().numpy()
    return a, 1.0 / a


def _gl_arrays(f: Factor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """M (``out``) and M^{-T} (``in``), inverted in float64."""
    m = v.double().numpy()
    return m, np.swapaxes(np.linalg.inv(m), -1, -2)


def _rope_arrays(f: Factor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per pair the 2x2 matrix a I + b J (``out``) and (a I + b J)^{-T} = (a I + b J) / (a^2 + b^2) (``in``)."""
    a, b = v[..., 0].double().numpy(), v[..., 1].double().numpy()
    m = np.stack([np.stack([a, -b], -1), np.stack([b, a], -1)], -2)
    return m, m / (a * a + b * b)[..., None, None]


def _shift_arrays(f: Factor, v: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    t = v.double().numpy()
    return t, t


ELEMENT_ARRAYS: dict[str, Callable[[Factor, torch.Tensor], tuple[np.ndarray, np.ndarray]]] = {
    "permutation": _perm_arrays,
    "grouped-permutation": _perm_arrays,
    "head-permutation": _perm_arrays,
    "positive-scaling": _diag_arrays,
    "norm-scale": _diag_arrays,
    "sign-flip": _diag_arrays,
    "general-linear": _gl_arrays,
    "rotation-scaling": _rope_arrays,
    "translation": _shift_arrays,
}


def element_arrays(element: GroupElement) -> ElementArrays:
    """Convert a :class:`GroupElement` once (inverses in float64; floats become JAX's default float dtype)."""
    out: ElementArrays = {"out": {}, "in": {}}
    for name, f in element.spec.factors.items():
        convert = ELEMENT_ARRAYS.get(f.kind)
        if convert is None:
            raise SpecError(f"weight-space action: factor {name!r} has kind {f.kind!r}, which has no JAX action")
        for side, array in zip(("out", "in"), convert(f, element.values[name])):
            out[side][name] = jnp.asarray(array)
    return out


# ----- the action on features -------------------------------------------------------------------------------
def act_features(nf: NormalForm, features: Mapping[str, jax.Array], element: GroupElement | ElementArrays, *, affine: bool = True) -> Features:
    """``g . features`` on ``[*batch, *sub-axes, channels]`` features: every channel transforms as a copy of the weights.

    ``element``: a :class:`GroupElement` or its :func:`element_arrays` (a pytree: pass that under ``jax.jit``).
    ``affine=False`` drops translations (router shifts): the action on differences of weights (tangent vectors).
    """
    arrays = element_arrays(element) if isinstance(element, GroupElement) else element
    missing = sorted(set(nf.factor) - set(arrays["out"]))
    if missing:
        raise SpecError(f"act_features: the element has no value for factor(s) {missing[:6]} of spec {nf.name!r}")
    absent, extra = sorted(set(nf.by_name) - set(features)), sorted(set(features) - set(nf.by_name))
    if absent or extra:
        raise SpecError(f"act_features: features miss virtual parameters {absent[:6]}, unexpected {extra[:6]}")
    lead = _lead(nf, features)
    return {vp.name: act_virtual(nf, vp, features[vp.name], arrays, lead, affine=affine) for vp in nf.virtual}


def act_virtual(nf: NormalForm, vp: VirtualParam, x: jax.Array, arrays: ElementArrays, lead: int, *, affine: bool = True) -> jax.Array:
    """Shifts first, then every factor deepest first: ``x -> L(x + t)``, exactly as :func:`symm.action.act_param`."""
    if tuple(x.shape[lead : lead + len(vp.shape)]) != vp.shape:
        raise SpecError(f"{vp.name}: feature shape {tuple(x.shape)} does not hold sub-axes {vp.shape} after {lead} batch axes")
    if affine:
        for factor, axis in vp.shifts:
            x = x + _shift_piece(vp, arrays["out"][factor], axis).astype(x.dtype)[..., None]
    for use in vp.uses:
        action = ACTIONS.get(use.kind)
        if action is None:
            raise SpecError(f"weight-space action: factor {use.factor!r} has kind {use.kind!r}, which has no JAX action")
        x = action(nf.factor[use.factor], use, x, arrays[use.side][use.factor], lead)
    return x


def _shift_piece(vp: VirtualParam, t: jax.Array, axis: int) -> jax.Array:
    """The translation row, carved like ``vp`` and broadcast (size-1 sub-axes) along the shifted axis."""
    row = list(vp.param_shape)
    row[axis] = 1
    return vp.carve(t.reshape(row), broadcast_axis=axis)


def _permute(f: Factor, use: FactorUse, x: jax.Array, index: jax.Array, lead: int) -> jax.Array:
    """Gather the units: ``x[..., index, ...]`` (per batch entry for batched factors); KV groups use the induced index."""
    units = use.axes(*UNIT_ROLES)
    if not units:
        return x
    if use.level == "groups":
        index = index.reshape(f.groups, f.heads_per_group)[:, 0] // f.heads_per_group
    a, b, shape = lead + units[0], lead + units[-1] + 1, x.shape
    y = x.reshape(shape[:a] + (-1,) + shape[b:])
    if not use.batch:
        return jnp.take(y, index, axis=a).reshape(shape)
    p = lead + use.batch[0] - (len(units) - 1 if use.batch[0] > units[-1] else 0)
    y = jnp.moveaxis(y, (p, a), (0, 1))
    y = jax.vmap(lambda rows, i: jnp.take(rows, i, axis=0))(y, index.reshape(y.shape[0], -1))
    return jnp.moveaxis(y, (0, 1), (p, a)).reshape(shape)


def _scale(f: Factor, use: FactorUse, x: jax.Array, values: jax.Array, lead: int) -> jax.Array:
    """Multiply each unit's entries by its value (``out``: a, ``in``: 1/a; signs are their own inverse)."""
    positions = [lead + i for i in use.batch + use.axes(*UNIT_ROLES)]
    v = values.reshape([x.shape[p] for p in positions])
    order = sorted(range(len(positions)), key=positions.__getitem__)
    shape = [1] * x.ndim
    for p in positions:
        shape[p] = x.shape[p]
    return x * v.transpose(order).reshape(shape).astype(x.dtype)


def _mix(f: Factor, use: FactorUse, x: jax.Array, m: jax.Array, lead: int) -> jax.Array:
    """Per unit, ``v -> M v`` on its ``dim`` sub-axes (GL), or on each RoPE pair's ``coord`` sub-axis (rotation-scaling)."""
    letters = iter(string.ascii_letters)
    xl = [next(letters) for _ in range(x.ndim)]
    out = list(xl)
    held = [lead + i for i in use.batch + use.axes(*UNIT_ROLES)]
    if use.kind == "rotation-scaling":
        held += [lead + i for i in use.axes("pair")]
        mixed = [lead + i for i in use.axes("coord")]
    else:
        mixed = [lead + i for i in use.axes("dim")]
    new = [next(letters) for _ in mixed]
    for p, n in zip(mixed, new):
        out[p] = n
    ml = [xl[p] for p in held] + new + [xl[p] for p in mixed]
    m = m.reshape([x.shape[p] for p in held + mixed + mixed]).astype(x.dtype)
    spec = f"{''.join(xl)},{''.join(ml)}->{''.join(out)}"
    return jnp.einsum(spec, x, m, precision=jax.lax.Precision.HIGHEST)


ACTIONS: dict[str, Callable[[Factor, FactorUse, jax.Array, jax.Array, int], jax.Array]] = {
    "permutation": _permute,
    "grouped-permutation": _permute,
    "head-permutation": _permute,
    "positive-scaling": _scale,
    "norm-scale": _scale,
    "sign-flip": _scale,
    "general-linear": _mix,
    "rotation-scaling": _mix,
}


def jit_action(nf: NormalForm, *, affine: bool = True) -> Callable[[Features, ElementArrays], Features]:
    """``jax.jit`` of :func:`act_features` for one normal form: call it with features and :func:`element_arrays`."""
    return jax.jit(functools.partial(act_features, nf, affine=affine))


__all__ = ["ACTIONS", "ELEMENT_ARRAYS", "ElementArrays", "Features", "act_features", "act_virtual", "element_arrays", "from_features", "jit_action", "to_features"]
