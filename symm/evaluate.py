"""Evaluate a torch model at any weights: ``torch.func.functional_call`` with strict key checking."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

Params = Mapping[str, torch.Tensor]


def state_dict_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state dict (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """name -> the first name of the same tensor, for every later name of a tied parameter (e.g. a tied
    ``lm_head.weight``): a state dict lists both, ``functional_call`` takes one."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


def functional(model: nn.Module) -> Callable[..., torch.Tensor]:
    """``f(params, *inputs)``: the model's forward at ``params``; missing or extra keys raise.

    Non-persistent buffers (computed tables such as a sinusoidal PE) are not weights: they come from the model.
    Tied parameters are read from their first name (the state dict's copy under the other name is dropped).
    """
    persistent = set(model.state_dict())
    fixed = {k: v for k, v in model.named_buffers() if k not in persistent}
    aliases = tied_aliases(model)

    def f(params: Params, *inputs: torch.Tensor) -> torch.Tensor:
        given = {k: v for k, v in params.items() if k not in aliases or aliases[k] not in params}
        return torch.func.functional_call(model, {**fixed, **given}, inputs, strict=True)

    return f
