"""Spec validation: each malformed case raises a SpecError naming the offending parameter / factor.
Also the structural views of a Spec: graph, coupled factors, describe."""

from __future__ import annotations

import re

import networkx as nx
import pytest
import torch

from symm import (
    Fragment,
    GeneralLinear,
    HeadPermutation,
    On,
    Permutation,
    PositiveScaling,
    Segment,
    Shift,
    SignFlip,
    Spec,
    SpecError,
    SymmError,
    Translation,
    coupled_factors,
    merge,
    param,
)
from symm.action import act
from symm.catalogue import mlp as mlp_fragment
from symm.element import GroupElement
from symm.graph import describe, to_networkx
from symm.models import CNNConfig, MLPConfig, ResidualCNNConfig, ResidualMLPConfig, spec_for

H, S = Permutation("h", 3), PositiveScaling("h.s", 3, parent="h")
OUT = [On("h"), On("h.s")]
IN = [On("h", "in"), On("h.s", "in")]


def mlp_params(w1_rows=OUT, w2_cols=IN) -> dict:
    """A 4 -> 3 -> 2 ReLU layer pair: w1 produces the hidden units, w2 consumes them."""
    return {"w1": param((3, 4), w1_rows), "b1": param((3,), OUT), "w2": param((2, 3), None, w2_cols), "b2": param((2,))}


def test_valid_base_spec():
    spec = Spec(Fragment.of([H, S], mlp_params()), name="base")
    assert spec.factor_order == ("h", "h.s") and spec.depth("h.s") == 1
    assert spec.dimension == 3


def _raises(build, *names: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        build()
    message = str(info.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return info.value


# ----- malformed specs ------------------------------------------------------------------------------------

CASES = {
    "unknown-factor": (
        lambda: Spec(Fragment.of([H, S], {**mlp_params(), "w3": param((2, 3), None, On("ghost", "in"))})),
        ["'w3'", "'ghost'", "unknown factor"],
    ),
    "segments-do-not-add-up": (
        lambda: Spec(Fragment.of([H, S], {**mlp_params(), "b2": param((2,), [Segment(1), Segment(2)])})),
        ["'b2'", "1+2", "2"],
    ),
    "factor-count-vs-segment": (
        lambda: Spec(Fragment.of([Permutation("h", 5), PositiveScaling("h.s", 5, parent="h")], mlp_params())),
        ["'w1'", "'h'", "5 units", "has 3"],
    ),
    "factor-count-vs-segment-with-repeat": (
        lambda: Spec(Fragment.of([H, S], mlp_params(w1_rows=[On("h", repeat=2), On("h.s")]))),
        ["'w1'", "'h'", "3 units x 2"],
    ),
    "only-produced": (
        lambda: Spec(Fragment.of([H, S], mlp_params(w2_cols=None))),
        ["'h'", "only produced", "w1[0]"],
    ),
    "only-consumed": (
        lambda: Spec(Fragment.of([H, S], {**mlp_params(w1_rows=[On("h", "in"), On("h.s", "in")]), "b1": param((3,), IN)})),
        ["'h'", "only consumed", "w1[0]"],
    ),
    "declared-unused": (
        lambda: Spec(Fragment.of([H, S, Permutation("spare", 2)], mlp_params())),
        ["'spare'", "declared but acts on no parameter"],
    ),
    "unrelated-factors-share-a-segment": (
        lambda: Spec(
            Fragment.of(
                [H, S, Permutation("other", 3)],
                {**mlp_params(), "w3": param((3, 2), [On("h"), On("other")]), "w4": param((2, 3), None, [On("h", "in"), On("other", "in")])},
            )
        ),
        ["'w3'", "'h'", "'other'", "neither is the other's parent"],
    ),
    "child-without-parent": (
        lambda: Spec(Fragment.of([H, S], {**mlp_params(), "b1": param((3,), On("h.s"))})),
        ["'b1'", "'h.s'", "without its parent 'h'"],
    ),
    "unknown-parent": (
        lambda: Spec(Fragment.of([H, PositiveScaling("h.s", 3, parent="nobody")], mlp_params())),
        ["'h.s'", "unknown parent", "'nobody'"],
    ),
    "parent-is-not-a-permutation": (
        lambda: Spec(Fragment.of([H, S, SignFlip("h.s.sign", 3, parent="h.s")], mlp_params())),
        ["'h.s.sign'", "'h.s'", "positive-scaling"],
    ),
    "parent-cannot-index-child": (
        lambda: Spec(Fragment.of([H, PositiveScaling("h.s", 4, parent="h")], {"w": param((4, 4), On("h.s"))})),
        ["'h.s'", "'h'", "cannot index"],
    ),
    "parent-cycle": (
        lambda: Spec(
            Fragment.of(
                [Permutation("a", 3, parent="b"), Permutation("b", 3, parent="a")],
                {"w": param((3, 3), [On("a"), On("b")], [On("a", "in"), On("b", "in")])},
            )
        ),
        ["cycle"],
    ),
    "factor-twice-on-a-segment": (
        lambda: Spec(Fragment.of([H, S], mlp_params(w1_rows=[On("h"), On("h.s"), On("h.s")]))),
        ["'w1'", "listed twice"],
    ),
    "batched-without-parent": (
        lambda: Spec(Fragment.of([Permutation("e", 2, batch=(3,))], {"w": param((3, 2), None, On("e", batch_axis=0))})),
        ["'e'", "batched but has no parent"],
    ),
    "batched-without-batch-axis": (
        lambda: Spec(
            Fragment.of(
                [Permutation("x", 2), Permutation("e", 3, parent="x", batch=(2,))],
                {"w": param((2, 3), On("x"), On("e")), "v": param((2, 3), On("x", "in"), On("e", "in", batch_axis=0))},
            )
        ),
        ["'w'", "'e'", "batch_axis"],
    ),
    "batch-axis-without-the-parent": (
        lambda: Spec(
            Fragment.of(
                [Permutation("x", 2), Permutation("e", 3, parent="x", batch=(2,))],
                {"w": param((2, 3), None, On("e", batch_axis=0)), "v": param((2, 3), On("x"), On("e", "in", batch_axis=0)),
                 "u": param((2,), On("x", "in"))},
            )
        ),
        ["'w'", "'e'", "does not carry its parent 'x'"],
    ),
    "batch-size-mismatch": (
        lambda: Spec(
            Fragment.of(
                [Permutation("x", 2), Permutation("e", 3, parent="x", batch=(2,))],
                {"w": param((4, 3), None, On("e", batch_axis=0))},
            )
        ),
        ["'w'", "'e'", "batch 2"],
    ),
    "batch-axis-on-unbatched-factor": (
        lambda: Spec(Fragment.of([H, S], mlp_params(w1_rows=[On("h", batch_axis=1), On("h.s")]))),
        ["'w1'", "'h'", "not batched"],
    ),
    "translation-through-on": (
        lambda: Spec(Fragment.of([Translation("t", 4)], {"w": param((3, 4), On("t", "in"))})),
        ["'w'", "'t'", "Shift"],
    ),
    "shift-names-a-non-translation": (
        lambda: Spec(Fragment.of([H, S], {**mlp_params(), "b2": param((2,), shifts=[Shift("h")])})),
        ["'b2'", "'h'", "not a translation"],
    ),
    "translation-shifts-two-parameters": (
        lambda: Spec(Fragment.of([Translation("t", 4)], {"w": param((3, 4), shifts=[Shift("t")]), "v": param((2, 4), shifts=[Shift("t")])})),
        ["'t'", "exactly one parameter"],
    ),
    "translation-row-size": (
        lambda: Spec(Fragment.of([Translation("t", 5)], {"w": param((3, 4), shifts=[Shift("t")])})),
        ["'w'", "'t'", "5 entries"],
    ),
    "shift-axis-carries-scaling": (
        lambda: Spec(Fragment.of([H, S, Translation("t", 4)], {**mlp_params(), "w1": param((3, 4), OUT, shifts=[Shift("t", 0)])})),
        ["'w1'", "non-permutation factor 'h.s'"],
    ),
    "factor-table-key": (
        lambda: Spec(Fragment({"x": Permutation("y", 3)}, {"w": param((3,), On("y"))})),
        ["'x'", "'y'"],
    ),
    "head-permutation-wrong-segment": (
        lambda: Spec(Fragment.of([HeadPermutation("heads", 4, groups=2, head_dim=2)], {"q": param((6, 3), On("heads"))})),
        ["'q'", "'heads'", "4 heads or 2 KV groups"],
    ),
    "empty-spec": (lambda: Spec(Fragment()), ["at least one parameter"]),
}


@pytest.mark.parametrize("build, names", list(CASES.values()), ids=list(CASES))
def test_malformed_spec_raises_naming_the_culprit(build, names):
    error = _raises(build, *names)
    assert isinstance(error, SymmError) and isinstance(error, ValueError)


@pytest.mark.parametrize(
    "build, names",
    [
        (lambda: On("h", side="both"), ["'h'", "side"]),
        (lambda: On("h", repeat=0), ["'h'", "repeat"]),
        (lambda: param((3,), On("h"), On("h")), ["2 axis entries", "(3,)"]),
        (lambda: param((3, 2), [On("h"), Segment(3)]), ["axis entry"]),
    ],
    ids=["bad-side", "zero-repeat", "too-many-axes", "mixed-axis-entry"],
)
def test_malformed_building_blocks(build, names):
    _raises(build, *names)


def test_fragment_sum_refuses_duplicate_parameters():
    a = Fragment.of([H, S], mlp_params())
    b = Fragment.of(params={"w2": param((2, 3)), "extra": param((1,))})
    _raises(lambda: a + b, "declared twice", "w2")
    _raises(lambda: merge([Fragment.of(params={"x": param((1,))}), Fragment.of(params={"y": param((1,))}), Fragment.of(params={"x": param((1,))})]), "x")


def test_fragment_sum_refuses_conflicting_factor_definitions_but_merges_identical_ones():
    a = Fragment.of([Permutation("stream", 4)], {"w": param((4,))})
    same = Fragment.of([Permutation("stream", 4)], {"v": param((4,))})
    assert set((a + same).factors) == {"stream"}
    _raises(lambda: a + Fragment.of([Permutation("stream", 5)], {"u": param((5,))}), "'stream'")
    _raises(lambda: Fragment.of([Permutation("p", 2), Permutation("p", 3)]), "'p'")


def test_fragment_sum_keeps_notes_once():
    a = Fragment.of(params={"w": param((1,))}, notes=["n1"])
    b = Fragment.of(params={"v": param((1,))}, notes=["n1", "n2"])
    assert (a + b).notes == ("n1", "n2")


# ----- parameters that do not match the spec -----------------------------------------------------------------


@pytest.fixture
def relu_spec_and_params():
    spec = spec_for(MLPConfig((6, 5, 3), "relu"))
    params = {k: torch.randn(ps.shape, dtype=torch.float64) for k, ps in spec.params.items()}
    return spec, params


@pytest.mark.parametrize(
    "edit, names",
    [
        (lambda p: p.pop("layers.1.bias"), ["missing keys", "layers.1.bias"]),
        (lambda p: p.__setitem__("layers.9.weight", torch.zeros(2)), ["unexpected keys", "layers.9.weight"]),
        (lambda p: p.__setitem__("layers.0.weight", torch.zeros(5, 7)), ["layers.0.weight", "(5, 7)", "(5, 6)"]),
    ],
    ids=["missing-key", "extra-key", "wrong-shape"],
)
def test_params_not_matching_the_spec(relu_spec_and_params, edit, names):
    spec, params = relu_spec_and_params
    spec.check_params(params)
    act(spec, params, GroupElement.sample(spec, 0))
    edit(params)
    error = _raises(lambda: spec.check_params(params), *names)
    assert spec.name in str(error)
    _raises(lambda: act(spec, params, GroupElement.sample(spec, 0)), *names)


def test_act_refuses_integer_weights_with_factors(relu_spec_and_params):
    spec, params = relu_spec_and_params
    params["layers.0.weight"] = params["layers.0.weight"].long()
    _raises(lambda: act(spec, params, GroupElement.sample(spec, 0)), "floating-point")


def test_act_refuses_element_of_another_spec(relu_spec_and_params):
    spec, params = relu_spec_and_params
    other = spec_for(MLPConfig((6, 5, 3), "tanh"))
    _raises(lambda: act(spec, params, GroupElement.sample(other, 0)), "different spec")


# ----- graph, coupled factors, describe -----------------------------------------------------------------------


def test_graph_has_factor_and_param_nodes_and_typed_edges():
    spec = spec_for(MLPConfig((64, 32, 16, 10), "relu"))
    g = to_networkx(spec)
    assert isinstance(g, nx.MultiGraph)
    factor_nodes = {n for kind, n in g.nodes if kind == "factor"}
    param_nodes = {n for kind, n in g.nodes if kind == "param"}
    assert factor_nodes == set(spec.factors) and param_nodes == set(spec.params)
    assert g.nodes["factor", "layers.0.units.scale"]["kind"] == "positive-scaling"
    assert g.nodes["factor", "layers.0.units.scale"]["dimension"] == 32
    assert g.nodes["param", "layers.1.weight"]["shape"] == (16, 32)
    sides = {(u[1], v[1], d["side"]) for u, v, d in g.edges(data=True) if "side" in d}
    assert ("layers.0.units", "layers.0.weight", "out") in {(a, b, s) for a, b, s in sides} | {(b, a, s) for a, b, s in sides}
    consumed = {frozenset((u[1], v[1])) for u, v, d in g.edges(data=True) if d.get("side") == "in"}
    assert frozenset(("layers.0.units", "layers.1.weight")) in consumed
    assert frozenset(("layers.0.units", "layers.0.weight")) not in consumed
    parent_edges = {frozenset((u[1], v[1])) for u, v, d in g.edges(data=True) if d.get("relation") == "parent"}
    assert parent_edges == {frozenset(("layers.0.units", "layers.0.units.scale")), frozenset(("layers.1.units", "layers.1.units.scale"))}
    n_uses = sum(len(seg.acts) for ps in spec.params.values() for _, _, seg in ps.segments())
    assert g.number_of_edges() == n_uses + len(parent_edges)


def test_graph_marks_shift_edges():
    frag = Fragment.of([Translation("t", 4)], {"w": param((3, 4), shifts=[Shift("t")])})
    g = to_networkx(Spec(frag))
    ((_, _, data),) = g.edges(data=True)
    assert data["side"] == "shift"


def test_coupled_factors_residual_stream_couples_every_block():
    spec = spec_for(ResidualMLPConfig(n_blocks=2, norm=True))
    components = coupled_factors(spec)
    # the stream is read by every block's fc1, whose rows carry that block's hidden units: one component
    assert components == [set(spec.factors)]
    assert {"stream", "blocks.0.fc1.units", "blocks.0.fc1.units.scale", "blocks.1.fc1.units"} <= components[0]


def test_coupled_factors_separates_independent_networks():
    a = mlp_fragment(["a.0", "a.1"], [4, 5, 2], "relu")
    b = mlp_fragment(["b.0", "b.1", "b.2"], [4, 3, 3, 2], "tanh")
    spec = Spec(a + b, name="two-nets")
    components = coupled_factors(spec)
    assert components == [{"a.0.units", "a.0.units.scale"}, {"b.0.units", "b.0.units.sign", "b.1.units", "b.1.units.sign"}]
    # within the tanh chain, layers 0 and 1 are coupled through b.1.weight; the output biases touch no factor
    g = to_networkx(spec)
    assert set(nx.isolates(g)) == {("param", "a.1.bias"), ("param", "b.2.bias")}
    assert nx.number_connected_components(g) == 2 + 2


@pytest.mark.parametrize(
    "config",
    [MLPConfig((64, 32, 16, 10), "swiglu"), CNNConfig(norm="group"), ResidualMLPConfig(), ResidualCNNConfig()],
    ids=["swiglu-mlp", "group-cnn", "residual-mlp", "residual-cnn"],
)
def test_describe_mentions_every_factor_and_parameter(config):
    spec = spec_for(config)
    text = describe(spec)
    for name, f in spec.factors.items():
        assert re.search(rf"^\s*{re.escape(name)}: ", text, re.M), f"factor {name} missing from describe()"
        assert f.kind in text
    for name in spec.params:
        assert f"  {name} " in text
    assert f"continuous dimension: {spec.dimension}" in text
    assert spec.name in text


def test_describe_lists_notes_and_batched_factors():
    e = Permutation("experts", 2)
    u = Permutation("eu", 3, parent="experts", batch=(2,))
    frag = Fragment.of(
        [e, u],
        {"w1": param((2, 3, 4), On("experts"), On("eu", batch_axis=0)), "w2": param((2, 4, 3), On("experts", "in"), None, On("eu", "in", batch_axis=0))},
        notes=["experts are routed"],
    )
    text = describe(Spec(frag, name="moe"))
    assert "experts are routed" in text
    assert "permutation(2 x 3), indexed by experts" in text


def test_spec_equality_and_repr():
    a, b = spec_for(MLPConfig((4, 3, 2), "relu")), spec_for(MLPConfig((4, 3, 2), "relu"))
    assert a == b and hash(a) == hash(b)
    assert a != spec_for(MLPConfig((4, 3, 2), "tanh"))
    assert "2 factors" in repr(a) and "4 parameters" in repr(a)
    with pytest.raises(TypeError):
        a.params["x"] = param((1,))  # read-only views


def test_spec_queries():
    spec = spec_for(MLPConfig((4, 3, 2), "relu"))
    uses = spec.uses("layers.0.units.scale")
    assert {(p, axis, on.side) for p, axis, _, on in uses} == {
        ("layers.0.weight", 0, "out"), ("layers.0.bias", 0, "out"), ("layers.1.weight", 1, "in")}
    assert spec.factors_of_kind(PositiveScaling) == ["layers.0.units.scale"]
    assert spec.continuous_factors == ["layers.0.units.scale"]
    assert spec.permutation_factors == ["layers.0.units"]
    assert spec.factors_of_kind(GeneralLinear) == []


# ---- Spec is data plus validation: the operations live in action / element / graph ----------------------------

_CORE = ("spec", "action", "element", "graph", "validate")


def _symm_imports(module: str, *, runtime_only: bool) -> set[str]:
    """symm modules imported anywhere in ``symm/<module>.py`` (function bodies included); ``runtime_only`` skips
    ``if TYPE_CHECKING:`` blocks."""
    import ast
    from pathlib import Path

    import symm

    tree = ast.parse((Path(symm.__file__).parent / f"{module}.py").read_text())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if runtime_only and isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                if child.module:
                    names = [f"symm.{child.module}" if child.level else child.module]
                else:  # from . import x
                    names = [f"symm.{a.name}" for a in child.names]
                found.update(n.removeprefix("symm.").split(".")[0] for n in names if n.startswith("symm."))
            elif isinstance(child, ast.Import):
                found.update(a.name.split(".")[1] for a in child.names if a.name.startswith("symm."))
            visit(child)

    visit(tree)
    return found


def test_spec_module_imports_no_operations():
    assert _symm_imports("spec", runtime_only=False).isdisjoint({"action", "element", "graph"})
    for name in ("act", "identity", "sample", "graph", "describe"):
        assert not hasattr(Spec, name), name


def test_core_modules_have_no_runtime_import_cycle():
    deps = {m: _symm_imports(m, runtime_only=True) & set(_CORE) for m in _CORE}
    done: list[str] = []
    while len(done) < len(_CORE):  # topological peel: a cycle leaves modules that never become ready
        ready = [m for m in _CORE if m not in done and deps[m] <= set(done)]
        assert ready, f"import cycle among {sorted(set(_CORE) - set(done))}: {deps}"
        done += ready
