"""Factor kinds on their own: group axioms on elements, action on an axis, RoPE / attention / softmax properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from symm import (
    Fragment,
    GeneralLinear,
    HeadPermutation,
    On,
    Permutation,
    PositiveScaling,
    RotationScaling,
    Shift,
    SignFlip,
    Spec,
    Translation,
    param,
    testing,
)
from symm.action import act
from symm.catalogue import AttentionShape, attention
from symm.catalogue.units import Units
from symm.element import GroupElement

FAST = settings(deadline=None, max_examples=12, derandomize=True, database=None)
KINDS = ["permutation", "head-permutation", "positive-scaling", "sign-flip", "general-linear", "rotation-scaling-half",
         "rotation-scaling-interleaved"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def factors(draw, kinds=tuple(KINDS), batched=True):
    kind = draw(st.sampled_from(kinds))
    count = draw(st.integers(1, 5))
    batch = draw(st.sampled_from([(), (2,), (3,)])) if batched and kind != "head-permutation" else ()
    if kind == "permutation":
        return Permutation("f", count, batch=batch)
    if kind == "head-permutation":
        groups = draw(st.integers(1, 3))
        return HeadPermutation("f", groups * draw(st.integers(1, 3)), groups=groups, head_dim=draw(st.integers(1, 3)))
    if kind == "positive-scaling":
        return PositiveScaling("f", count, batch=batch)
    if kind == "sign-flip":
        return SignFlip("f", count, batch=batch)
    if kind == "general-linear":
        return GeneralLinear("f", count, batch=batch, dim=draw(st.integers(1, 4)))
    layout = kind.rsplit("-", 1)[1]
    return RotationScaling("f", count, batch=batch, dim=2 * draw(st.integers(1, 3)), layout=layout)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    if a.dtype == torch.long or b.dtype == torch.long:
        return torch.equal(a, b)
    return bool(torch.allclose(a.double(), b.double(), atol=tol, rtol=tol))


def axis_input(f, seed: int, repeat: int = 1, block: int = 1, extra: int = 3) -> torch.Tensor:
    """A float64 tensor ``(*batch, extra, entries)`` whose last axis the factor acts on."""
    n = f.count * repeat * f.unit_size * block
    return torch.randn(*f.batch, extra, n, generator=gen(seed), dtype=torch.float64)


# ----- element-level group axioms -------------------------------------------------------------------------


@FAST
@given(f=factors(), seed=st.integers(0, 2**16))
def test_identity_inverse_compose_axioms(f, seed):
    g = gen(seed)
    a, b, c = f.sample(g), f.sample(g), f.sample(g)
    e = f.identity()
    for x in (e, a, b):
        f.check_element(x)
        assert tuple(x.shape) == f.element_shape
    assert f.is_identity(e)
    assert close(f.compose(a, e), a) and close(f.compose(e, a), a)
    assert f.is_identity(f.compose(a, f.inverse(a)), atol=1e-9)
    assert f.is_identity(f.compose(f.inverse(a), a), atol=1e-9)
    assert close(f.inverse(f.inverse(a)), a)
    assert close(f.compose(f.compose(a, b), c), f.compose(a, f.compose(b, c)))
    # (ab)^-1 = b^-1 a^-1
    assert close(f.inverse(f.compose(a, b)), f.compose(f.inverse(b), f.inverse(a)))


@FAST
@given(f=factors(), seed=st.integers(0, 2**16), repeat=st.integers(1, 3), side=st.sampled_from(["out", "in"]))
def test_action_is_a_group_action(f, seed, repeat, side):
    a, b = f.sample(gen(seed)), f.sample(gen(seed + 1))
    x = axis_input(f, seed + 2, repeat=repeat)
    assert torch.equal(f.apply(x, f.identity(), side, repeat, 1), x)
    sequential = f.apply(f.apply(x, b, side, repeat, 1), a, side, repeat, 1)
    assert close(f.apply(x, f.compose(a, b), side, repeat, 1), sequential)
    assert close(f.apply(f.apply(x, a, side, repeat, 1), f.inverse(a), side, repeat, 1), x)


@FAST
@given(f=factors(), seed=st.integers(0, 2**16), repeat=st.integers(1, 3))
def test_out_and_in_sides_keep_every_pairing(f, seed, repeat):
    """``<M u, M^-T v> = <u, v>``: what a layer produces (out) and its consumer reads (in) still match."""
    a = f.sample(gen(seed))
    u, v = axis_input(f, seed + 1, repeat), axis_input(f, seed + 2, repeat)
    mu, mv = f.apply(u, a, "out", repeat, 1), f.apply(v, a, "in", repeat, 1)
    assert close((mu * mv).sum(-1), (u * v).sum(-1))
    if not f.is_identity(a):
        assert not close(mu, u) or not close(mv, v)


@FAST
@given(f=factors(kinds=("permutation", "positive-scaling", "sign-flip")), seed=st.integers(0, 2**16),
       block=st.integers(2, 4))
def test_block_acts_on_consecutive_entries_of_a_unit(f, seed, block):
    """``block`` entries per scalar unit (flattened conv channels) all receive the unit's element."""
    a = f.sample(gen(seed))
    x = axis_input(f, seed + 1, block=block)
    y = f.apply(x, a, "out", 1, block)
    blocked = x.reshape(*x.shape[:-1], f.count, block).movedim(-1, 0)
    ref = torch.stack([f.apply(blocked[j], a, "out", 1, 1) for j in range(block)]).movedim(0, -1).reshape(x.shape)
    assert close(y, ref)


@pytest.mark.parametrize("factor", [GeneralLinear("gl", 2, dim=2), RotationScaling("rs", 2, dim=2)], ids=lambda f: f.kind)
def test_block_factors_refuse_block(factor):
    x = torch.randn(3, factor.count * factor.dim * 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="block"):
        factor.apply(x, factor.identity(), "out", 1, 2)


def test_permutation_gather_semantics():
    f = Permutation("p", 4)
    x = torch.tensor([[10.0, 11.0, 12.0, 13.0]])
    perm = torch.tensor([2, 0, 3, 1])
    assert f.apply(x, perm, "out", 1, 1).tolist() == [[12.0, 10.0, 13.0, 11.0]]
    assert f.apply(x, perm, "in", 1, 1).tolist() == [[12.0, 10.0, 13.0, 11.0]]  # orthogonal: same on both sides
    assert f.apply(x.repeat_interleave(2, -1), perm, "out", 2, 1).tolist() == [[12.0, 12.0, 10.0, 10.0, 13.0, 13.0, 11.0, 11.0]]


def test_batched_permutation_is_one_permutation_per_batch_entry():
    f = Permutation("p", 5, batch=(3,))
    a = f.sample(gen(0))
    assert a.shape == (3, 5)
    assert len({tuple(r.tolist()) for r in a}) > 1  # independent rows
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    y = f.apply(x, a, "out", 1, 1)
    for e in range(3):
        assert torch.equal(y[e], x[e][:, a[e]])


@pytest.mark.parametrize(
    "factor, bad",
    [
        (Permutation("p", 3), torch.tensor([0, 0, 1])),
        (Permutation("p", 3), torch.tensor([0.0, 1.0, 2.0])),
        (PositiveScaling("s", 3), torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)),
        (SignFlip("s", 3), torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64)),
        (RotationScaling("r", 1, dim=4), torch.zeros(1, 2, 2, dtype=torch.float64)),
        (GeneralLinear("g", 2, dim=3), torch.eye(3, dtype=torch.float64)),
        (HeadPermutation("h", 4, groups=2), torch.tensor([0, 2, 1, 3])),
    ],
    ids=["perm-repeat", "perm-float", "scale-negative", "sign-half", "rope-zero", "gl-shape", "heads-cross-group"],
)
def test_check_element_rejects_non_elements(factor, bad):
    with pytest.raises(ValueError, match=repr(factor.name)):
        factor.check_element(bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Permutation("", 3),
        lambda: Permutation("p", 0),
        lambda: HeadPermutation("h", 5, groups=2),
        lambda: HeadPermutation("h", 4, groups=2, batch=(2,)),
        lambda: RotationScaling("r", 2, dim=3),
        lambda: RotationScaling("r", 2, dim=4, layout="split"),
        lambda: Translation("t", 3, parent="p"),
        lambda: Translation("t", 3, batch=(2,)),
    ],
    ids=["empty-name", "zero-count", "heads-not-divisible", "heads-batched", "rope-odd-dim", "rope-bad-layout",
         "translation-parent", "translation-batched"],
)
def test_malformed_factors_raise(make):
    with pytest.raises(ValueError):
        make()


# ----- dimensions -----------------------------------------------------------------------------------------


@FAST
@given(count=st.integers(1, 8), d=st.integers(1, 6), batch=st.integers(1, 3))
def test_dimensions(count, d, batch):
    assert GeneralLinear("g", count, dim=d).dimension == count * d * d
    assert RotationScaling("r", count, dim=2 * d).dimension == count * 2 * d
    assert PositiveScaling("s", count).dimension == count
    assert PositiveScaling("s", count, batch=(batch,)).dimension == count * batch
    assert GeneralLinear("g", count, batch=(batch,), dim=d).dimension == batch * count * d * d
    assert Translation("t", count).dimension == count
    for discrete in (Permutation("p", count), SignFlip("s", count), HeadPermutation("h", count, groups=1, head_dim=d)):
        assert discrete.dimension == 0 and not discrete.is_continuous
    for cont in (GeneralLinear("g", count, dim=d), RotationScaling("r", count, dim=2 * d), PositiveScaling("s", count)):
        assert cont.is_continuous and not cont.is_permutation


def test_spec_dimension_sums_factor_dimensions():
    h = HeadPermutation("h", 4, groups=2, head_dim=4)
    qk = GeneralLinear("qk", 2, parent="h", dim=4)
    vo = RotationScaling("vo", 2, parent="h", dim=4)
    frag = Fragment.of(
        [h, qk, vo],
        {
            "q": param((16, 3), [On("h"), On("qk", repeat=2)]),
            "k": param((8, 3), [On("h", "in"), On("qk", "in")]),
            "v": param((8, 3), [On("h"), On("vo")]),
            "o": param((3, 16), None, [On("h", "in"), On("vo", "in", repeat=2)]),
        },
    )
    assert Spec(frag).dimension == 2 * 4 * 4 + 2 * 4


# ----- head permutations ------------------------------------------------------------------------------------


@FAST
@given(groups=st.integers(1, 4), per_group=st.integers(1, 4), head_dim=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_head_permutation_keeps_query_heads_in_their_kv_group(groups, per_group, head_dim, seed):
    f = HeadPermutation("h", groups * per_group, groups=groups, head_dim=head_dim)
    g = gen(seed)
    a, b = f.sample(g), f.sample(g)
    for element in (a, f.compose(a, b), f.inverse(a)):
        f.check_element(element)
        gp = f.group_permutation(element)
        assert sorted(gp.tolist()) == list(range(groups))
        # new head slot i holds old head element[i]; it must come from the old group now sitting at slot i // r
        assert torch.equal(element // per_group, gp.repeat_interleave(per_group))
    # through the action: label entries by head on a query axis and by group on a KV axis
    q = torch.arange(f.count).repeat_interleave(head_dim).double().unsqueeze(0)
    kv = torch.arange(groups).repeat_interleave(head_dim).double().unsqueeze(0)
    new_q = f.apply(q, a, "out", 1, 1).long()[0, ::head_dim]
    new_kv = f.apply(kv, a, "in", 1, 1).long()[0, ::head_dim]
    assert torch.equal(new_q // per_group, new_kv.repeat_interleave(per_group))


def test_head_permutation_samples_cover_both_levels():
    f = HeadPermutation("h", 6, groups=3, head_dim=1)
    seen_groups = {tuple(f.group_permutation(f.sample(gen(s))).tolist()) for s in range(60)}
    seen_within = {tuple((f.sample(gen(s)) % 2).tolist()) for s in range(60)}
    assert len(seen_groups) == 6  # all of S_3 on the groups
    assert len(seen_within) > 1  # and permutations within groups


# ----- RoPE: rotation-scaling commutes with position rotations ---------------------------------------------


def rope(x: torch.Tensor, layout: str, base: float = 100.0) -> torch.Tensor:
    """Rotate ``x`` (T, H, d) by position t; pair j (frequency base^(-2j/d)) is (2j, 2j+1) or (j, j + d/2)."""
    t, d = x.shape[0], x.shape[-1]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None, None] * inv  # (T, 1, d/2)
    cos, sin = torch.cos(ang), torch.sin(ang)
    if layout == "interleaved":
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    x0, x1 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)


def test_own_rope_matches_the_reference_transformer():
    from symm.models.transformer import apply_rope

    x = torch.randn(1, 3, 7, 8, dtype=torch.float64)  # (B, H, T, dh)
    for layout in ("interleaved", "half"):
        ours = rope(x[0].transpose(0, 1), layout, base=10000.0).transpose(0, 1)
        assert torch.allclose(ours, apply_rope(x, 10000.0, layout)[0])


def gqa_scores(q: torch.Tensor, k: torch.Tensor, r: int) -> torch.Tensor:
    """(T, Hq, d) x (S, Hkv, d) -> (Hq, T, S): query head h reads KV head h // r."""
    return torch.einsum("thd,shd->hts", q, k.repeat_interleave(r, dim=1))


@pytest.mark.parametrize("layout", ["interleaved", "half"])
@FAST
@given(kv=st.integers(1, 3), r=st.integers(1, 3), half_dim=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rotation_scaling_keeps_rope_scores(layout, kv, r, half_dim, seed):
    d, t = 2 * half_dim, 6
    f = RotationScaling("qk", kv, dim=d, layout=layout)
    a = f.sample(gen(seed))
    q = torch.randn(t, kv * r * d, generator=gen(seed + 1), dtype=torch.float64)
    k = torch.randn(t, kv * d, generator=gen(seed + 2), dtype=torch.float64)
    q2, k2 = f.apply(q, a, "out", r, 1), f.apply(k, a, "in", 1, 1)
    heads = lambda x: x.reshape(t, -1, d)  # noqa: E731
    # plain dot products q.k per head
    assert torch.allclose(gqa_scores(heads(q2), heads(k2), r), gqa_scores(heads(q), heads(k), r), atol=1e-10)
    # commutes with every position's rotation, hence RoPE scores are kept
    assert torch.allclose(rope(heads(q2), layout), heads(f.apply(rope(heads(q), layout).reshape(t, -1), a, "out", r, 1)))
    before = gqa_scores(rope(heads(q), layout), rope(heads(k), layout), r)
    after = gqa_scores(rope(heads(q2), layout), rope(heads(k2), layout), r)
    assert torch.allclose(after, before, atol=1e-10)


@pytest.mark.parametrize("layout", ["interleaved", "half"])
def test_rope_negative_controls(layout):
    """The wrong pair layout, or a general GL(d) block, does not commute with RoPE (d >= 4)."""
    d, t, kv = 8, 6, 2
    q = torch.randn(t, kv * d, generator=gen(0), dtype=torch.float64)
    k = torch.randn(t, kv * d, generator=gen(1), dtype=torch.float64)
    heads = lambda x: x.reshape(t, -1, d)  # noqa: E731
    before = gqa_scores(rope(heads(q), layout), rope(heads(k), layout), 1)
    other = "half" if layout == "interleaved" else "interleaved"
    for f in (RotationScaling("qk", kv, dim=d, layout=other), GeneralLinear("qk", kv, dim=d)):
        a = f.sample(gen(2))
        q2, k2 = f.apply(q, a, "out", 1, 1), f.apply(k, a, "in", 1, 1)
        assert torch.allclose(gqa_scores(heads(q2), heads(k2), 1), gqa_scores(heads(q), heads(k), 1))  # no RoPE: fine
        after = gqa_scores(rope(heads(q2), layout), rope(heads(k2), layout), 1)
        assert testing.relative_error(after, before) > 1e-3, f.kind


@FAST
@given(kv=st.integers(1, 3), r=st.integers(1, 3), d=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_general_linear_keeps_q_k_transpose(kv, r, d, seed):
    t = 5
    f = GeneralLinear("qk", kv, dim=d)
    a = f.sample(gen(seed))
    q = torch.randn(t, kv * r * d, generator=gen(seed + 1), dtype=torch.float64)
    k = torch.randn(t, kv * d, generator=gen(seed + 2), dtype=torch.float64)
    q2, k2 = f.apply(q, a, "out", r, 1), f.apply(k, a, "in", 1, 1)
    heads = lambda x: x.reshape(t, -1, d)  # noqa: E731
    assert torch.allclose(gqa_scores(heads(q2), heads(k2), r), gqa_scores(heads(q), heads(k), r), atol=1e-9)
    if d > 1:
        assert not torch.allclose(q2, q)
        # the same block on both sides (not its inverse transpose) breaks Q K^T unless it is orthogonal
        k_wrong = f.apply(k, a, "out", 1, 1)
        assert not torch.allclose(gqa_scores(heads(q2), heads(k_wrong), r), gqa_scores(heads(q), heads(k), r), atol=1e-6)


def test_general_linear_samples_both_determinant_signs():
    f = GeneralLinear("g", 64, dim=3)
    det = torch.linalg.det(f.sample(gen(0)))
    assert (det > 0).any() and (det < 0).any()
    assert det.abs().min() > 1e-3  # well conditioned


# ----- attention built from the catalogue: heads x GL / rotation-scaling ------------------------------------


def attention_fn(shape: AttentionShape, pe: str, layout: str):
    def f(p, x):  # x (T, d_model)
        t, dh, r = x.shape[0], shape.head_dim, shape.group_size
        q = (x @ p["a.q_proj.weight"].T).reshape(t, shape.n_heads, dh)
        k = (x @ p["a.k_proj.weight"].T).reshape(t, shape.n_kv_heads, dh)
        v = (x @ p["a.v_proj.weight"].T).reshape(t, shape.n_kv_heads, dh)
        if pe == "rope":
            q, k = rope(q, layout), rope(k, layout)
        att = torch.softmax(gqa_scores(q, k, r) / dh**0.5, dim=-1)  # (H, T, S)
        y = torch.einsum("hts,shd->thd", att, v.repeat_interleave(r, dim=1)).reshape(t, -1)
        return y @ p["a.o_proj.weight"].T

    return f


@pytest.mark.parametrize("kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("pe, layout", [("none", "half"), ("rope", "half"), ("rope", "interleaved")],
                         ids=["nope", "rope-half", "rope-interleaved"])
def test_attention_spec_preserves_attention(pe, layout, kv):
    shape = AttentionShape(d_model=12, n_heads=4, n_kv_heads=kv, head_dim=4)
    spec = Spec(attention("a", shape, pe, Units.fixed(12), rope_layout=layout))
    qk_kind = RotationScaling if pe == "rope" else GeneralLinear
    assert isinstance(spec.factors["a.qk"], qk_kind)
    assert spec.dimension == kv * 4 * 4 + (kv * 4 if pe == "rope" else kv * 16)
    g = gen(0)
    params = {k: torch.randn(ps.shape, generator=g, dtype=torch.float64) for k, ps in spec.params.items()}
    x = torch.randn(7, 12, generator=g, dtype=torch.float64)
    f = attention_fn(shape, pe, layout)
    assert testing.assert_invariant(lambda p: f(p, x), spec, params, n_samples=10) < 1e-10
    # GL(d) on Q/K is not a symmetry under RoPE
    if pe == "rope":
        gl_spec = Spec(attention("a", shape, "none", Units.fixed(12)))
        h = GroupElement.sample(gl_spec, 0).restrict(["a.qk"])
        testing.assert_not_invariant(lambda p: f(p, x), params, act(gl_spec, params, h))


# ----- translation: softmax router rows -------------------------------------------------------------------


def router_spec(e: int, d: int) -> Spec:
    frag = Fragment.of(
        [Translation("t", d), Translation("tb", 1)],
        {"w": param((e, d), shifts=[Shift("t", 0)]), "b": param((e,), shifts=[Shift("tb", 0)])},
    )
    return Spec(frag, name="router")


@FAST
@given(e=st.integers(2, 6), d=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_translation_keeps_router_softmax(e, d, seed):
    spec = router_spec(e, d)
    assert spec.dimension == d + 1
    g = gen(seed)
    params = {"w": torch.randn(e, d, generator=g, dtype=torch.float64), "b": torch.randn(e, generator=g, dtype=torch.float64)}
    x = torch.randn(9, d, generator=g, dtype=torch.float64)
    logits = lambda p: x @ p["w"].T + p["b"]  # noqa: E731
    el = GroupElement.sample(spec, seed)
    moved = act(spec, params, el)
    # every router row (and every bias entry) got the same shift
    assert torch.allclose(moved["w"] - params["w"], el.values["t"].expand(e, d))
    assert torch.allclose(moved["b"] - params["b"], el.values["tb"].expand(e))
    assert torch.allclose(torch.softmax(logits(moved), -1), torch.softmax(logits(params), -1), atol=1e-12)
    testing.assert_not_invariant(logits, params, moved, min_error=1e-6)  # the logits themselves moved
    testing.assert_not_invariant(lambda p: torch.sigmoid(logits(p)), params, moved, min_error=1e-6)  # sigmoid gating
    # group structure of the translation factor
    t = spec.factors["t"]
    a, b = t.sample(g), t.sample(g)
    assert torch.equal(t.compose(a, b), a + b) and t.is_identity(t.compose(a, t.inverse(a)))
    assert torch.allclose(act(spec, act(spec, params, el), el.inverse())["w"], params["w"])


def test_translation_shift_along_other_axis():
    t = Translation("t", 3)
    x = torch.zeros(3, 4, dtype=torch.float64)
    y = t.shift(x, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), axis=1)
    assert torch.equal(y, torch.tensor([[1.0] * 4, [2.0] * 4, [3.0] * 4], dtype=torch.float64))
