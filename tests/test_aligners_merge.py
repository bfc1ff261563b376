"""MergeMany: N copies of one model, each moved by a random group element, merge back exactly; bad input refused."""

from __future__ import annotations

import pytest
import torch

from aligners.merge import merge_many, normalise_weights, weighted_average
from hf_models import build, params_of
from planted import reference_params, rel_distance
from symm.action import act
from symm.adapters import spec_from_hf
from symm.element import GroupElement
from symm.errors import CheckpointError, SpecError, UsageError
from symm.models import CNNConfig, MLPConfig, ResidualMLPConfig, TransformerConfig, spec_for

ENTRIES = {
    "mlp-relu": MLPConfig((64, 32, 32, 10), "relu"),
    "mlp-tanh": MLPConfig((64, 32, 32, 10), "tanh"),
    "cnn-bn": CNNConfig(norm="batch"),
    "resmlp": ResidualMLPConfig(),
    "lm-rope-gqa": TransformerConfig(pe="rope", n_kv_heads=2, norm="rms", tied=True),
    "moe-dense-bias": TransformerConfig(ffn="moe", gating="dense", router_bias=True),
}


def _copies(spec, params, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` copies ``g_i . params``, each ``g_i`` random (permutations, scalings, GL, translations: all factors)."""
    return [act(spec, params, GroupElement.sample(spec, seed + i)) for i in range(n)]


def _check_exact(spec, models, result) -> None:
    assert result.info.converged
    assert result.elements[0].is_identity()
    assert rel_distance(result.merged, models[0]) <= 1e-6  # the merge is model 0 itself
    for m, g, a in zip(models, result.elements, result.aligned):
        assert rel_distance(a, models[0]) <= 1e-6
        assert rel_distance(act(spec, m, g), a) <= 1e-12
    assert rel_distance(weighted_average(models, result.weights), models[0]) > 1e-3  # the naive average is not


@pytest.mark.parametrize("name", list(ENTRIES))
def test_planted_copies_merge_back_exactly(name):
    spec = spec_for(ENTRIES[name])
    params = reference_params(ENTRIES[name], 0)
    models = _copies(spec, params, 3, seed=20)
    _check_exact(spec, models, merge_many(spec, models, progress=False))


def test_planted_five_models_weighted_and_from_identity():
    config = ENTRIES["mlp-relu"]
    spec = spec_for(config)
    models = _copies(spec, reference_params(config, 1), 5, seed=40)
    result = merge_many(spec, models, weights=[1, 2, 3, 4, 5], progress=False)
    assert result.weights == pytest.approx((1 / 15, 2 / 15, 3 / 15, 4 / 15, 5 / 15))
    _check_exact(spec, models, result)
    _check_exact(spec, models[:3], merge_many(spec, models[:3], init="identity", progress=False))


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mixtral"])
def test_planted_hf(name):
    model = build(name)
    spec = spec_from_hf(model)
    params = {k: v.double() for k, v in params_of(model).items()}
    models = _copies(spec, params, 3, seed=60)
    _check_exact(spec, models, merge_many(spec, models, progress=False))


def test_bad_input_is_refused_before_any_work():
    config = ENTRIES["mlp-relu"]
    spec = spec_for(config)
    a, b = reference_params(config, 0), reference_params(config, 1)
    with pytest.raises(UsageError, match="at least 2"):
        merge_many(spec, [a], progress=False)
    nan = {k: v.clone() for k, v in b.items()}
    nan["layers.1.weight"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="model 2.*layers.1.weight"):
        merge_many(spec, [a, b, nan], progress=False)
    other = reference_params(MLPConfig((64, 16, 32, 10), "relu"), 0)
    with pytest.raises(SpecError):
        merge_many(spec, [a, other], progress=False)
    with pytest.raises(UsageError, match="2 merge weights for 3"):
        merge_many(spec, [a, b, b], weights=[1, 2], progress=False)
    with pytest.raises(UsageError, match="positive"):
        normalise_weights([1, 0], 2)
    with pytest.raises(UsageError, match="init"):
        merge_many(spec, [a, b], init="random", progress=False)


# ----- the singular-vector view ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mlp-relu", "cnn-bn", "lm-rope-gqa", "moe-dense-bias"])
def test_found_permutations_keep_every_singular_value(name):
    from aligners import weight_matching
    from aligners.analysis import permutation_part, singular_report, singular_values

    config = ENTRIES[name]
    spec = spec_for(config)
    a, b = reference_params(config, 0), reference_params(config, 1)
    g = weight_matching(spec, a, b, progress=False)
    p = permutation_part(spec, g)
    assert not p.is_identity()
    moved = act(spec, b, p)
    before, after = singular_values(b, spec), singular_values(moved, spec)
    assert before
    if name == "moe-dense-bias":
        assert "blocks.0.ffn.w1[0]" in before  # one matrix per expert
    for k in {n.split("[")[0] for n in before}:  # stacked experts: the expert permutation reorders whole matrices
        sv_b = torch.sort(torch.cat([v for n, v in before.items() if n.split("[")[0] == k])).values
        sv_m = torch.sort(torch.cat([v for n, v in after.items() if n.split("[")[0] == k])).values
        assert float((sv_m - sv_b).abs().max()) <= 1e-6 * float(sv_b.max()), k
    # negative control: a scaling (not a permutation) changes singular values of the MLP's hidden layer
    if name == "mlp-relu":
        scaled = act(spec, b, GroupElement.sample(spec, 3))
        sv = singular_values(scaled, spec)["layers.1.weight"]
        assert float((sv - before["layers.1.weight"]).abs().max()) > 1e-3 * float(sv.max())
    # planted: B = a permuted copy of A; aligned, every top singular vector agrees (naive pairing: not all)
    planted = act(spec, a, permutation_part(spec, GroupElement.sample(spec, 5)))
    found = act(spec, planted, permutation_part(spec, weight_matching(spec, a, planted, progress=False)))
    naive, aligned = singular_report(a, planted, k=4, spec=spec), singular_report(a, found, k=4, spec=spec)
    assert set(naive) == set(before)
    assert all(r.overlap_u == pytest.approx(1.0, abs=1e-9) and r.overlap_v == pytest.approx(1.0, abs=1e-9) for r in aligned.values())
    assert min(min(r.overlap_u, r.overlap_v) for r in naive.values()) < 0.99


def test_singular_alignment_of_a_matrix_with_itself_and_plot(tmp_path):
    from aligners.analysis import plot_singular, singular_alignment, singular_report

    m = torch.randn(12, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = singular_alignment("w", m, m, k=5)
    assert r.overlap_u == pytest.approx(1.0) and r.overlap_v == pytest.approx(1.0)
    assert min(r.cos_u) == pytest.approx(1.0) and len(r.cos_u) == 5
    config = ENTRIES["mlp-relu"]
    a, b = reference_params(config, 0), reference_params(config, 1)
    for side in ("auto", "u", "v"):
        plot_singular({"naive": singular_report(a, b), "self": singular_report(a, a)}, tmp_path / f"sv-{side}.png", side=side)
        assert (tmp_path / f"sv-{side}.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="side"):
        plot_singular({"naive": singular_report(a, b)}, tmp_path / "x.png", side="w")
