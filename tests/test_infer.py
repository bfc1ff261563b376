"""Bare state dicts: a dense chain is inferred, everything else refused with a clear message."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from symm.adapters import infer_spec
from symm.errors import UnsupportedArchitecture
from symm.evaluate import functional, state_dict_of
from symm.testing import assert_invariant


def _sequential(act: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 12), act, nn.Linear(12, 3)).double()


@pytest.mark.parametrize("activation,module,dim", [(None, nn.GELU(), 0), ("relu", nn.ReLU(), 28), ("tanh", nn.Tanh(), 0)])
def test_sequential_mlp_is_inferred(activation, module, dim):
    model = _sequential(module)
    params = state_dict_of(model)
    inferred = infer_spec(params, activation=activation)
    assert inferred.sizes == (8, 16, 12, 3)
    assert inferred.layers == ("0", "2", "4")
    assert inferred.spec.dimension == dim
    assert ("unknown" in inferred.explanation) == (activation is None)
    x = torch.randn(10, 8, dtype=torch.float64)
    f = functional(model)
    assert_invariant(lambda p: f(p, x), inferred.spec, params, n_samples=20)


def test_conv_state_dict_is_refused():
    params = {"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.zeros(4)}
    with pytest.raises(UnsupportedArchitecture, match="conv.weight"):
        infer_spec(params)


def test_broken_chain_is_refused():
    params = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2, 5)}
    with pytest.raises(UnsupportedArchitecture, match="b.weight reads 5"):
        infer_spec(params)


def test_non_weight_key_is_refused():
    with pytest.raises(UnsupportedArchitecture, match="running_mean"):
        infer_spec({"a.weight": torch.zeros(4, 3), "bn.running_mean": torch.zeros(4)})
