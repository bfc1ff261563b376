"""Permutation-equivariant weight-space layers derived from the Spec: equivariance, invariance, negative control."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from metanets import act_features, normal_form
from metanets.equivariant import EquivariantLinear, EquivariantMetaNet
from metanets.plan import plan_from_axes, sharing_plan
from symm.action import act
from symm.element import GroupElement
from symm.errors import UsageError
from symm.models import CNNConfig, MLPConfig, SmallCNNConfig, TransformerConfig, build_model, spec_for

CONFIGS = {
    "mlp-relu": MLPConfig((64, 16, 12, 10), "relu"),
    "mlp-tanh-deep": MLPConfig((20, 8, 8, 8, 5), "tanh"),
    "cnn": CNNConfig(widths=(4, 6), norm="none"),
    "small-cnn": SmallCNNConfig(width=5, image_size=16),
}


def _permutations(spec, seed: int) -> GroupElement:
    nf = normal_form(spec)
    return GroupElement.sample(spec, seed, only=[f.name for f in nf.factors if f.kind == "permutation"])


def _features(nf, channels: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    return {vp.name: jnp.asarray(rng.normal(size=(3, *vp.shape, channels)), dtype) for vp in nf.virtual}


def _equivariance_error(layer, nf, x, g) -> float:
    forward = nnx.jit(lambda m, v: m(v))
    a = forward(layer, act_features(nf, x, g, affine=False))
    b = act_features(nf, forward(layer, x), g, affine=False)
    return max(float(jnp.abs(a[k] - b[k]).max() / jnp.abs(b[k]).max()) for k in b)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", CONFIGS)
def test_equivariant_linear(name, precision):
    dtype = precision
    spec = spec_for(CONFIGS[name])
    nf = normal_form(spec)
    with jax.enable_x64(dtype == "float64"):
        layer = EquivariantLinear(sharing_plan(nf), 3, 4, rngs=nnx.Rngs(0))
        if dtype == "float64":
            layer = jax.tree.map(lambda v: v.astype(jnp.float64), layer)
        x = _features(nf, 3, jnp.dtype(dtype))
        tol = 1e-5 if dtype == "float32" else 1e-12
        for seed in range(3):
            assert _equivariance_error(layer, nf, x, _permutations(spec, seed)) <= tol


def test_broken_sharing_is_caught():
    """Negative control: treat one permuted axis as fixed (a free weight over it) and equivariance fails."""
    spec = spec_for(CONFIGS["mlp-relu"])
    nf = normal_form(spec)
    plan = sharing_plan(nf)
    tensors = list(plan.tensors)
    i = next(k for k, t in enumerate(tensors) if t.name == "layers.1.weight")
    tensors[i] = dataclasses.replace(tensors[i], symbols=(tensors[i].symbols[0], None))
    broken = plan_from_axes(tuple(tensors))
    layer = EquivariantLinear(broken, 2, 2, rngs=nnx.Rngs(0))
    x = _features(nf, 2, jnp.float32)
    assert _equivariance_error(layer, nf, x, _permutations(spec, 0)) > 1e-2
    good = EquivariantLinear(plan, 2, 2, rngs=nnx.Rngs(0))
    assert _equivariance_error(good, nf, x, _permutations(spec, 0)) <= 1e-5


@pytest.mark.parametrize("name", CONFIGS)
def test_metanet_invariant_to_permutations(name):
    config = CONFIGS[name]
    spec = spec_for(config)
    torch.manual_seed(0)
    models = [build_model(config) for _ in range(4)]
    weights = {k: np.stack([m.state_dict()[k].numpy() for m in models]) for k in models[0].state_dict()}
    g = _permutations(spec, 1)
    moved = {k: np.stack([act(spec, {kk: torch.from_numpy(v[i]) for kk, v in weights.items()}, g)[k].numpy() for i in range(4)]) for k in weights}
    net = EquivariantMetaNet(spec, hidden=8, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, w: m({"weights": w}))
    a, b = np.asarray(forward(net, weights)), np.asarray(forward(net, moved))
    assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-3)
    assert not np.allclose(moved["convs.0.weight" if "convs.0.weight" in moved else "layers.0.weight"],
                           weights["convs.0.weight" if "convs.0.weight" in weights else "layers.0.weight"])
    assert np.ptp(a) > 0  # it does tell networks apart


def test_gradients_reach_every_term():
    spec = spec_for(CONFIGS["cnn"])
    net = EquivariantMetaNet(spec, hidden=4, rngs=nnx.Rngs(0))
    torch.manual_seed(0)
    models = [build_model(CONFIGS["cnn"]) for _ in range(3)]
    weights = {k: jnp.asarray(np.stack([m.state_dict()[k].numpy() for m in models])) for k in models[0].state_dict()}
    grads = nnx.jit(lambda m, w: nnx.grad(lambda mm: (mm({"weights": w}) ** 2).mean())(m))(net, weights)
    leaves = jax.tree.leaves(nnx.state(grads, nnx.Param))
    assert leaves and all(bool(jnp.any(g != 0)) for g in leaves)


def test_unsupported_kinds_are_refused():
    spec = spec_for(TransformerConfig(d_model=16, n_heads=2, n_layers=1))
    with pytest.raises(UsageError, match="head-permutation.*not supported yet"):
        sharing_plan(normal_form(spec))


def test_equivariant_metanet_trains_on_a_zoo(tmp_path):
    """End to end on a real (tiny) zoo with the shared training loop: the loss falls and the report has tau/r2."""
    from metanets.data import load_splits
    from metanets.train import TrainConfig, evaluate, train
    from symm.zoo import SearchSpace, ZooPlan, load, make_zoo

    space = SearchSpace(widths=(8,), depths=(1,), activations=("relu",), epochs=(1, 2))
    make_zoo(tmp_path / "z", ZooPlan("mlp", "digits", 24, space=space, checkpoint_epochs=(0, 1, 2)), progress=False)
    zoo = load(tmp_path / "z")
    splits = load_splits(zoo, (0.6, 0.2, 0.2), seed=0)
    net = EquivariantMetaNet(zoo.spec(), hidden=4, depth=1, head_hidden=16, rngs=nnx.Rngs(0))
    result = train(net, splits["train"], splits["val"], TrainConfig(epochs=25, patience=25, batch_size=8))
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0]
    report = evaluate(net, splits, transforms=("original", "permutation"))
    assert {"kendall_tau", "r2"} <= set(report["test"]["permutation"])
    assert report["test"]["permutation"]["kendall_tau"] == pytest.approx(report["test"]["original"]["kendall_tau"], abs=1e-6)
