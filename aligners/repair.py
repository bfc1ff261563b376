"""REPAIR-style renormalisation (Jordan et al., 2022): in the interpolated network, rescale and shift each hidden
unit's pre-activation so its mean and standard deviation on data equal the interpolation of the endpoints':
mu_t = (1-alpha) mu_A + alpha mu_B, sigma_t likewise. Folded into the producing layer's weight rows and bias,
layer by layer in forward order (each correction sees the corrected layers before it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from symm.evaluate import functional
from symm.spec import Spec

from .activation_matching import _channels, hookable_factors


@torch.no_grad()
def _unit_stats(model: nn.Module, params: Mapping[str, torch.Tensor], module_name: str, inputs: torch.Tensor, batch_size: int = 512):
    module = dict(model.named_modules())[module_name]
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda mod, inp, out: captured.append(_channels(out, mod).double()))
    f = functional(model)
    try:
        for start in range(0, len(inputs), batch_size):
            f(params, inputs[start : start + batch_size])
    finally:
        handle.remove()
    acts = torch.cat(captured)
    return acts.mean(0), acts.std(0).clamp_min(1e-12)


def repair(
    spec: Spec,
    model: nn.Module,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    params_mix: Mapping[str, torch.Tensor],
    alpha: float,
    inputs: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Return ``params_mix`` with every hookable hidden layer's unit statistics reset to the interpolated targets."""
    out = {k: v.clone() for k, v in params_mix.items()}
    layers = list(hookable_factors(spec, model).values())
    order = [name for name, _ in model.named_modules() if name in layers]
    for name in order:
        mu_a, sd_a = _unit_stats(model, params_a, name, inputs)
        mu_b, sd_b = _unit_stats(model, params_b, name, inputs)
        mu, sd = _unit_stats(model, out, name, inputs)
        mu_t, sd_t = (1 - alpha) * mu_a + alpha * mu_b, (1 - alpha) * sd_a + alpha * sd_b
        gain = sd_t / sd
        w = out[f"{name}.weight"]
        shape = (-1,) + (1,) * (w.dim() - 1)
        out[f"{name}.weight"] = (w.double() * gain.reshape(shape)).to(w.dtype)
        bias_key = f"{name}.bias"
        if bias_key in out:
            b = out[bias_key].double()
            out[bias_key] = ((b - mu) * gain + mu_t).to(out[bias_key].dtype)
    return out
