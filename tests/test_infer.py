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


def _deep_sequential(n_layers: int = 6, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(n_layers - 1):
        layers += [nn.Linear(64 if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def test_safetensors_layer_order_is_natural(tmp_path):
    """safetensors sorts keys as strings (10.weight before 2.weight); the chain is still read in forward order."""
    from safetensors.torch import save_file

    from symm.io import load_state_dict

    model = _deep_sequential()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    params = load_state_dict(tmp_path / "m.safetensors")
    assert list(params)[:4] == ["0.bias", "0.weight", "10.bias", "10.weight"]  # the file's (string) order
    inferred = infer_spec(params, activation="relu")
    assert inferred.layers == ("0", "2", "4", "6", "8", "10")
    assert inferred.sizes == (64, 32, 32, 32, 32, 32, 10)
    assert "layer order 0, 2, 4, 6, 8, 10 (natural order" in inferred.explanation
    x = torch.randn(5, 64)
    f = functional(model)
    assert_invariant(lambda p: f(p, x), inferred.spec, params, n_samples=5)


def test_named_layers_keep_the_file_order():
    """Different names (not numbered): insertion order is the forward order; even square layers stay put."""
    params = {"input.weight": torch.zeros(8, 8), "hidden.weight": torch.zeros(8, 8), "output.weight": torch.zeros(3, 8)}
    inferred = infer_spec(params)
    assert inferred.layers == ("input", "hidden", "output")
    assert "the order of the keys in the file" in inferred.explanation


def test_other_order_is_tried_when_the_first_does_not_chain():
    params = {"out.weight": torch.zeros(3, 16), "hid.weight": torch.zeros(16, 8)}  # file order: out first
    inferred = infer_spec(params)
    assert inferred.layers == ("hid", "out")
    assert "does not chain by shape" in inferred.explanation
    numbered = {"fc10.weight": torch.zeros(4, 6), "fc2.weight": torch.zeros(3, 4)}  # natural: fc2, fc10 (fails)
    assert infer_spec(numbered).layers == ("fc10", "fc2")


def test_natural_key_orders_numbers_numerically():
    from symm.adapters.infer import natural_key

    names = ["layers.10.fc", "layers.2.fc", "layers.1.fc", "head", "layers.2.a"]
    assert sorted(names, key=natural_key) == ["head", "layers.1.fc", "layers.2.a", "layers.2.fc", "layers.10.fc"]


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu"])
def test_dense_chain_activation_override(act):
    from symm.adapters.infer import DenseChain

    model = _sequential({"relu": nn.ReLU(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[act])
    params = state_dict_of(model)
    inferred = infer_spec(params)
    assert inferred.activation == "any"
    chain = DenseChain(inferred, activation=act).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    assert chain.activation == act
    assert torch.allclose(functional(chain)(params, x), model(x))
    assert DenseChain(inferred).activation == "relu"  # unknown activation: evaluated with relu
