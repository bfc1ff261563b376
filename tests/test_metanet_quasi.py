"""Scale-equivariant / quasi-equivariant metanetworks: canonical form, F(g.theta) = g'.F(theta), invariant head,
gradients reaching alpha, negative controls, refusals."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from metanets import act_features, normal_form
from metanets.equivariant import EquivariantMetaNet
from metanets.quasi import QuasiMetaNet, canonical_scales, exp_map, scale_features, scaling_plan
from metanets.transforms import sample_element
from symm.action import act
from symm.element import GroupElement
from symm.errors import UsageError
from symm.models import CNNConfig, MLPConfig, SmallCNNConfig, TransformerConfig, build_model, spec_for

CONFIGS = {
    "mlp-relu": (MLPConfig((64, 16, 12, 10), "relu"), "eval"),
    "cnn": (CNNConfig(widths=(4, 6), norm="none"), "eval"),
    "small-cnn": (SmallCNNConfig(width=5, image_size=16), "eval"),
    "cnn-batchnorm-train": (CNNConfig(widths=(4, 6), norm="batch"), "train"),
}
N = 4


def _zoo(config, n: int = N, seed: int = 0) -> dict[str, np.ndarray]:
    torch.manual_seed(seed)
    models = [build_model(config) for _ in range(n)]
    return {k: np.stack([m.state_dict()[k].double().numpy() for m in models]) for k in models[0].state_dict()}


def _move(spec, weights: dict[str, np.ndarray], g: GroupElement) -> dict[str, np.ndarray]:
    n = len(next(iter(weights.values())))
    moved = [act(spec, {k: torch.from_numpy(np.asarray(v[i])) for k, v in weights.items()}, g) for i in range(n)]
    return {k: np.stack([m[k].numpy() for m in moved]) for k in weights}


def _elements(spec):
    """A full random element (permutations, log-normal scalings, ...) and permutations x U[1,1000] scalings."""
    return [GroupElement.sample(spec, 3), sample_element(spec, "scale1000", torch.Generator().manual_seed(5))]


def _net(spec, dtype, hidden: int = 6) -> QuasiMetaNet:
    net = QuasiMetaNet(spec, hidden=hidden, depth=2, head_hidden=16, rngs=nnx.Rngs(0))
    if dtype == jnp.float64:
        net = jax.tree.map(lambda v: v.astype(jnp.float64), net)
    return net


def _rel(a, b) -> float:
    return max(float(jnp.abs(a[k] - b[k]).max() / jnp.maximum(jnp.abs(a[k]).max(), 1e-30)) for k in a)


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", CONFIGS)
def test_quasi_equivariance(name, precision):
    """F(g.theta) == alpha(g.theta) . g . alpha(theta)^{-1} . F(theta), and here g' == g (alpha is invariant)."""
    config, mode = CONFIGS[name]
    spec = spec_for(config, mode=mode)
    tol = 1e-5 if precision == "float32" else 1e-10
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        net = _net(spec, dtype)
        assert net.scaling.order, "the catalogue entry has scalings: the test must exercise them"
        theta = {k: jnp.asarray(v, dtype) for k, v in _zoo(config).items()}
        for g in _elements(spec):
            moved = {k: jnp.asarray(v, dtype) for k, v in _move(spec, _zoo(config), g).items()}
            f0, f1 = net.quasi_features(theta), net.quasi_features(moved)
            a0, a1 = net.alpha(theta), net.alpha(moved)
            assert all(bool((a > 0).all()) for a in a0.values())  # alpha is a positive scaling: in the group
            assert all(a.shape[-1] == 6 for a in a0.values())  # one alpha per channel
            y = scale_features(net.scaling, net.nf, f0, a0, inverse=True)  # alpha(theta)^{-1}
            y = act_features(net.nf, y, g, affine=False)  # g
            y = scale_features(net.scaling, net.nf, y, a1)  # alpha(g.theta)
            assert _rel(f1, y) <= tol
            assert _rel(f1, act_features(net.nf, f0, g, affine=False)) <= tol  # g' = g for abelian scalings
            beta0, beta1 = net.beta(theta), net.beta(moved)
            assert _rel(beta1, act_features(net.nf, beta0, g, affine=False)) <= tol  # beta strictly equivariant


@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("name", CONFIGS)
def test_invariant_head(name, precision):
    config, mode = CONFIGS[name]
    spec = spec_for(config, mode=mode)
    with jax.enable_x64(precision == "float64"):
        dtype = jnp.dtype(precision)
        net = _net(spec, dtype)
        forward = nnx.jit(lambda m, w: m({"weights": w}))
        base = np.asarray(forward(net, {k: jnp.asarray(v, dtype) for k, v in _zoo(config).items()}))
        assert np.ptp(base) > 0  # it tells networks apart
        for g in _elements(spec):
            out = np.asarray(forward(net, {k: jnp.asarray(v, dtype) for k, v in _move(spec, _zoo(config), g).items()}))
            assert np.abs(out - base).max() <= (1e-5 if precision == "float32" else 1e-10) * np.abs(base).max()


def test_negative_controls_are_not_scale_invariant():
    """Without the canonical scale (and alpha) the same trunk is not invariant to U[1,1000] scalings; nor is the
    permutation-only metanet."""
    config, _ = CONFIGS["mlp-relu"]
    spec = spec_for(config)
    theta = {k: jnp.asarray(v, jnp.float32) for k, v in _zoo(config).items()}
    g = _elements(spec)[1]
    moved = {k: jnp.asarray(v, jnp.float32) for k, v in _move(spec, _zoo(config), g).items()}
    broken = _net(spec, jnp.float32)
    broken.scaling = dataclasses.replace(broken.scaling, order=())
    plain = EquivariantMetaNet(spec, hidden=6, rngs=nnx.Rngs(0))
    for net in (broken, plain):
        a, b = np.asarray(net(theta)), np.asarray(net(moved))
        assert np.abs(a - b).max() > 1e-2 * np.abs(a).max()


def test_alpha_parameters_receive_gradients():
    config, _ = CONFIGS["cnn"]
    spec = spec_for(config)
    net = _net(spec, jnp.float32, hidden=4)
    theta = {k: jnp.asarray(v, jnp.float32) for k, v in _zoo(config, 3).items()}
    grads = nnx.grad(lambda m: (m(theta) ** 2).mean())(net)
    alpha = jax.tree.leaves(nnx.state(grads.alpha_maps, nnx.Param))
    assert alpha and all(bool(jnp.any(g != 0)) for g in alpha)
    assert all(bool(jnp.any(g != 0)) for g in jax.tree.leaves(nnx.state(grads, nnx.Param)))


def test_exp_map_is_the_factors_exp():
    spec = spec_for(CONFIGS["mlp-relu"][0])
    xi = torch.linspace(-3, 3, 16, dtype=torch.float64)
    for f in spec.factors.values():
        if f.kind == "positive-scaling":
            with jax.enable_x64(True):
                ours = np.asarray(exp_map(f.kind, jnp.asarray(xi.numpy())))
            np.testing.assert_allclose(ours, f.exp(xi).numpy(), rtol=1e-15)
    with pytest.raises(UsageError, match="no exponential map"):
        exp_map("general-linear", jnp.zeros(2))


def test_canonical_form_has_unit_incoming_norms_and_is_scale_invariant():
    config, _ = CONFIGS["mlp-relu"]
    spec = spec_for(config)
    nf = normal_form(spec)
    plan = scaling_plan(nf)
    with jax.enable_x64(True):
        x = {k: jnp.asarray(v[..., None]) for k, v in nf.split(_zoo(config), lead=1).items()}
        kappa, s = canonical_scales(plan, nf, x)
        for f in plan.order:
            sq = sum((np.asarray(kappa[u.tensor]) ** 2).reshape(N, kappa[u.tensor].shape[1], -1).sum(-1) for u in plan.of(f, "out"))
            np.testing.assert_allclose(sq, 1.0, rtol=1e-12)
        g = _elements(spec)[1]
        moved = {k: jnp.asarray(v[..., None]) for k, v in nf.split(_move(spec, _zoo(config), g), lead=1).items()}
        kappa_moved, _ = canonical_scales(plan, nf, moved)
        perm_only = g.replace(**{n: f.identity() for n, f in spec.factors.items() if f.kind == "positive-scaling"})
        assert _rel(kappa_moved, act_features(nf, kappa, perm_only, affine=False)) <= 1e-12


def test_dead_units_keep_scale_one():
    config, _ = CONFIGS["mlp-relu"]
    nf = normal_form(spec_for(config))
    weights = _zoo(config)
    weights["layers.0.weight"][:, 3] = 0.0
    weights["layers.0.bias"][:, 3] = 0.0
    x = {k: jnp.asarray(v[..., None], jnp.float32) for k, v in nf.split(weights, lead=1).items()}
    kappa, s = canonical_scales(scaling_plan(nf), nf, x)
    assert all(bool(jnp.isfinite(v).all()) for v in kappa.values())
    assert float(s[scaling_plan(nf).order[0]][:, 3].max()) == 1.0


def test_order_follows_the_network_and_cycles_or_gl_are_refused():
    plan = scaling_plan(normal_form(spec_for(*CONFIGS["cnn-batchnorm-train"])))
    order = plan.order
    assert order.index("convs.0.channels.scale") < order.index("convs.1.bn_scale")  # conv1 reads conv0's channels
    assert scaling_plan(normal_form(spec_for(MLPConfig((8, 6, 5, 3), "tanh")))).order == ()  # no continuous group
    with pytest.raises(UsageError, match="general-linear|rotation-scaling"):
        scaling_plan(normal_form(spec_for(TransformerConfig(d_model=16, n_heads=2, n_layers=1))))
