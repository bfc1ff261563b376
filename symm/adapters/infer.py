"""Infer a Spec from a bare state dict (no config): the plain case of a chain of dense layers.

Keys and shapes carry no activation, so unless told, only the permutation symmetry (true for every
elementwise activation) is used; pass ``activation="relu"`` to add positive scaling, etc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .. import catalogue
from ..errors import UnsupportedArchitecture
from ..spec import Spec


@dataclass(frozen=True)
class InferredSpec:
    spec: Spec
    layers: tuple[str, ...]
    sizes: tuple[int, ...]
    activation: str
    explanation: str


def _layer_prefixes(params: Mapping[str, torch.Tensor]) -> list[str]:
    prefixes: list[str] = []
    for key in params:
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias"):
            raise UnsupportedArchitecture(f"cannot infer an architecture: key {key!r} is not a .weight or .bias")
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def infer_spec(params: Mapping[str, torch.Tensor], activation: str | None = None) -> InferredSpec:
    """A dense chain ``W_1 .. W_L`` in state-dict order with matching sizes -> an MLP spec."""
    layers = _layer_prefixes(params)
    sizes: list[int] = []
    for prefix in layers:
        w = params.get(f"{prefix}.weight")
        if w is None:
            raise UnsupportedArchitecture(f"cannot infer an architecture: {prefix}.bias has no {prefix}.weight")
        if w.dim() != 2:
            raise UnsupportedArchitecture(
                f"cannot infer an architecture: {prefix}.weight has shape {tuple(w.shape)}; only chains of dense "
                "layers are inferred from bare state dicts (build conv/attention models from a config instead)"
            )
        if sizes and w.shape[1] != sizes[-1]:
            raise UnsupportedArchitecture(
                f"cannot infer an architecture: {prefix}.weight reads {w.shape[1]} inputs but the previous layer writes {sizes[-1]}"
            )
        if not sizes:
            sizes.append(int(w.shape[1]))
        sizes.append(int(w.shape[0]))
    has_bias = {f"{p}.bias" in params for p in layers}
    if len(has_bias) != 1:
        raise UnsupportedArchitecture("cannot infer an architecture: some dense layers have biases and others do not")
    act = activation or "any"
    frag = catalogue.mlp(layers, sizes, act, bias=has_bias.pop())
    spec = Spec(frag, name=f"inferred-mlp{sizes}-{act}")
    how = (
        f"inferred a {len(layers)}-layer dense chain {'-'.join(map(str, sizes))} from keys {layers[0]}.weight .. {layers[-1]}.weight; "
        + (f"activation {act!r} (given)" if activation else "activation unknown: permutations only (pass an activation such as 'relu' to add scaling)")
    )
    return InferredSpec(spec, tuple(layers), tuple(sizes), act, how)


class DenseChain(torch.nn.Module):
    """An nn.Module whose state-dict keys are exactly an inferred dense chain's (for evaluation and hooks)."""

    def __init__(self, inferred: InferredSpec) -> None:
        super().__init__()
        from ..models.activations import activation_fn

        self.layer_names = inferred.layers
        bias = any(k.endswith(".bias") for k in inferred.spec.params)
        for i, name in enumerate(inferred.layers):
            parent: torch.nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, torch.nn.Linear(inferred.sizes[i], inferred.sizes[i + 1], bias=bias))
        act = "relu" if inferred.activation == "any" else inferred.activation
        self._act = activation_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        modules = dict(self.named_modules())
        for i, name in enumerate(self.layer_names):
            x = modules[name](x)
            if i < len(self.layer_names) - 1:
                x = self._act(x)
        return x
