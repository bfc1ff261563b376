"""Permutation-equivariant weight-space layers (Flax NNX), derived from the Spec's sharing plan.

``EquivariantLinear`` maps features ``{virtual tensor: [B, *sub-axes, C_in]}`` to ``[B, *sub-axes, C_out]`` with one
free weight per :class:`~metanets.plan.Term` (over the fixed axes of its source and destination and the channels)
and a bias per destination that is constant along permuted axes; pointwise nonlinearities keep equivariance;
``invariant_pool`` averages every permuted axis away. ``EquivariantMetaNet`` chains them into a scalar predictor.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from symm.normal_form import NormalForm, normal_form
from symm.spec import Spec

from .baselines import Standardize, Statistic
from .plan import SharingPlan, TensorAxes, Term, sharing_plan, term_fan_in

Features = dict[str, jax.Array]


def _letters(n: int) -> list[str]:
    pool = [c for c in string.ascii_letters if c not in "bio"]
    if n > len(pool):
        raise ValueError(f"einsum needs {n} axis letters, only {len(pool)} available")
    return pool[:n]


def apply_term(term: Term, src: TensorAxes, dst: TensorAxes, x: jax.Array, w: jax.Array) -> jax.Array:
    """``[B, *src axes, C_in] -> [B, *dst axes, C_out]``: tied symbols keep their index, untied ones of the source
    are averaged, untied ones of the destination broadcast, fixed axes and channels mixed by ``w``."""
    letters = iter(_letters(len(src.sizes) + len(dst.sizes)))
    tied = {s: next(letters) for s in term.tied}
    src_sub = [tied.get(s) or next(letters) if s is not None else next(letters) for s in src.symbols]
    src_fixed = [l for s, l in zip(src.symbols, src_sub) if s is None]
    dst_sub, dst_fixed, keep = [], [], []
    for s, n in zip(dst.symbols, dst.sizes):
        if s is None:
            dst_fixed.append(next(letters))
            dst_sub.append(dst_fixed[-1])
            keep.append(True)
        elif s in tied:
            dst_sub.append(tied[s])
            keep.append(True)
        else:
            keep.append(False)  # broadcast along this permuted axis
    averaged = math.prod(n for s, n in zip(src.symbols, src.sizes) if s is not None and s not in tied)
    spec = f"b{''.join(src_sub)}i,{''.join(src_fixed)}{''.join(dst_fixed)}io->b{''.join(dst_sub)}o"
    y = jnp.einsum(spec, x, w) / averaged
    shape = [x.shape[0]] + [n if k else 1 for n, k in zip(dst.sizes, keep)] + [w.shape[-1]]
    return jnp.broadcast_to(y.reshape(shape), (x.shape[0], *dst.sizes, w.shape[-1]))


class EquivariantLinear(nnx.Module):
    """Sum of every equivariant term of the plan, plus a bias constant along permuted axes."""

    def __init__(self, plan: SharingPlan, c_in: int, c_out: int, *, rngs: nnx.Rngs) -> None:
        self.plan = plan
        by = plan.by_name
        shapes = [(*by[t.src].fixed_sizes, *by[t.dst].fixed_sizes, c_in, c_out) for t in plan.terms]
        # one draw for all terms (one XLA compilation, not one per shape), cut on the host
        flat = np.asarray(jax.random.normal(rngs.params(), (sum(math.prod(s) for s in shapes),)))
        weights, start = {}, 0
        for k, (t, shape) in enumerate(zip(plan.terms, shapes)):
            std = 1.0 / math.sqrt(c_in * term_fan_in(plan, t.dst))
            chunk = flat[start : start + math.prod(shape)].reshape(shape)
            start += math.prod(shape)
            weights[f"t{k}"] = nnx.Param(jnp.asarray(std * chunk))
        self.weights = nnx.Dict(weights)
        self.bias = nnx.Dict({f"b{k}": nnx.Param(jnp.zeros((*t.fixed_sizes, c_out))) for k, t in enumerate(plan.tensors)})

    def __call__(self, x: Mapping[str, jax.Array]) -> Features:
        by = self.plan.by_name
        out: Features = {}
        for k, t in enumerate(self.plan.terms):
            y = apply_term(t, by[t.src], by[t.dst], x[t.src], self.weights[f"t{k}"][...])
            out[t.dst] = out[t.dst] + y if t.dst in out else y
        for k, t in enumerate(self.plan.tensors):
            b = self.bias[f"b{k}"][...]
            shape = [1] + [1 if s is not None else n for s, n in zip(t.symbols, t.sizes)] + [b.shape[-1]]
            out[t.name] = out[t.name] + b.reshape(shape)
        return out


def invariant_pool(plan: SharingPlan, x: Mapping[str, jax.Array]) -> jax.Array:
    """``[B, D]``: each tensor averaged over its permuted axes, its fixed axes and channels kept and flattened."""
    parts = []
    for t in plan.tensors:
        axes = tuple(1 + i for i, s in enumerate(t.symbols) if s is not None)
        pooled = x[t.name].mean(axis=axes) if axes else x[t.name]
        parts.append(pooled.reshape(pooled.shape[0], -1))
    return jnp.concatenate(parts, axis=1)


def pooled_size(plan: SharingPlan, channels: int) -> int:
    return sum(math.prod(t.fixed_sizes) for t in plan.tensors) * channels


class EquivariantMetaNet(nnx.Module):
    """theta -> [EquivariantLinear -> ReLU] x depth -> invariant pooling -> MLP -> one scalar per network.

    :meth:`fit_normalization` (called by :func:`metanets.train.train`) fits one divisor per virtual tensor (its RMS
    over the training zoo: a scalar per tensor, so equivariance is kept) and the target's mean and std.
    """

    def __init__(self, spec: Spec, *, hidden: int = 16, depth: int = 2, head_hidden: int = 64, rngs: nnx.Rngs) -> None:
        self.nf: NormalForm = normal_form(spec)
        self.plan = sharing_plan(self.nf)
        self.names = tuple(t.name for t in self.plan.tensors)
        self.input_scale = Statistic(jnp.ones(len(self.names)))  # one scalar per virtual tensor: keeps equivariance
        self.y_norm = Standardize(1)
        widths = [1] + [hidden] * depth
        self.layers = nnx.List([EquivariantLinear(self.plan, a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])])
        self.head1 = nnx.Linear(pooled_size(self.plan, hidden), head_hidden, rngs=rngs)
        self.head2 = nnx.Linear(head_hidden, 1, rngs=rngs)

    def virtual(self, weights: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Real ``[B, *shape]`` weights -> virtual ``[B, *sub-axes]`` tensors (what the trunk reads, before scaling)."""
        return self.nf.split({k: jnp.asarray(v) for k, v in weights.items()}, lead=1)

    def features(self, weights: Mapping[str, jax.Array]) -> Features:
        """Real ``[B, *shape]`` weights -> virtual ``[B, *sub-axes, 1]`` features, scaled."""
        virtual = self.virtual(weights)
        scale = self.input_scale[...]
        return {k: (virtual[k] / scale[i])[..., None] for i, k in enumerate(self.names)}

    def embed(self, x: Mapping[str, jax.Array]) -> Features:
        """The equivariant trunk on features."""
        for layer in self.layers:
            x = {k: jax.nn.relu(v) for k, v in layer(x).items()}
        return x

    def __call__(self, batch: Mapping) -> jax.Array:
        weights = batch["weights"] if "weights" in batch else batch
        pooled = invariant_pool(self.plan, self.embed(self.features(weights)))
        return self.y_norm.inverse(self.head2(jax.nn.relu(self.head1(pooled))))[:, 0]

    def fit_normalization(self, batches: Iterable[Mapping]) -> None:
        """Per virtual tensor the RMS of its entries, and the targets' mean and std (rows with ``mask`` 0 ignored)."""
        sq = np.zeros(len(self.names))
        count = 0.0
        targets, masks = [], []
        for b in batches:
            mask = np.asarray(b.get("mask", np.ones(len(b["target"]))), dtype=np.float64)
            virtual = {k: np.asarray(v) for k, v in self.virtual(b["weights"]).items()}
            for i, k in enumerate(self.names):
                sq[i] += float((mask.reshape(-1, *[1] * (virtual[k].ndim - 1)) * virtual[k].astype(np.float64) ** 2).sum()) / max(virtual[k][0].size, 1)
            count += mask.sum()
            targets.append(np.asarray(b["target"]))
            masks.append(mask)
        rms = np.sqrt(sq / max(count, 1.0))
        self.input_scale.set_value(jnp.asarray(np.where(rms > 0, rms, 1.0), jnp.float32))
        self.y_norm.fit(np.concatenate(targets)[:, None], np.concatenate(masks))
