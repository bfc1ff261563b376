"""Scale-equivariant and quasi-equivariant metanetworks: ``F(theta) = alpha(theta) . beta(theta)``.

The group is permutations x the continuous per-unit scalings of the Spec (``positive-scaling``: ReLU neurons and
channels; ``norm-scale``: a unit absorbed by the normalisation that follows, one-sided).

* **Canonical form.** ``s(theta)`` is the scaling that gives every scaled unit an incoming vector (its ``out``-side
  entries: weight row and bias) of norm 1, computed factor by factor in the order of the network (a factor's
  incoming entries are final once every factor dividing them has been applied), so ``kappa(theta) = s(theta).theta``
  satisfies ``kappa(g.theta) = P.kappa(theta)`` for ``g`` = permutation ``P`` x scaling: scale-invariant and
  permutation-equivariant (a unit with an all-zero incoming vector keeps scale 1).
* **beta** (strictly G-equivariant): ``beta(theta) = s(theta)^{-1} . E(kappa(theta))`` with ``E`` the Spec-derived
  permutation-equivariant trunk (:class:`~metanets.equivariant.EquivariantLinear` + ReLU), every channel carrying
  theta's scale back; ``beta(g.theta) = g.beta(theta)``.
* **alpha** (in the group by construction): per scaled factor, per unit and **per channel**,
  ``alpha = exp(b * tanh(A u))`` where ``u`` are the trunk's features of that unit (averaged over every other sub-axis,
  so permutation-equivariant and scale-invariant) and ``exp`` is the factor's exponential map
  (:meth:`symm.factors.PositiveScaling.exp`, e^xi per unit): a positive scaling for any parameters, never a
  near-singular matrix.
* ``F(theta) = alpha(theta) . beta(theta)`` is quasi-equivariant, ``F(g.theta) = g'.F(theta)`` with
  ``g' = alpha(g.theta) g alpha(theta)^{-1}`` (tested); because alpha is scale-invariant and permutation-equivariant
  and scalings commute, ``g'`` here equals ``g`` on every channel.
* **Invariant head**: ``pool(s(theta).F(theta)) = pool(alpha(theta) . E(kappa(theta)))``: the canonical scale removes the
  common group element, and because alpha differs per channel it is not cancelled (its parameters get gradients).

Kinds with GL(d_h) or rotation-scaling factors (attention) and translations (routers) are refused clearly; the
permutation-equivariant trunk refuses head, grouped and per-expert permutations (:mod:`metanets.plan`).
"""

from __future__ import annotations

import graphlib
import math
from collections.abc import Mapping
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from symm.errors import UsageError
from symm.normal_form import UNIT_ROLES, NormalForm
from symm.spec import Spec

from .equivariant import EquivariantMetaNet, Features, invariant_pool

#: continuous kinds the quasi network handles (per-unit positive scalings, applied by their exponential map)
SCALING_KINDS = frozenset({"positive-scaling", "norm-scale"})
#: continuous kinds it refuses (no alpha derived for them yet)
REFUSED_KINDS = frozenset({"general-linear", "rotation-scaling", "translation"})


def exp_map(kind: str, xi: jax.Array) -> jax.Array:
    """The factor's exponential map in JAX (``symm.factors`` ``Factor.exp`` for these kinds): e^xi per unit."""
    if kind not in SCALING_KINDS:
        raise UsageError(f"quasi-equivariant metanet: no exponential map for kind {kind!r}")
    return jnp.exp(xi)


@dataclass(frozen=True)
class ScaledUse:
    """Scaling factor ``factor`` acts on virtual tensor ``tensor`` from ``side`` on sub-axes ``axes`` (its units)."""

    factor: str
    tensor: str
    side: str
    axes: tuple[int, ...]


@dataclass(frozen=True)
class ScalingPlan:
    """The scaled factors in canonicalisation order, their unit counts, and where each acts."""

    order: tuple[str, ...]
    units: tuple[tuple[str, int], ...]  # (factor, number of units): tuples keep the plan hashable (a static of nnx.jit)
    kinds: tuple[tuple[str, str], ...]
    uses: tuple[ScaledUse, ...]

    def kind(self, factor: str) -> str:
        return dict(self.kinds)[factor]

    def of(self, factor: str, side: str | None = None) -> tuple[ScaledUse, ...]:
        return tuple(u for u in self.uses if u.factor == factor and (side is None or u.side == side))


def scaling_plan(nf: NormalForm) -> ScalingPlan:
    """Collect the scaling factors' uses and order them: ``f`` before ``h`` if a tensor is divided by ``f`` and
    multiplied by ``h`` (so ``h``'s incoming norm is read after ``f`` is applied). Refuses what breaks uniqueness."""
    refused = sorted({f"{f.name} ({f.kind})" for f in nf.factors if f.kind in REFUSED_KINDS})
    if refused:
        raise UsageError(f"quasi-equivariant metanet: continuous factors {refused[:4]} are not supported yet "
                         f"(supported: {', '.join(sorted(SCALING_KINDS))}; permutations are handled by the trunk)")
    uses, units, kinds = [], {}, {}
    deps: dict[str, set[str]] = {}
    for vp in nf.virtual:
        scaled = [u for u in vp.uses if u.kind in SCALING_KINDS]
        outs = [u.factor for u in scaled if u.side == "out"]
        if len(set(outs)) > 1:
            raise UsageError(f"quasi-equivariant metanet: {vp.name} is multiplied by several scalings {sorted(set(outs))}; "
                             "its canonical scale would not be unique")
        for u in scaled:
            if u.batch:
                raise UsageError(f"quasi-equivariant metanet: scaling {u.factor!r} is batched (per expert) on {vp.name}; not supported yet")
            axes = u.axes(*UNIT_ROLES)
            uses.append(ScaledUse(u.factor, vp.name, u.side, axes))
            units[u.factor] = math.prod(vp.shape[i] for i in axes)
            kinds[u.factor] = u.kind
            deps.setdefault(u.factor, set())
        for h in outs:
            deps[h] |= {u.factor for u in scaled if u.side == "in" and u.factor != h}
    try:
        order = tuple(graphlib.TopologicalSorter(deps).static_order())
    except graphlib.CycleError as exc:
        raise UsageError(f"quasi-equivariant metanet: the scalings depend on each other in a cycle {exc.args[1]}") from None
    return ScalingPlan(order, tuple(sorted(units.items())), tuple(sorted(kinds.items())), tuple(uses))


def _to_units(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``[B, *sub-axes, C]`` -> ``[B, n_units, rest, C]`` (unit sub-axes first, flattened row-major)."""
    sub = list(range(1, x.ndim - 1))
    unit = [1 + a for a in axes]
    order = [0, *unit, *[a for a in sub if a not in unit], x.ndim - 1]
    y = jnp.transpose(x, order)
    n = math.prod(x.shape[a] for a in unit)
    return y.reshape(x.shape[0], n, -1, x.shape[-1])


def _broadcast_units(v: jax.Array, shape: tuple[int, ...], axes: tuple[int, ...]) -> jax.Array:
    """Per-unit values ``[B, n_units, C]`` -> broadcastable against ``[B, *shape, C]``."""
    target = [v.shape[0]] + [shape[i] if i in axes else 1 for i in range(len(shape))] + [v.shape[-1]]
    return v.reshape(target)


def scale_features(plan: ScalingPlan, nf: NormalForm, x: Mapping[str, jax.Array], values: Mapping[str, jax.Array], *,
                   inverse: bool = False) -> Features:
    """Act with per-sample, per-channel scalings ``values`` ``{factor: [B, n_units, C or 1]}``: ``out`` entries times a,
    ``in`` entries divided by a (``inverse``: the other way round). Permutations are not touched."""
    by = nf.by_name
    out = dict(x)
    for u in plan.uses:
        if u.factor not in values:
            continue
        a = _broadcast_units(values[u.factor], by[u.tensor].shape, u.axes)
        out[u.tensor] = out[u.tensor] * a if (u.side == "out") != inverse else out[u.tensor] / a
    return out


def canonical_scales(plan: ScalingPlan, nf: NormalForm, x: Mapping[str, jax.Array]) -> tuple[Features, dict[str, jax.Array]]:
    """``(kappa, s)``: ``s`` ``{factor: [B, n_units, 1]}`` gives every unit a unit-norm incoming vector, ``kappa = s.x``."""
    x = dict(x)
    scales: dict[str, jax.Array] = {}
    for f in plan.order:
        incoming = plan.of(f, "out")
        sq = sum(jnp.sum(jnp.square(_to_units(x[u.tensor], u.axes)), axis=(2, 3)) for u in incoming)
        safe = jnp.where(sq > 0, sq, 1.0)
        s = jnp.where(sq > 0, jax.lax.rsqrt(safe), 1.0)[..., None]
        scales[f] = s
        x = scale_features(plan, nf, x, {f: s})
    return x, scales


class QuasiMetaNet(EquivariantMetaNet):
    """``theta -> pool(alpha(theta) . E(kappa(theta))) -> MLP``: invariant to permutations and scalings; the trunk's
    quasi-equivariant features are :meth:`quasi_features` ``F = alpha . beta`` (see the module docstring)."""

    def __init__(self, spec: Spec, *, hidden: int = 16, depth: int = 2, head_hidden: int = 64, alpha_bound: float = 1.0,
                 rngs: nnx.Rngs) -> None:
        super().__init__(spec, hidden=hidden, depth=depth, head_hidden=head_hidden, rngs=rngs)
        self.scaling = scaling_plan(self.nf)
        self.alpha_bound = alpha_bound
        self.alpha_maps = nnx.Dict({
            f"a{i}": nnx.Linear(hidden * len(self.scaling.of(f)), hidden, rngs=rngs) for i, f in enumerate(self.scaling.order)
        })

    # ----- the pieces of F = alpha . beta ------------------------------------------------------------------
    def canonical(self, weights: Mapping[str, jax.Array]) -> tuple[Features, dict[str, jax.Array]]:
        """``(kappa, s)`` on virtual ``[B, *sub-axes, 1]`` tensors of the raw weights."""
        raw = {k: v[..., None] for k, v in super().virtual(weights).items()}
        return canonical_scales(self.scaling, self.nf, raw)

    def virtual(self, weights: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The canonical weights ``kappa(theta)`` (what the trunk reads, and what the input scale is fitted on)."""
        return {k: v[..., 0] for k, v in self.canonical(weights)[0].items()}

    def trunk(self, weights: Mapping[str, jax.Array]) -> tuple[Features, dict[str, jax.Array]]:
        """``(E(kappa(theta)), s(theta))``: permutation-equivariant, scale-invariant features and the canonical scale."""
        kappa, s = self.canonical(weights)
        scale = self.input_scale[...]
        x = {k: kappa[k] / scale[i] for i, k in enumerate(self.names)}
        return self.embed(x), s

    def alpha_from(self, e: Features) -> dict[str, jax.Array]:
        """Per scaled factor ``[B, n_units, C]``: ``exp(b tanh(A u))``, ``u`` the unit's trunk features."""
        out = {}
        for i, f in enumerate(self.scaling.order):
            u = jnp.concatenate([_to_units(e[use.tensor], use.axes).mean(axis=2) for use in self.scaling.of(f)], axis=-1)
            out[f] = exp_map(self.scaling.kind(f), self.alpha_bound * jnp.tanh(self.alpha_maps[f"a{i}"](u)))
        return out

    def alpha(self, weights: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return self.alpha_from(self.trunk(weights)[0])

    def beta(self, weights: Mapping[str, jax.Array]) -> Features:
        """``s(theta)^{-1} . E(kappa(theta))``: strictly equivariant to permutations x scalings."""
        e, s = self.trunk(weights)
        return scale_features(self.scaling, self.nf, e, s, inverse=True)

    def quasi_features(self, weights: Mapping[str, jax.Array]) -> Features:
        """``F(theta) = alpha(theta) . beta(theta)``, each channel scaled by its own alpha."""
        e, s = self.trunk(weights)
        beta = scale_features(self.scaling, self.nf, e, s, inverse=True)
        return scale_features(self.scaling, self.nf, beta, self.alpha_from(e))

    def __call__(self, batch: Mapping) -> jax.Array:
        weights = batch["weights"] if "weights" in batch else batch
        e, _ = self.trunk(weights)
        gated = scale_features(self.scaling, self.nf, e, self.alpha_from(e))  # = s(theta) . F(theta)
        pooled = invariant_pool(self.plan, gated)
        return self.y_norm.inverse(self.head2(jax.nn.relu(self.head1(pooled))))[:, 0]


__all__ = ["QuasiMetaNet", "ScalingPlan", "canonical_scales", "exp_map", "scale_features", "scaling_plan"]
