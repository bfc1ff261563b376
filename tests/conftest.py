"""Shared fixtures for the symmetry tests: dtypes, digits inputs, reference models with non-trivial norms.

Helpers are exposed as fixtures (factories) so test modules never import from this file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from symm.action import act
from symm.element import GroupElement
from symm.evaluate import functional, state_dict_of
from symm.models import build_model, spec_for
from symm.spec import Spec

DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: relative tolerance of the acceptance criteria: max|f(g.theta)(x) - f(theta)(x)| / max|f(theta)(x)|
FUNCTION_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10}
#: tolerance of parameter-level comparisons (group axioms), relative to each tensor's largest entry
PARAM_RTOL = {torch.float32: 1e-5, torch.float64: 1e-12}

N_ELEMENTS = 20



def pytest_configure(config):
    """Every test uses small tensors: one torch thread avoids oversubscribing the 2 cores (much faster under load)."""
    torch.set_num_threads(1)


@pytest.fixture
def dtype(request) -> torch.dtype:
    """float32 and float64 (parametrized by :func:`pytest_generate_tests`)."""
    return request.param


@pytest.hookimpl(trylast=True)
def pytest_generate_tests(metafunc):
    # parametrized last so that ids read ``relu-float32`` (the test's own parameters first); modules that
    # define their own ``dtype`` fixture keep it
    if "dtype" in metafunc.fixturenames and not hasattr(metafunc.module, "dtype"):
        metafunc.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES), indirect=True)


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """scikit-learn's 8x8 digits as (1797, 64) float64 features in [0, 1]."""
    from sklearn.datasets import load_digits

    x = load_digits().data
    return torch.tensor(x / 16.0, dtype=torch.float64)


def perturb_norms(model: nn.Module, seed: int) -> None:
    """Move norm affine parameters and running statistics away from their defaults (1, 0, 0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
                if getattr(module, "weight", None) is not None:
                    w = module.weight
                    w.copy_((1.0 + 0.5 * torch.randn(w.shape, generator=gen, dtype=torch.float64)).to(w.dtype))
                if getattr(module, "bias", None) is not None:
                    b = module.bias
                    b.copy_((0.5 * torch.randn(b.shape, generator=gen, dtype=torch.float64)).to(b.dtype))
            if isinstance(module, nn.BatchNorm2d):
                m, v = module.running_mean, module.running_var
                m.copy_((0.3 * torch.randn(m.shape, generator=gen, dtype=torch.float64)).to(m.dtype))
                v.copy_(torch.exp(0.5 * torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(v.dtype))


@dataclass
class Case:
    """A reference model at some dtype, its catalogue Spec, its state dict and ``f(params) -> logits``."""

    model: nn.Module
    spec: Spec
    params: dict[str, torch.Tensor]
    x: torch.Tensor
    dtype: torch.dtype

    def f(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return functional(self.model)(params, self.x)


@pytest.fixture
def make_case(digits) -> Callable[..., Case]:
    """``make_case(config, dtype, seed=0)``: eval-mode model with perturbed norms; inputs = digits + noise."""

    def make(config, dtype: torch.dtype, seed: int = 0, n_digits: int = 24, n_random: int = 8) -> Case:
        torch.manual_seed(seed)
        model = build_model(config).to(dtype).eval()
        perturb_norms(model, seed + 1)
        gen = torch.Generator().manual_seed(seed + 2)
        x = torch.cat([digits[:n_digits], torch.randn(n_random, 64, generator=gen, dtype=torch.float64)]).to(dtype)
        return Case(model, spec_for(model), state_dict_of(model), x, dtype)

    return make


def relative_function_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def relative_param_change(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b if torch.is_floating_point(b[k]))
    den = sum(float(b[k].double().pow(2).sum()) for k in b if torch.is_floating_point(b[k]))
    return (num / den) ** 0.5


def assert_params_close(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], rtol: float, what: str) -> None:
    assert set(a) == set(b), f"{what}: keys differ: {sorted(set(a) ^ set(b))}"
    for k in b:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, f"{what}: {k} shape/dtype changed"
        if not b[k].numel():
            continue
        diff = float((a[k].double() - b[k].double()).abs().max())
        scale = max(float(b[k].double().abs().max()), 1e-30)
        assert diff <= rtol * scale, f"{what}: {k} differs by {diff:.3e} (scale {scale:.3e}, rtol {rtol:.0e})"


@pytest.fixture
def check_preserved() -> Callable[..., float]:
    """``check_preserved(case, n=20)``: every sampled element moves the weights and keeps the logits."""

    def check(case: Case, n: int = N_ELEMENTS, seed: int = 0) -> float:
        rtol = FUNCTION_RTOL[case.dtype]
        y = case.f(case.params)
        assert y.abs().max() > 0
        worst = 0.0
        for i in range(n):
            g = GroupElement.sample(case.spec, seed * 1000 + i)
            moved = act(case.spec, case.params, g)
            assert relative_param_change(moved, case.params) > 1e-3, f"sample {i} did not move the weights"
            for k, v in moved.items():
                assert v.dtype == case.params[k].dtype, f"act changed the dtype of {k}"
            err = relative_function_error(case.f(moved), y)
            assert err <= rtol, f"{case.spec.name}: sample {i}: relative error {err:.3e} > {rtol:.0e}"
            worst = max(worst, err)
        return worst

    return check


@pytest.fixture
def check_axioms() -> Callable[..., None]:
    """``check_axioms(spec, params, dtype)``: identity, inverses, composition vs sequential action, no mutation."""

    def check(spec: Spec, params: Mapping[str, torch.Tensor], dtype: torch.dtype, n: int = 5, seed: int = 0) -> None:
        rtol = PARAM_RTOL[dtype]
        snapshot = {k: v.clone() for k, v in params.items()}
        ident = act(spec, params, GroupElement.identity(spec))
        for k in params:
            assert torch.equal(ident[k], params[k]), f"identity moved {k}"
        for i in range(n):
            g, h = GroupElement.sample(spec, seed * 100 + 2 * i), GroupElement.sample(spec, seed * 100 + 2 * i + 1)
            g_theta = act(spec, params, g)
            assert relative_param_change(g_theta, params) > 1e-3
            assert_params_close(act(spec, params, g.compose(g.inverse())), params, rtol, "(g g^-1).theta")
            assert_params_close(act(spec, params, g.inverse().compose(g)), params, rtol, "(g^-1 g).theta")
            assert_params_close(act(spec, g_theta, g.inverse()), params, rtol, "g^-1.(g.theta)")
            assert_params_close(act(spec, params, g.compose(h)), act(spec, act(spec, params, h), g), rtol, "(g h).theta vs g.(h.theta)")
            # outputs are fresh tensors: not the inputs, not sharing their storage
            for k, v in g_theta.items():
                assert v is not params[k], f"act returned the input tensor {k}"
                if v.numel():
                    assert v.untyped_storage().data_ptr() != params[k].untyped_storage().data_ptr(), f"{k} shares storage"
            # writing into the output does not reach the input
            for v in g_theta.values():
                v.zero_() if torch.is_floating_point(v) else v.fill_(7)
        for k in params:
            assert torch.equal(params[k], snapshot[k]), f"act mutated its input {k}"

    return check
