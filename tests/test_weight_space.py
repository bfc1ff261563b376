"""The Spec's normal form (symm.normal_form) and the JAX weight-space action (metanets.weight_space).

Acceptance: for every catalogue entry, ``merge(act_features(split(theta)[..., None], g))[..., 0] == act(spec, theta, g)``
(float32 to 1e-6, float64 to 1e-12, relative to each tensor's largest entry), for sampled elements and for every
factor's ``testing_elements``; every channel and batch entry transforms as its own copy of the weights.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from metanets.weight_space import act_features, element_arrays, from_features, jit_action, to_features
from symm import catalogue
from symm.action import act
from symm.catalogue.attention import AttentionShape
from symm.element import GroupElement
from symm.errors import SpecError
from symm.factors import Factor
from symm.models import CNNConfig, MLPConfig, ResidualCNNConfig, ResidualMLPConfig, SmallCNNConfig, TransformerConfig, spec_for
from symm.normal_form import normal_form
from symm.spec import Fragment, On, Spec, param

RTOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _tf(**kw) -> Callable[[], Spec]:
    return lambda: spec_for(TransformerConfig(n_layers=1, **kw))


def _hf(name: str) -> Callable[[], Spec]:
    def build() -> Spec:
        pytest.importorskip("transformers")
        from hf_models import configs
        from symm.adapters import spec_from_hf

        return spec_from_hf(configs()[name])

    return build


CASES: dict[str, Callable[[], Spec]] = {
    **{f"mlp-{a}": (lambda a=a: spec_for(MLPConfig((8, 12, 10, 4), a))) for a in ("relu", "tanh", "gelu", "swiglu")},
    **{f"cnn-{n}": (lambda n=n: spec_for(CNNConfig(norm=n))) for n in ("none", "batch", "group")},
    "cnn-batch-train-normscale": lambda: spec_for(CNNConfig(norm="batch"), mode="train"),
    "small-cnn": lambda: spec_for(SmallCNNConfig(width=8, n_layers=2, image_size=16)),
    "residual-mlp": lambda: spec_for(ResidualMLPConfig()),
    "residual-cnn": lambda: spec_for(ResidualCNNConfig()),
    "tf-pe-none": _tf(pe="none", n_kv_heads=2),
    "tf-sinusoidal": _tf(pe="sinusoidal"),
    "tf-learned-bias-gelu": _tf(pe="learned", attn_bias=True, ffn="gelu"),
    "tf-rope-half-gqa": _tf(pe="rope", rope_layout="half", n_kv_heads=2),
    "tf-rope-interleaved-gqa-bias": _tf(pe="rope", rope_layout="interleaved", n_kv_heads=2, attn_bias=True),
    "tf-mqa-relu": _tf(pe="learned", n_kv_heads=1, ffn="relu"),
    "tf-rope-tied-rms": _tf(pe="rope", tied=True, norm="rms"),
    "tf-qknorm-rope-half": _tf(pe="rope", qk_norm=True, n_kv_heads=2),
    "tf-qknorm-rope-interleaved": _tf(pe="rope", rope_layout="interleaved", qk_norm=True),
    "tf-qknorm-none": _tf(pe="none", qk_norm=True, n_kv_heads=2),
    **{
        f"moe-{g}-{'shared-bias' if s else 'routed'}": _tf(ffn="moe", gating=g, shared_expert=s, router_bias=s, n_kv_heads=2)
        for g in ("dense", "topk", "top1", "sigmoid")
        for s in (False, True)
    },
    **{f"hf-{n}": _hf(n) for n in ("gpt2", "xglm", "llama-gqa-tied", "mixtral", "qwen2-moe")},
}


@pytest.fixture(scope="module")
def specs() -> Callable[[str], Spec]:
    """``specs(name)``: the case's Spec, built once per module."""
    return functools.lru_cache(maxsize=None)(lambda name: CASES[name]())


def _params(spec: Spec, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(ps.shape, generator=gen, dtype=torch.float64).to(dtype) for k, ps in spec.params.items()}


def _testing_element(spec: Spec, k: int) -> GroupElement:
    """Every factor at its k-th testing element (cycling through each factor's list)."""
    values = {}
    for name, f in spec.factors.items():
        elements = f.testing_elements()
        values[name] = elements[k % len(elements)]
    return GroupElement(spec, values)


def _elements(spec: Spec) -> list[GroupElement]:
    n = max(len(f.testing_elements()) for f in spec.factors.values())
    return [GroupElement.sample(spec, 0), GroupElement.sample(spec, 1)] + [_testing_element(spec, k) for k in range(1, n)]


def _features(nf, thetas: list[dict[str, torch.Tensor]]) -> dict[str, jax.Array]:
    """``[batch 2, *sub-axes, channels 2]``: entry (b, c) holds weight set ``thetas[(b + c) % 2]``."""
    batch = {k: torch.stack([torch.stack([thetas[(b + c) % 2][k] for c in range(2)], -1) for b in range(2)]) for k in thetas[0]}
    return {k: jnp.asarray(v.numpy()) for k, v in nf.split(batch, lead=1).items()}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    if not b.size:
        return 0.0
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _worst(merged: dict[str, np.ndarray], ref: dict[str, torch.Tensor], index: tuple) -> tuple[float, str]:
    errors = {k: _relative(np.asarray(merged[k][index], dtype=np.float64), ref[k].double().numpy()) for k in ref}
    name = max(errors, key=errors.get)
    return errors[name], name


# ----- acceptance: the action equals spec.act ----------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_action_matches_spec_act(name, dtype, specs):
    """Features [batch 2, *sub-axes, channels 2]: entry (b, c) holds weight set (b + c) % 2 and transforms like it.

    Negative control: the result for one element does not match spec.act with the next element.
    """
    spec = specs(name)
    nf = normal_form(spec)
    thetas = [_params(spec, dtype, seed) for seed in (0, 1)]
    elements = _elements(spec)
    refs = [[act(spec, theta, g) for theta in thetas] for g in elements]
    with jax.enable_x64(dtype == torch.float64):
        features = _features(nf, thetas)
        for i, g in enumerate(elements):
            merged = from_features(nf, act_features(nf, features, element_arrays(g)))
            for b in range(2):
                for c in range(2):
                    err, where = _worst(merged, refs[i][(b + c) % 2], (b, Ellipsis, c))
                    assert err <= RTOL[dtype], f"{name}: element {i}, batch {b}, channel {c}: {where} off by {err:.2e}"
            if i == 0:
                err, _ = _worst(merged, refs[1][0], (0, Ellipsis, 0))
                assert err > 1e-3, f"{name}: acting with element 0 reproduces spec.act with element 1"


# ----- split / merge ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_split_merge_round_trip_exact(name, specs):
    spec = specs(name)
    nf = normal_form(spec)
    theta = _params(spec, torch.float64, 4)
    back = nf.merge(nf.split(theta))
    assert all(torch.equal(back[k], theta[k]) for k in theta)
    arrays = {k: np.random.default_rng(0).normal(size=(2, 3, *v.shape, 4)) for k, v in theta.items()}
    back_np = nf.merge(nf.split(arrays, lead=2), lead=2)
    assert all(np.array_equal(back_np[k], arrays[k]) for k in arrays)
    for pname, shape in nf.params:  # the index maps partition each real tensor
        flat = theta[pname].reshape(-1).numpy()
        pieces = nf.of_param[pname]
        indices = np.concatenate([vp.source_index().reshape(-1) for vp in pieces])
        assert np.array_equal(np.sort(indices), np.arange(flat.size)), pname
        for vp in pieces:
            assert np.array_equal(nf.split(theta)[vp.name].numpy(), flat[vp.source_index()])


def test_to_features_zoo_batch_round_trip(specs):
    spec = specs("moe-topk-shared-bias")
    nf = normal_form(spec)
    zoo = {k: torch.stack([_params(spec, torch.float32, s)[k] for s in range(3)]) for k in spec.params}
    features = to_features(nf, zoo)
    for vp in nf.virtual:
        assert features[vp.name].shape == (3, *vp.shape, 1) and features[vp.name].dtype == jnp.float32
    back = from_features(nf, features)
    assert all(np.array_equal(back[k][..., 0], zoo[k].numpy()) for k in zoo)
    features_np = to_features(nf, {k: v.numpy() for k, v in zoo.items()})
    assert all(np.array_equal(features_np[k], features[k]) for k in features)


# ----- labels: the worked examples of metanets.weight_space ---------------------------------------------------
def _roles(nf, name: str) -> list[set[tuple[str, str, str]]]:
    return [{(lab.factor, lab.role, lab.side) for lab in ax.labels} for ax in nf.by_name[name].axes]


def test_gpt2_c_attn_splits_into_q_k_v():
    stream = catalogue.stream("stream", 16)
    frag = Fragment.of(stream.factors) + catalogue.fused_attention_conv1d("attn", AttentionShape(16, 4, 4, 4), "learned", stream)
    frag = frag + Fragment.of(params={"wte": param((10, 16), None, stream.out())})
    nf = normal_form(Spec(frag))
    assert [vp.name for vp in nf.of_param["attn.c_attn.weight"]] == [f"attn.c_attn.weight[:,{i}]" for i in range(3)]
    assert nf.by_name["attn.c_attn.weight[:,1]"].shape == (16, 4, 4)
    assert _roles(nf, "attn.c_attn.weight[:,1]") == [
        {("stream", "unit", "in")},
        {("attn.heads", "group", "in"), ("attn.qk", "unit", "in")},
        {("attn.heads", "dim", "in"), ("attn.qk", "dim", "in")},
    ]
    assert _roles(nf, "attn.c_attn.bias[2]")[0] == {("attn.heads", "group", "out"), ("attn.vo", "unit", "out")}


def test_gqa_heads_act_at_two_levels(specs):
    nf = normal_form(specs("tf-pe-none"))  # 4 query heads in 2 KV groups, head_dim 8
    p = "blocks.0.attn"
    assert nf.by_name[f"{p}.q_proj.weight"].shape == (2, 2, 8, 32)
    assert _roles(nf, f"{p}.q_proj.weight")[:3] == [
        {(f"{p}.heads", "group", "out"), (f"{p}.qk", "unit", "out")},
        {(f"{p}.heads", "member", "out"), (f"{p}.qk", "repeat", "out")},
        {(f"{p}.heads", "dim", "out"), (f"{p}.qk", "dim", "out")},
    ]
    assert nf.by_name[f"{p}.k_proj.weight"].shape == (2, 8, 32)
    assert {(name, lab.role, lab.side) for name, _, lab in nf.where(f"{p}.qk")} == {
        (f"{p}.q_proj.weight", "unit", "out"), (f"{p}.q_proj.weight", "repeat", "out"), (f"{p}.q_proj.weight", "dim", "out"),
        (f"{p}.k_proj.weight", "unit", "in"), (f"{p}.k_proj.weight", "dim", "in"),
    }  # fmt: skip
    levels = {vp.name: u.level for vp in nf.virtual for u in vp.uses if u.factor == f"{p}.heads"}
    assert levels == {f"{p}.q_proj.weight": "heads", f"{p}.o_proj.weight": "heads", f"{p}.k_proj.weight": "groups", f"{p}.v_proj.weight": "groups"}


def test_rope_layouts_share_one_normal_form(specs):
    half, inter = normal_form(specs("tf-rope-half-gqa")), normal_form(specs("tf-rope-interleaved-gqa-bias"))
    q = "blocks.0.attn.q_proj.weight"
    assert half.by_name[q].axes == inter.by_name[q].axes and half.by_name[q].shape == (2, 2, 4, 2, 32)
    assert [lab.role for lab in half.by_name[q].axes[3].labels if lab.factor.endswith(".qk")] == ["coord"]
    dh = 8  # half layout: pair j, coordinate c is head dim c * dh/2 + j; interleaved: 2 j + c
    idx_half, idx_inter = half.by_name[q].source_index(), inter.by_name[q].source_index()
    j, c = 3, 1
    assert idx_half[0, 0, j, c, 0] == (c * dh // 2 + j) * 32 and idx_inter[0, 0, j, c, 0] == (2 * j + c) * 32


def test_cnn_flattened_head_has_block_axis(specs):
    nf = normal_form(specs("cnn-group"))  # widths (8, 16), GroupNorm with 2 groups, 2x2 pixels per channel into the head
    assert nf.by_name["head.weight"].shape == (10, 2, 8, 4)
    roles = _roles(nf, "head.weight")
    assert roles[0] == set() and ("convs.1.channels", "block", "in") in roles[3]
    assert ("convs.1.channels", "group", "in") in roles[1] and ("convs.1.channels", "member", "in") in roles[2]


# ----- translations, jit, refusals -----------------------------------------------------------------------------
def test_affine_false_drops_translations(specs):
    spec = specs("moe-topk-shared-bias")
    nf = normal_form(spec)
    theta = _params(spec, torch.float64, 5)
    g = GroupElement.sample(spec, 2)
    linear = g.replace(**{n: f.identity() for n, f in spec.factors.items() if f.kind == "translation"})
    with jax.enable_x64(True):
        moved = from_features(nf, act_features(nf, _features(nf, [theta, theta]), g, affine=False))
        moved = {k: v[0, ..., 0] for k, v in moved.items()}
    ref, affine = act(spec, theta, linear), act(spec, theta, g)
    assert max(_relative(moved[k], ref[k].numpy()) for k in ref) <= 1e-12
    assert _relative(moved["blocks.0.ffn.router.weight"], affine["blocks.0.ffn.router.weight"].numpy()) > 1e-3


def test_jit_matches_eager():
    """Under jax.jit (element arrays as a traced pytree): heads at both levels, RoPE, GL, batched experts, shifts."""
    spec = spec_for(TransformerConfig(n_layers=1, pe="rope", ffn="moe", router_bias=True, n_kv_heads=2))
    nf = normal_form(spec)
    features = to_features(nf, {k: v[None] for k, v in _params(spec, torch.float32, 6).items()})
    arrays = element_arrays(GroupElement.sample(spec, 7))
    eager, jitted = act_features(nf, features, arrays), jit_action(nf)(features, arrays)
    assert all(np.allclose(eager[k], jitted[k], rtol=1e-6, atol=1e-6) for k in eager)


def test_refuses_unknown_factor_kind():
    class Mystery(Factor):  # local, and collected afterwards: other tests enumerate Factor subclasses
        kind = "mystery"

    frag = None
    try:
        frag = Fragment.of([Mystery("units", 4)], {"a.weight": param((4, 3), On("units", "out")), "b.weight": param((2, 4), None, On("units", "in"))})
        with pytest.raises(SpecError, match="'units'.*'mystery'"):
            normal_form(Spec(frag))
    finally:
        del frag, Mystery
        gc.collect()


def test_refuses_mismatched_tensors(specs):
    nf = normal_form(specs("mlp-relu"))
    theta = _params(specs("mlp-relu"), torch.float64, 0)
    theta["layers.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(SpecError, match=r"layers\.0\.weight: shape \(3, 3\)"):
        nf.split(theta)
    with pytest.raises(SpecError, match="missing"):
        nf.merge({})


def test_act_features_names_missing_inputs(specs):
    spec = specs("mlp-tanh")
    nf = normal_form(spec)
    features = to_features(nf, {k: v[None] for k, v in _params(spec, torch.float32, 0).items()})
    g = GroupElement.sample(spec, 0)
    with pytest.raises(SpecError, match=r"miss virtual parameters \['layers.0.bias'\]"):
        act_features(nf, {k: v for k, v in features.items() if k != "layers.0.bias"}, g)
    other = normal_form(specs("mlp-relu"))
    with pytest.raises(SpecError, match="no value for factor"):
        act_features(other, features, g)
