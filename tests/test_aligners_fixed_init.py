"""``weight_matching(..., fixed=..., init=...)`` for every factor kind of the catalogue.

``fixed={factor: value}``: the returned element holds exactly that value for that factor and every other
factor is still solved. Planted problems make this checkable: the answer h* is a random element whose fixed
factor is set to the fixed value, B = h*^{-1} . A, and the result must be h* (permutations exactly, everything
within ||h.B - A|| / ||A|| <= 1e-6). Fixing a parent (a head or expert permutation) still solves its children;
fixing a child (a Q/K GL block, a sign) keeps it while its parent is solved.

``init={factor: value}``: a warm start, not a constraint. Started at the answer, weight matching returns the
answer after one or two sweeps; started anywhere else, it still recovers the planted element.

Factors are picked generically (by ``kind``, batching, parent kind and role), so a new factor kind in the
catalogue shows up here; ``test_every_factor_kind_is_exercised`` fails if a kind has no case.
"""

from __future__ import annotations

import pytest
import torch

from aligners import MatchInfo, weight_matching
from planted import plant, recovery_problems, reference_params, rel_distance, value_mismatch
from symm.action import act
from symm.element import GroupElement
from symm.errors import SymmError
from symm.factors import Factor
from symm.models import CNNConfig, MLPConfig, TransformerConfig, spec_for

RAISES = (SymmError, ValueError)  # SpecError is both
PLANT_SEEDS = (0, 1)


def _lm(**kw) -> TransformerConfig:
    base = dict(vocab_size=20, d_model=16, n_layers=1, n_heads=2, max_len=8, d_ff=12, n_experts=4, d_shared=8)
    return TransformerConfig(**{**base, **kw})


#: small models that together hold every factor kind of the catalogue (batched expert children included)
SHOWCASE = {
    "mlp-relu": MLPConfig((12, 10, 10, 4), "relu"),
    "mlp-tanh": MLPConfig((12, 10, 10, 4), "tanh"),
    "cnn-relu-group": CNNConfig(widths=(4, 6), n_classes=4, image_size=4, activation="relu", norm="group"),
    "lm-rope-gqa": _lm(pe="rope", n_heads=4, n_kv_heads=2, ffn="swiglu"),
    "lm-nope": _lm(pe="none", ffn="gelu"),
    "lm-moe": _lm(pe="rope", ffn="moe", gating="topk", router_bias=True, shared_expert=True),
    "lm-qknorm": _lm(pe="rope", n_heads=4, n_kv_heads=2, ffn="gelu", qk_norm=True),  # one-sided norm scales
}
SPECS = {name: spec_for(config) for name, config in SHOWCASE.items()}


def _role(spec, name: str) -> tuple:
    f = spec.factors[name]
    parent_kind = spec.factors[f.parent].kind if f.parent else None
    return (f.kind, bool(f.batch), parent_kind, name.rsplit(".", 1)[-1])


def _representatives() -> dict[str, tuple[str, str]]:
    """One factor per (kind, batched, parent kind, role) over the showcase specs: id -> (spec, factor)."""
    out: dict[str, tuple[str, str]] = {}
    seen: set = set()
    for spec_name, spec in SPECS.items():
        for name in spec.factor_order:
            role = _role(spec, name)
            if role in seen:
                continue
            seen.add(role)
            f = spec.factors[name]
            label = f.kind + ("-batched" if f.batch else "") + (f"-child-of-{role[2]}" if f.parent else "")
            out[f"{label}-{spec_name}:{name}"] = (spec_name, name)
    return out


REPS = _representatives()


def _all_kinds() -> set[str]:
    kinds, todo = set(), [Factor]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.startswith("symm.") and cls.__dict__.get("kind") not in (None, "factor"):  # not tests' own kinds
            kinds.add(cls.kind)
    return kinds


def test_every_factor_kind_is_exercised():
    covered = {SPECS[s].factors[n].kind for s, n in REPS.values()}
    missing = _all_kinds() - covered
    assert not missing, f"factor kinds with no fixed/init case: {sorted(missing)} (add a showcase model holding them)"
    assert any(SPECS[s].factors[n].batch for s, n in REPS.values()), "no batched (expert) factor exercised"
    assert any(SPECS[s].factors[n].is_continuous and SPECS[s].factors[n].batch for s, n in REPS.values())


# ----- helpers ---------------------------------------------------------------------------------------------


def _value(spec, name: str, which: str, seed: int) -> torch.Tensor:
    f = spec.factors[name]
    if which == "identity":
        return f.identity()
    gen = torch.Generator().manual_seed(7_000 + seed)
    for _ in range(20):  # a random value that is not the identity (tiny permutations can sample it)
        v = f.sample(gen)
        if not f.is_identity(v):
            return v
    raise AssertionError(f"cannot sample a non-identity value of {name}")


def _problem(spec_name: str, seed: int, fixed_name: str | None = None, fixed_value: torch.Tensor | None = None):
    """(spec, A, h*, B) with h* random except h*[fixed_name] = fixed_value."""
    spec = SPECS[spec_name]
    params = reference_params(SHOWCASE[spec_name], seed)
    h_star = GroupElement.sample(spec, 3_000 + seed)
    if fixed_name is not None:
        h_star = h_star.replace(**{fixed_name: fixed_value})
    return spec, params, h_star, plant(spec, params, h_star)


def _descendants(spec, name: str) -> list[str]:
    out = []
    for n in spec.factor_order:
        p = spec.factors[n].parent
        while p is not None:
            if p == name:
                out.append(n)
                break
            p = spec.factors[p].parent
    return out


def _solve(spec, params, planted, **kw):
    info = MatchInfo()
    h = weight_matching(spec, params, planted, seed=0, progress=False, info=info, **kw)
    return h, info


# ----- fixed= ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["identity", "random"])
@pytest.mark.parametrize("rep", list(REPS), ids=list(REPS))
def test_fixed_value_kept_and_rest_solved(rep, which):
    spec_name, name = REPS[rep]
    failures = []
    for seed in PLANT_SEEDS:
        spec = SPECS[spec_name]
        value = _value(spec, name, which, seed)
        spec, params, h_star, planted = _problem(spec_name, seed, name, value)
        given = value.clone()
        h, info = _solve(spec, params, planted, fixed={name: value})
        assert torch.equal(value, given), "weight_matching modified the fixed tensor it was given"
        bad = value_mismatch(spec, name, h.values[name], value, atol=1e-12)
        if bad:
            failures.append(f"seed {seed}: fixed value not kept: {bad}")
        for p in recovery_problems(spec, params, planted, h, h_star):
            failures.append(f"seed {seed}: rest not solved: {p}")
    assert not failures, f"fixed {name} = {which}:\n" + "\n".join(failures)


PARENTS = {k: v for k, v in REPS.items() if _descendants(SPECS[v[0]], v[1])}
CHILDREN = {k: v for k, v in REPS.items() if SPECS[v[0]].factors[v[1]].parent is not None}


@pytest.mark.parametrize("rep", list(PARENTS), ids=list(PARENTS))
def test_fixed_parent_still_solves_children(rep):
    """Fixing a head / expert / unit permutation must not switch off the factors indexed by it."""
    spec_name, name = REPS[rep]
    spec = SPECS[spec_name]
    value = _value(spec, name, "random", 0)
    spec, params, h_star, planted = _problem(spec_name, 0, name, value)
    h, _ = _solve(spec, params, planted, fixed={name: value})
    assert value_mismatch(spec, name, h.values[name], value) is None
    problems = []
    for child in _descendants(spec, name):
        f = spec.factors[child]
        if f.is_identity(h.values[child]) and not f.is_identity(h_star.values[child]):
            problems.append(f"{child} ({f.kind}) left at the identity")
        bad = value_mismatch(spec, child, h.values[child], h_star.values[child], atol=1e-7)
        if bad:
            problems.append(bad)
    dist = rel_distance(act(spec, planted, h), params)
    assert not problems and dist <= 1e-6, f"children of fixed {name} not solved (distance {dist:.2e}): " + "; ".join(problems)


@pytest.mark.parametrize("rep", list(CHILDREN), ids=list(CHILDREN))
def test_fixed_child_kept_while_parent_solved(rep):
    """A fixed child (Q/K GL block, RoPE pair scaling, sign, scale, expert units) stays; its parent is matched."""
    spec_name, name = REPS[rep]
    spec = SPECS[spec_name]
    parent = spec.factors[name].parent
    for seed in range(1, 30):  # a planted element whose parent really moves (tiny groups can sample the identity)
        value = _value(spec, name, "random", seed)
        spec, params, h_star, planted = _problem(spec_name, seed, name, value)
        if not spec.factors[parent].is_identity(h_star.values[parent]):
            break
    else:
        raise AssertionError(f"test set-up: parent {parent} never moves")
    h, _ = _solve(spec, params, planted, fixed={name: value})
    assert value_mismatch(spec, name, h.values[name], value) is None, f"fixed child {name} was re-solved"
    assert torch.equal(h.values[parent], h_star.values[parent]), f"parent {parent} of fixed {name} not solved"
    assert rel_distance(act(spec, planted, h), params) <= 1e-6


def test_fixed_everything_returns_it():
    """Every factor fixed: nothing left to solve, the given element comes back unchanged."""
    spec, params, h_star, planted = _problem("lm-moe", 0)
    g = GroupElement.sample(SPECS["lm-moe"], 99)
    h, _ = _solve(spec, params, planted, fixed=dict(g.values))
    for name in spec.factors:
        assert value_mismatch(spec, name, h.values[name], g.values[name]) is None


@pytest.mark.parametrize("which", ["identity", "random"])
@pytest.mark.parametrize("rep", list(REPS), ids=list(REPS))
def test_fixed_value_kept_when_not_the_answer(rep, which):
    """fixed is a constraint, not a hint: kept even when the best element has another value there
    (e.g. a scaling or sign switched off with the identity while B differs from A by a random one)."""
    spec_name, name = REPS[rep]
    spec = SPECS[spec_name]
    value = _value(spec, name, which, 11)
    spec, params, h_star, planted = _problem(spec_name, 0)  # h*[name] is random, independent of value
    assert value_mismatch(spec, name, h_star.values[name], value) is not None, "test set-up: value is the answer"
    h, _ = _solve(spec, params, planted, fixed={name: value})
    bad = value_mismatch(spec, name, h.values[name], value, atol=1e-12)
    assert bad is None, f"fixed {name} = {which} not kept: {bad}"


def test_fixed_scaling_identity_on_relu_mlp_is_not_rebalanced():
    """The reviewer's case: a ReLU scaling fixed to the identity comes back as ones (not rebalanced)."""
    spec = SPECS["mlp-relu"]
    name = next(n for n in spec.factor_order if spec.factors[n].kind == "positive-scaling")
    spec, params, h_star, planted = _problem("mlp-relu", 0)
    h, _ = _solve(spec, params, planted, fixed={name: spec.factors[name].identity()})
    ones = torch.ones_like(h.values[name])
    assert torch.allclose(h.values[name], ones, rtol=0, atol=1e-12), f"{name}: {h.values[name]}"


def test_fixed_sign_not_overwritten():
    """The reviewer's case: a tanh sign child fixed to all -1 stays all -1 while its permutation is matched
    (B differs from A by random signs, so the matching step would like to choose other signs)."""
    spec = SPECS["mlp-tanh"]
    name = next(n for n in spec.factor_order if spec.factors[n].kind == "sign-flip")
    value = -torch.ones(spec.factors[name].element_shape, dtype=torch.float64)
    spec, params, h_star, planted = _problem("mlp-tanh", 0)
    h, _ = _solve(spec, params, planted, fixed={name: value})
    assert torch.equal(h.values[name], value), f"{name}: {h.values[name].tolist()}"
    # consistent case: the answer's signs are all -1: everything else is recovered
    spec, params, h_star, planted = _problem("mlp-tanh", 0, name, value)
    h, _ = _solve(spec, params, planted, fixed={name: value})
    assert torch.equal(h.values[name], value)
    assert not recovery_problems(spec, params, planted, h, h_star)


@pytest.mark.parametrize(
    "spec_name, bad",
    [
        ("mlp-relu", "unknown"),
        ("mlp-relu", "negative-scaling"),
        ("mlp-relu", "not-a-permutation"),
        ("mlp-relu", "wrong-shape"),
        ("lm-rope-gqa", "head-out-of-kv-group"),
    ],
)
def test_fixed_invalid_raises(spec_name, bad):
    spec = SPECS[spec_name]
    params = reference_params(SHOWCASE[spec_name], 0)
    perm = next(n for n in spec.factor_order if spec.factors[n].kind == "permutation")
    fixed = {
        "unknown": {"no.such.factor": torch.zeros(3)},
        "negative-scaling": {n: -spec.factors[n].identity() for n in spec.factor_order if spec.factors[n].kind == "positive-scaling"},
        "not-a-permutation": {perm: torch.zeros(spec.factors[perm].element_shape, dtype=torch.long)},
        "wrong-shape": {perm: torch.arange(spec.factors[perm].count + 1)},
    }.get(bad)
    if bad == "head-out-of-kv-group":
        heads = next(n for n in spec.factor_order if spec.factors[n].kind == "head-permutation")
        fixed = {heads: torch.tensor([0, 2, 1, 3])}  # 4 heads in 2 KV groups: heads 1 and 2 swap groups
    with pytest.raises(RAISES):
        weight_matching(spec, params, params, fixed=fixed, progress=False)


# ----- init= -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_init_at_the_answer_returns_it(spec_name):
    spec, params, h_star, planted = _problem(spec_name, 0)
    h, info = _solve(spec, params, planted, init=dict(h_star.values))
    _, cold = _solve(spec, params, planted)
    assert 1 <= info.sweeps <= 2, f"{info.sweeps} sweeps from the exact answer"
    # the warm start must show: fewer sweeps than from the identity (tiny planted problems take 2 from cold)
    assert info.sweeps == 1 or info.sweeps < cold.sweeps, f"init at the answer: {info.sweeps} sweeps, cold start {cold.sweeps}"
    problems = recovery_problems(spec, params, planted, h, h_star)
    problems += [b for n in spec.factors if (b := value_mismatch(spec, n, h.values[n], h_star.values[n], atol=1e-7))]
    assert not problems, "; ".join(problems)


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_init_random_still_recovers(spec_name):
    failures = []
    for seed in PLANT_SEEDS:
        spec, params, h_star, planted = _problem(spec_name, seed)
        start = GroupElement.sample(spec, 5_000 + seed)
        h, _ = _solve(spec, params, planted, init=dict(start.values))
        failures += [f"seed {seed}: {p}" for p in recovery_problems(spec, params, planted, h, h_star)]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_init_partial_permutations_only(spec_name):
    """init may name only some factors (here the permutations, at the answer); the rest start at the identity."""
    spec, params, h_star, planted = _problem(spec_name, 0)
    init = {n: h_star.values[n] for n in spec.permutation_factors}
    h, info = _solve(spec, params, planted, init=init)
    assert not recovery_problems(spec, params, planted, h, h_star)
    assert info.sweeps <= 2


def test_init_accepts_a_group_element():
    """init may also be a whole GroupElement (same meaning as its values dict)."""
    spec, params, h_star, planted = _problem("lm-rope-gqa", 0)
    h, info = _solve(spec, params, planted, init=h_star)
    assert info.sweeps <= 2
    assert not recovery_problems(spec, params, planted, h, h_star)


def test_init_is_not_mutated_and_not_a_constraint():
    """A wrong init value for one factor is corrected (init is a start, not fixed) and the dict is left alone."""
    spec, params, h_star, planted = _problem("mlp-tanh", 0)
    wrong = GroupElement.sample(spec, 77)
    init = {n: v.clone() for n, v in wrong.values.items()}
    h, _ = _solve(spec, params, planted, init=init)
    for n, v in wrong.values.items():
        assert torch.equal(init[n], v), f"init[{n}] was modified"
    assert not recovery_problems(spec, params, planted, h, h_star)


@pytest.mark.parametrize("rep", [k for k in REPS if REPS[k][0] in ("mlp-tanh", "lm-rope-gqa", "lm-moe")])
def test_init_and_fixed_together(rep):
    spec_name, name = REPS[rep]
    spec = SPECS[spec_name]
    value = _value(spec, name, "random", 0)
    spec, params, h_star, planted = _problem(spec_name, 0, name, value)
    start = GroupElement.sample(spec, 6_000)
    init = {n: v for n, v in start.values.items() if n != name}
    h, _ = _solve(spec, params, planted, fixed={name: value}, init=init)
    assert value_mismatch(spec, name, h.values[name], value) is None, f"fixed {name} not kept with init"
    problems = recovery_problems(spec, params, planted, h, h_star)
    assert not problems, "; ".join(problems)


def test_init_unknown_factor_raises():
    spec, params = SPECS["mlp-relu"], reference_params(SHOWCASE["mlp-relu"], 0)
    with pytest.raises(RAISES):
        weight_matching(spec, params, params, init={"no.such.factor": torch.zeros(3)}, progress=False)


def test_init_invalid_value_raises():
    spec, params = SPECS["mlp-relu"], reference_params(SHOWCASE["mlp-relu"], 0)
    perm = spec.permutation_factors[0]
    with pytest.raises(RAISES):
        weight_matching(spec, params, params, init={perm: torch.zeros(spec.factors[perm].count, dtype=torch.long)}, progress=False)


def test_factor_in_both_fixed_and_init_raises():
    spec, params = SPECS["mlp-relu"], reference_params(SHOWCASE["mlp-relu"], 0)
    perm = spec.permutation_factors[0]
    ident = spec.factors[perm].identity()
    with pytest.raises(RAISES):
        weight_matching(spec, params, params, fixed={perm: ident}, init={perm: ident}, progress=False)
