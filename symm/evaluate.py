"""Evaluate a torch model at any weights: ``torch.func.functional_call`` with strict key checking."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

Params = Mapping[str, torch.Tensor]


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def functional(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``f(params, *inputs)``: the model's forward at ``params``; missing or extra keys raise.

    Non-persistent buffers (computed tables such as a sinusoidal PE) are not weights: they come from the model.
    """
    persistent = set(model.state_dict())
    fixed = {k: v for k, v in model.named_buffers() if k not in persistent}

    def f(params: Params, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {**fixed, **params}, inputs, strict=True)

    return f
