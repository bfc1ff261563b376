"""GroupElement: construction, sampling, group operations, and the wreath / semidirect structure of
batched (per-expert) factors and router translations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from symm import (
    Fragment,
    GroupElement,
    On,
    Permutation,
    PositiveScaling,
    Segment,
    Shift,
    Spec,
    SpecError,
    Translation,
    param,
    testing,
)
from symm.action import act
from symm.models import MLPConfig, spec_for

E, I, D, D_IN, N_OUT = 3, 4, 5, 6, 2


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_params(spec: Spec, seed: int = 0) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {k: torch.randn(ps.shape, generator=g, dtype=torch.float64) for k, ps in spec.params.items()}


def values_close(a: GroupElement, b: GroupElement, tol: float = 1e-10) -> bool:
    for name, v in a.values.items():
        w = b.values[name]
        if v.dtype == torch.long:
            if not torch.equal(v, w):
                return False
        elif not torch.allclose(v, w, atol=tol, rtol=tol):
            return False
    return True


def assert_axioms(spec: Spec, params: dict, n: int = 5, tol: float = 1e-10) -> None:
    snapshot = {k: v.clone() for k, v in params.items()}

    def close(a, b, what):
        for k in b:
            assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), f"{what}: {k}"

    for i in range(n):
        g, h = GroupElement.sample(spec, 2 * i), GroupElement.sample(spec, 2 * i + 1)
        assert g.compose(g.inverse()).is_identity(atol=1e-10) and g.inverse().compose(g).is_identity(atol=1e-10)
        close(act(spec, params, g.compose(g.inverse())), params, "(g g^-1).theta")
        close(act(spec, params, g.compose(h)), act(spec, act(spec, params, h), g), "(g h).theta vs g.(h.theta)")
        close(act(spec, act(spec, params, g), g.inverse()), params, "g^-1.(g.theta)")
        moved = act(spec, params, g)
        assert all(moved[k] is not params[k] for k in params)
    for k in params:
        assert torch.equal(params[k], snapshot[k]), f"act mutated {k}"


# ----- construction and sampling --------------------------------------------------------------------------


@pytest.fixture
def relu_spec() -> Spec:
    return spec_for(MLPConfig((6, 5, 4, 3), "relu"))


def test_identity_and_sample(relu_spec):
    e = GroupElement.identity(relu_spec)
    assert e.is_identity() and not GroupElement.sample(relu_spec, 0).is_identity()
    assert values_close(e, GroupElement.identity(relu_spec))
    assert values_close(GroupElement.sample(relu_spec, 3), GroupElement.sample(relu_spec, 3))  # int seeds are reproducible
    assert values_close(GroupElement.sample(relu_spec, gen(3)), GroupElement.sample(relu_spec, 3))
    assert not values_close(GroupElement.sample(relu_spec, 3), GroupElement.sample(relu_spec, 4))
    assert "0 non-identity" in repr(e) and "4 factors" in repr(e)


def test_sample_only_keeps_the_rest_at_identity(relu_spec):
    g = GroupElement.sample(relu_spec, 0, only=["layers.1.units.scale"])
    assert not relu_spec.factors["layers.1.units.scale"].is_identity(g.values["layers.1.units.scale"])
    assert all(relu_spec.factors[n].is_identity(v) for n, v in g.values.items() if n != "layers.1.units.scale")
    assert values_close(GroupElement.sample(relu_spec, 0, only=["layers.1.units.scale"]), g)
    with pytest.raises(SpecError, match="nope"):
        GroupElement.sample(relu_spec, 0, only=["nope"])


def test_restrict_and_replace(relu_spec):
    g = GroupElement.sample(relu_spec, 0)
    r = g.restrict(["layers.0.units"])
    assert torch.equal(r.values["layers.0.units"], g.values["layers.0.units"])
    assert r.restrict([]).is_identity()
    new = torch.arange(5).flip(0)
    assert torch.equal(g.replace(**{"layers.0.units": new}).values["layers.0.units"], new)
    assert torch.equal(g.values["layers.0.units"], GroupElement.sample(relu_spec, 0).values["layers.0.units"])  # g unchanged


@pytest.mark.parametrize(
    "values, names",
    [
        (lambda e: {k: v for k, v in e.items() if k != "layers.0.units"}, ["missing", "layers.0.units"]),
        (lambda e: {**e, "ghost": torch.zeros(1)}, ["unexpected", "ghost"]),
        (lambda e: {**e, "layers.0.units": torch.tensor([0, 0, 1, 2, 3])}, ["'layers.0.units'", "permutation"]),
        (lambda e: {**e, "layers.1.units.scale": -torch.ones(4, dtype=torch.float64)}, ["'layers.1.units.scale'", "> 0"]),
        (lambda e: {**e, "layers.1.units.scale": torch.ones(5, dtype=torch.float64)}, ["'layers.1.units.scale'", "shape"]),
    ],
    ids=["missing", "extra", "not-a-permutation", "negative-scale", "wrong-shape"],
)
def test_invalid_elements_raise(relu_spec, values, names):
    with pytest.raises(SpecError) as info:
        GroupElement(relu_spec, values(dict(GroupElement.identity(relu_spec).values)))
    for name in names:
        assert name in str(info.value)


def test_values_are_read_only_and_specs_must_match(relu_spec):
    g = GroupElement.sample(relu_spec, 0)
    with pytest.raises(TypeError):
        g.values["layers.0.units"] = torch.arange(5)
    other = spec_for(MLPConfig((6, 5, 4, 3), "tanh"))
    with pytest.raises(SpecError, match="different specs"):
        g.compose(GroupElement.sample(other, 0))
    # an equal spec built separately is the same group
    twin = spec_for(MLPConfig((6, 5, 4, 3), "relu"))
    assert g.compose(GroupElement.sample(twin, 1)).spec is relu_spec


def test_element_algebra(relu_spec):
    g, h, k = GroupElement.sample(relu_spec, 0), GroupElement.sample(relu_spec, 1), GroupElement.sample(relu_spec, 2)
    e = GroupElement.identity(relu_spec)
    assert values_close(g.compose(e), g) and values_close(e.compose(g), g)
    assert values_close(g.inverse().inverse(), g)
    assert values_close(g.compose(h).compose(k), g.compose(h.compose(k)))
    assert values_close(g.compose(h).inverse(), h.inverse().compose(g.inverse()))
    params = random_params(relu_spec)
    assert all(torch.equal(g.act(params)[k], act(relu_spec, params, g)[k]) for k in params)


def test_child_values_are_reindexed_when_composing(relu_spec):
    """Scaling is indexed by the *unpermuted* units: composing after a permutation moves the scales with it."""
    p = GroupElement.sample(relu_spec, 0, only=["layers.0.units"])
    s = GroupElement.sample(relu_spec, 1, only=["layers.0.units.scale"])
    perm, scale = p.values["layers.0.units"], s.values["layers.0.units.scale"]
    assert torch.equal(p.compose(s).values["layers.0.units.scale"], scale)
    assert torch.allclose(s.compose(p).values["layers.0.units.scale"], scale[torch.argsort(perm)])
    params = random_params(relu_spec)
    for a, b in ((p, s), (s, p)):
        for key in params:
            assert torch.allclose(act(relu_spec, params, a.compose(b))[key], act(relu_spec, act(relu_spec, params, b), a)[key])


@settings(deadline=None, max_examples=10, derandomize=True, database=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    activation=st.sampled_from(["relu", "tanh", "gelu", "swiglu"]),
    bias=st.booleans(),
)
def test_axioms_for_random_mlps(sizes, activation, bias):
    spec = spec_for(MLPConfig(tuple(sizes), activation, bias=bias))
    hidden = sizes[1:-1]
    assert len(spec.permutation_factors) == len(hidden)
    assert spec.dimension == (sum(hidden) if activation in ("relu", "swiglu") else 0)
    assert_axioms(spec, random_params(spec), n=3)


# ----- wreath product: per-expert factors batched under the expert permutation -------------------------------


def wreath_spec() -> Spec:
    """Experts (E) x per-expert hidden permutation (I) x per-expert positive scaling, on stacked weights."""
    factors = [
        Permutation("experts", E),
        Permutation("eh", I, parent="experts", batch=(E,)),
        PositiveScaling("eh.s", I, parent="eh", batch=(E,)),
    ]
    hidden = [On("eh", batch_axis=0), On("eh.s", batch_axis=0)]
    consumed = [On("eh", "in", batch_axis=0), On("eh.s", "in", batch_axis=0)]
    params = {
        "w1": param((E, I, D), On("experts"), hidden),  # (E, I, d): rows are each expert's hidden units
        "b1": param((E, I), On("experts"), hidden),
        "w2": param((E, D, I), On("experts", "in"), None, consumed),  # (E, d, I): columns consume them
    }
    return Spec(Fragment.of(factors, params), name="wreath")


def experts_sum(p, x):
    """``sum_e w2[e] @ relu(w1[e] @ x + b1[e])`` for a batch of x (N, d)."""
    h = F.relu(torch.einsum("eid,nd->nei", p["w1"], x) + p["b1"])
    return torch.einsum("edi,nei->nd", p["w2"], h)


def test_wreath_spec_validates_and_counts():
    spec = wreath_spec()
    assert spec.factor_order == ("experts", "eh", "eh.s")
    assert spec.depth("eh.s") == 2
    assert spec.dimension == E * I
    assert GroupElement.sample(spec, 0).values["eh"].shape == (E, I)
    assert GroupElement.sample(spec, 0).values["eh.s"].shape == (E, I)


def test_wreath_axioms_and_invariance():
    spec = wreath_spec()
    params = random_params(spec)
    assert_axioms(spec, params, n=8)
    x = torch.randn(7, D, generator=gen(1), dtype=torch.float64)
    f = lambda p: experts_sum(p, x)  # noqa: E731
    assert testing.assert_invariant(f, spec, params, n_samples=20) < 1e-10
    testing.assert_group_axioms(spec, params, atol=1e-12)


def test_wreath_actions_really_move_experts_and_units():
    spec = wreath_spec()
    params = random_params(spec)
    g = GroupElement.sample(spec, 0)
    p, q, a = g.values["experts"], g.values["eh"], g.values["eh.s"]
    moved = act(spec, params, g)
    # expert slot e now holds old expert p[e], whose hidden unit q[p[e], i] sits at i, scaled by a[p[e], that unit]
    for e in range(E):
        old = int(p[e])
        rows = params["w1"][old][q[old]] * a[old][q[old]].unsqueeze(-1)
        assert torch.allclose(moved["w1"][e], rows)
        cols = params["w2"][old][:, q[old]] / a[old][q[old]]
        assert torch.allclose(moved["w2"][e], cols)


def test_wreath_composition_reindexes_per_expert_factors():
    spec = wreath_spec()
    params = random_params(spec)
    experts_only = GroupElement.sample(spec, 0, only=["experts"])
    scales_only = GroupElement.sample(spec, 1, only=["eh.s"])
    p = experts_only.values["experts"]
    assert not torch.equal(p, torch.arange(E))
    # experts act after the scales: the scales keep their expert index; before: they follow their expert
    assert torch.equal(experts_only.compose(scales_only).values["eh.s"], scales_only.values["eh.s"])
    assert torch.allclose(scales_only.compose(experts_only).values["eh.s"], scales_only.values["eh.s"][torch.argsort(p)])
    # a naive unit-wise product (no reindexing) is not the composition
    g, h = GroupElement.sample(spec, 2), GroupElement.sample(spec, 3)
    naive = GroupElement(spec, {n: spec.factors[n].compose(g.values[n], h.values[n]) for n in spec.factors})
    sequential = act(spec, act(spec, params, h), g)
    assert torch.allclose(act(spec, params, g.compose(h))["w1"], sequential["w1"])
    assert not torch.allclose(act(spec, params, naive)["w1"], sequential["w1"])


def test_wreath_negative_control_unbatched_expert_scaling():
    """Scaling expert 0's hidden unit but compensating in expert 1's columns is not a symmetry."""
    spec = wreath_spec()
    params = random_params(spec)
    x = torch.randn(7, D, generator=gen(1), dtype=torch.float64)
    moved = dict(params)
    moved["w1"] = params["w1"].clone()
    moved["w2"] = params["w2"].clone()
    moved["w1"][0, 0] *= 3.0
    moved["b1"] = params["b1"].clone()
    moved["b1"][0, 0] *= 3.0
    moved["w2"][1, :, 0] /= 3.0
    testing.assert_not_invariant(lambda p: experts_sum(p, x), params, moved)
    moved["w2"] = params["w2"].clone()
    moved["w2"][0, :, 0] /= 3.0  # the right expert: a symmetry
    assert testing.relative_error(experts_sum(moved, x), experts_sum(params, x)) < 1e-12


# ----- semidirect product: router translations with a permuted stream --------------------------------------


def routed_spec() -> Spec:
    """embed -> stream (permuted) -> softmax router (translated, rows follow the experts) -> wreath experts."""
    factors = [
        Permutation("stream", D),
        Permutation("experts", E),
        Permutation("eh", I, parent="experts", batch=(E,)),
        PositiveScaling("eh.s", I, parent="eh", batch=(E,)),
        Translation("router.shift", D),
    ]
    hidden = [On("eh", batch_axis=0), On("eh.s", batch_axis=0)]
    consumed = [On("eh", "in", batch_axis=0), On("eh.s", "in", batch_axis=0)]
    params = {
        "embed": param((D, D_IN), On("stream")),
        "router": param((E, D), On("experts"), On("stream", "in"), shifts=[Shift("router.shift", 0)]),
        "w1": param((E, I, D), On("experts", "in"), hidden, On("stream", "in")),
        "w2": param((E, D, I), On("experts", "in"), On("stream"), consumed),
        "head": param((N_OUT, D), None, On("stream", "in")),
    }
    return Spec(Fragment.of(factors, params), name="routed")


def routed_fn(p, x):
    h = x @ p["embed"].T
    gates = torch.softmax(h @ p["router"].T, dim=-1)  # (N, E)
    hidden = F.relu(torch.einsum("nd,eid->nei", h, p["w1"]))
    y = torch.einsum("nei,edi,ne->nd", hidden, p["w2"], gates)
    return (h + y) @ p["head"].T


def test_routed_axioms_and_invariance():
    spec = routed_spec()
    params = random_params(spec)
    x = torch.randn(9, D_IN, generator=gen(5), dtype=torch.float64)
    assert spec.dimension == E * I + D
    assert_axioms(spec, params, n=8)
    assert testing.assert_invariant(lambda p: routed_fn(p, x), spec, params, n_samples=20) < 1e-10


def test_translation_composes_through_the_linear_part():
    """W -> L(W + t): (g h) has translation t_h + L_h^{-1} t_g (here L_h permutes the stream)."""
    spec = routed_spec()
    g, h = GroupElement.sample(spec, 0), GroupElement.sample(spec, 1)
    p_h = h.values["stream"]
    expected = h.values["router.shift"] + g.values["router.shift"][torch.argsort(p_h)]
    assert torch.allclose(g.compose(h).values["router.shift"], expected)
    assert torch.allclose(g.inverse().values["router.shift"], -g.values["router.shift"][g.values["stream"]])
    assert g.compose(g.inverse()).is_identity(atol=1e-12)
    # only the translation: a plain shift of every router row
    t = GroupElement.sample(spec, 2, only=["router.shift"])
    params = random_params(spec)
    moved = act(spec, params, t)
    assert torch.allclose(moved["router"] - params["router"], t.values["router.shift"].expand(E, D))
    assert all(torch.equal(moved[k], params[k]) for k in params if k != "router")


def test_routed_negative_controls():
    spec = routed_spec()
    params = random_params(spec)
    x = torch.randn(9, D_IN, generator=gen(5), dtype=torch.float64)
    f = lambda p: routed_fn(p, x)  # noqa: E731
    g = GroupElement.sample(spec, 0, only=["experts"])
    moved = act(spec, params, g)
    left_behind = dict(moved, router=params["router"])  # experts moved, routing did not
    testing.assert_not_invariant(f, params, left_behind)
    shifted_rows = dict(params)
    shifted_rows["router"] = params["router"] + torch.randn(E, D, generator=gen(9), dtype=torch.float64)  # per-row
    testing.assert_not_invariant(f, params, shifted_rows)


# ----- segments, shifts along other axes, children of head permutations --------------------------------------


def test_fused_segments_act_like_separate_parameters():
    """A fused gate|up weight (2n, d) split in two segments acts exactly like the two separate weights."""
    n, d = 5, 3
    factors = [Permutation("u", n), PositiveScaling("u.s", n, parent="u")]
    gate, up, down = [On("u")], [On("u"), On("u.s")], [On("u", "in"), On("u.s", "in")]
    fused = Spec(Fragment.of(factors, {"gu": param((2 * n, d), [Segment(n, tuple(gate)), Segment(n, tuple(up))]),
                                        "down": param((d, n), None, down)}))
    split = Spec(Fragment.of(factors, {"g": param((n, d), gate), "up": param((n, d), up), "down": param((d, n), None, down)}))
    params = random_params(fused)
    g = GroupElement.sample(fused, 0)
    moved = act(fused, params, g)
    ref = act(split, {"g": params["gu"][:n], "up": params["gu"][n:], "down": params["down"]}, GroupElement(split, g.values))
    assert torch.allclose(moved["gu"], torch.cat([ref["g"], ref["up"]]))
    assert torch.allclose(moved["down"], ref["down"])
    assert_axioms(fused, params)


def test_translation_along_axis_one():
    """A router stored transposed (d, E) is shifted along axis 1; the stream permutes its rows."""
    spec = Spec(Fragment.of(
        [Permutation("s", D), Permutation("e", E), Translation("t", D)],
        {"emb": param((D, D_IN), On("s")), "r": param((D, E), On("s", "in"), On("e"), shifts=[Shift("t", 1)]),
         "w": param((E, N_OUT), On("e", "in"))},
    ))
    params = random_params(spec)
    x = torch.randn(7, D_IN, generator=gen(3), dtype=torch.float64)
    f = lambda p: torch.softmax((x @ p["emb"].T) @ p["r"], -1) @ p["w"]  # noqa: E731
    assert_axioms(spec, params)
    assert testing.assert_invariant(f, spec, params) < 1e-10
    t = GroupElement.sample(spec, 1, only=["t"])
    assert torch.allclose(act(spec, params, t)["r"] - params["r"], t.values["t"].unsqueeze(1).expand(D, E))


def test_per_head_child_under_a_grouped_head_permutation():
    """Children of a head permutation may live on heads (count = heads) or on KV groups (count = groups)."""
    from symm import GeneralLinear, HeadPermutation, RotationScaling

    heads, groups, dh = 4, 2, 4
    spec = Spec(Fragment.of(
        [HeadPermutation("h", heads, groups=groups, head_dim=dh), RotationScaling("c", heads, parent="h", dim=dh),
         GeneralLinear("v", groups, parent="h", dim=dh)],
        {
            "q": param((heads * dh, 3), [On("h"), On("c")]),
            "q_in": param((3, heads * dh), None, [On("h", "in"), On("c", "in")]),
            "k": param((groups * dh, 3), [On("h"), On("v")]),
            "k_in": param((3, groups * dh), None, [On("h", "in"), On("v", "in")]),
        },
    ))
    params = random_params(spec)
    f = lambda p: torch.cat([(p["q_in"] @ p["q"]).flatten(), (p["k_in"] @ p["k"]).flatten()])  # noqa: E731
    assert_axioms(spec, params)
    assert testing.assert_invariant(f, spec, params) < 1e-10
