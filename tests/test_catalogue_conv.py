"""CNN catalogue entries (conv -> none/BatchNorm/GroupNorm -> relu/tanh -> avg pool -> linear head)."""

from __future__ import annotations

import pytest
import torch

from symm import GroupElement, GroupedPermutation, Permutation, PositiveScaling, SignFlip, testing
from symm.action import act
from symm.models import CNNConfig, spec_for
from symm.models.cnn import cnn_spec

NORMS = ["none", "batch", "group"]
ACTIVATIONS = ["relu", "tanh"]


def _config(norm: str, activation: str, **kw) -> CNNConfig:
    return CNNConfig(in_channels=1, widths=(8, 16), image_size=8, activation=activation, norm=norm, groups=2, **kw)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", NORMS)
def test_cnn_group_preserves_function(make_case, check_preserved, norm, activation, dtype):
    case = make_case(_config(norm, activation), dtype)
    if norm == "batch":  # the norms really are non-trivial in eval mode
        assert not torch.allclose(case.params["norms.0.running_var"], torch.ones(8, dtype=dtype))
        assert not case.model.training
    check_preserved(case)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm", NORMS)
def test_cnn_group_axioms(make_case, check_axioms, norm, activation, dtype):
    case = make_case(_config(norm, activation), dtype)
    check_axioms(case.spec, case.params, dtype)


@pytest.mark.parametrize("norm", NORMS)
def test_cnn_three_blocks_and_gelu(make_case, check_preserved, norm):
    config = CNNConfig(widths=(4, 8, 8), image_size=8, activation="gelu", norm=norm, groups=4)
    case = make_case(config, torch.float64)
    assert case.spec.dimension == 0
    check_preserved(case, n=5)


@pytest.mark.parametrize(
    "norm, activation, dimension",
    [("none", "relu", 24), ("batch", "relu", 24), ("group", "relu", 24), ("batch", "tanh", 0), ("group", "tanh", 0)],
)
def test_cnn_group_dimension_and_kinds(norm, activation, dimension):
    spec = spec_for(_config(norm, activation))
    assert spec.dimension == dimension
    for name in ("convs.0.channels", "convs.1.channels"):
        if norm == "group":  # GroupNorm: channel permutations must map norm groups to norm groups
            assert isinstance(spec.factors[name], GroupedPermutation) and spec.factors[name].groups == 2
        else:
            assert type(spec.factors[name]) is Permutation
    child = PositiveScaling if activation == "relu" else SignFlip
    assert spec.factors_of_kind(child) == ["convs.0.channels." + ("scale" if activation == "relu" else "sign"),
                                           "convs.1.channels." + ("scale" if activation == "relu" else "sign")]


def test_batchnorm_running_stats_are_permuted_not_scaled():
    spec = cnn_spec(_config("batch", "relu"))
    on = lambda p: [o.factor for seg in spec.params[p].axes[0] for o in seg.acts]  # noqa: E731
    assert on("norms.0.running_mean") == ["convs.0.channels"]
    assert on("norms.0.running_var") == ["convs.0.channels"]
    assert on("norms.0.weight") == ["convs.0.channels", "convs.0.channels.scale"]
    assert on("convs.0.weight") == ["convs.0.channels"]  # the conv before a norm is not rescaled
    assert spec.params["norms.0.num_batches_tracked"].shape == ()


# ----- negative controls ------------------------------------------------------------------------------


def test_batchnorm_stats_left_behind_break_function(make_case):
    case = make_case(_config("batch", "relu"), torch.float64)
    g = GroupElement.sample(case.spec, 0, only=["convs.0.channels"])
    moved = act(case.spec, case.params, g)
    assert testing.relative_error(case.f(moved), case.f(case.params)) < 1e-10
    for stat in ("running_mean", "running_var"):
        broken = dict(moved)
        broken[f"norms.0.{stat}"] = case.params[f"norms.0.{stat}"]
        testing.assert_not_invariant(case.f, case.params, broken)


def _permute_first_channels(params, perm):
    out = dict(params)
    for k in ("convs.0.weight", "convs.0.bias", "norms.0.weight", "norms.0.bias"):
        out[k] = params[k][perm]
    out["convs.1.weight"] = params["convs.1.weight"][:, perm]
    return out


def test_groupnorm_permutation_across_groups_breaks_function(make_case):
    case = make_case(_config("group", "relu"), torch.float64)  # 8 channels in 2 groups of 4
    within = torch.tensor([1, 0, 3, 2, 7, 6, 5, 4])
    groups_swapped = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    across = torch.tensor([0, 1, 2, 4, 3, 5, 6, 7])  # channels 3 and 4 change group
    y = case.f(case.params)
    assert testing.relative_error(case.f(_permute_first_channels(case.params, within)), y) < 1e-10
    assert testing.relative_error(case.f(_permute_first_channels(case.params, groups_swapped)), y) < 1e-10
    testing.assert_not_invariant(case.f, case.params, _permute_first_channels(case.params, across))
    # and the catalogue refuses such an element
    with pytest.raises(ValueError, match="channel out of its group"):
        case.spec.factors["convs.0.channels"].check_element(across)


@pytest.mark.parametrize("norm", NORMS)
def test_sign_flips_break_relu_cnn(make_case, norm):
    case = make_case(_config(norm, "relu"), torch.float64)
    tanh_spec = cnn_spec(_config(norm, "tanh"))
    signs = tanh_spec.factors_of_kind(SignFlip)
    for seed in range(3):
        g = GroupElement.sample(tanh_spec, seed, only=signs)
        testing.assert_not_invariant(case.f, case.params, act(tanh_spec, case.params, g))


@pytest.mark.parametrize("norm", NORMS)
def test_scaling_breaks_tanh_cnn(make_case, norm):
    case = make_case(_config(norm, "tanh"), torch.float64)
    relu_spec = cnn_spec(_config(norm, "relu"))
    scales = relu_spec.factors_of_kind(PositiveScaling)
    for seed in range(3):
        g = GroupElement.sample(relu_spec, seed, only=scales)
        testing.assert_not_invariant(case.f, case.params, act(relu_spec, case.params, g))


def test_flattened_head_columns_move_in_channel_blocks(make_case):
    """The head reads channel-major flattened features: one channel = head_pixels consecutive columns."""
    case = make_case(_config("none", "relu"), torch.float64)
    on = case.spec.params["head.weight"].axes[1][0].acts
    assert {o.block for o in on} == {case.model.config.head_pixels} == {4}
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    moved = dict(case.params)
    moved["convs.1.weight"] = case.params["convs.1.weight"][perm]
    moved["convs.1.bias"] = case.params["convs.1.bias"][perm]
    cols = (perm.unsqueeze(1) * 4 + torch.arange(4)).reshape(-1)
    moved["head.weight"] = case.params["head.weight"][:, cols]
    assert testing.relative_error(case.f(moved), case.f(case.params)) < 1e-10
    pixel_major = (torch.arange(4).unsqueeze(1) * 16 + perm).reshape(-1)  # a permutation, but the wrong layout
    assert sorted(pixel_major.tolist()) == list(range(64))
    moved["head.weight"] = case.params["head.weight"][:, pixel_major]
    testing.assert_not_invariant(case.f, case.params, moved)
