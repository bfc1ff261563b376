"""Infer a Spec from a bare state dict (no config): the plain case of a chain of dense layers.

Keys and shapes carry no activation, so unless told, only the permutation symmetry (true for every
elementwise activation) is used; pass ``activation="relu"`` to add positive scaling, ``"tanh"`` for sign flips.

Layer order. A ``.safetensors`` file stores its keys sorted as strings (``10.weight`` before ``2.weight``), so
the file's key order is not the forward order. Layers named by numbers only (``0``, ``2``, ``layers.10``,
``fc3``: one name template) are ordered by their *natural* order (numbers compared as numbers); layers with
different names (``hidden``, ``out``) keep the file's order (insertion order for torch files). If the preferred
order does not chain by shape, the other is tried. The explanation says which order was used.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import catalogue
from ..errors import UnsupportedArchitecture
from ..spec import Spec

NATURAL = "natural order of the key names (numbers compared as numbers)"
FILE = "the order of the keys in the file"


@dataclass(frozen=True)
class InferredSpec:
    spec: Spec
    layers: tuple[str, ...]
    sizes: tuple[int, ...]
    activation: str
    explanation: str
    order: str = NATURAL


def _layer_prefixes(params: Mapping[str, torch.Tensor]) -> list[str]:
    prefixes: list[str] = []
    for key in params:
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias"):
            raise UnsupportedArchitecture(f"cannot infer an architecture: key {key!r} is not a .weight or .bias")
        if prefix not in prefixes:
            prefixes.append(prefix)
    return prefixes


def natural_key(name: str) -> tuple:
    """Sort key of a dotted name: digit runs compare as integers (``layers.2`` < ``layers.10``)."""
    return tuple((0, int(run), "") if run.isdigit() else (1, 0, run) for run in re.findall(r"\d+|\D+", name))


def _template(name: str) -> str:
    return re.sub(r"\d+", "#", name)


def _chain_sizes(layers: Sequence[str], params: Mapping[str, torch.Tensor]) -> list[int]:
    """Sizes ``[d_0, d_1, .., d_L]`` of the chain in this order; raise if a layer does not read its predecessor."""
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
                f"cannot infer an architecture: {prefix}.weight reads {w.shape[1]} inputs but the previous layer "
                f"({layers[len(sizes) - 2]}) writes {sizes[-1]} (layer order tried: {', '.join(layers[:12])})"
            )
        if not sizes:
            sizes.append(int(w.shape[1]))
        sizes.append(int(w.shape[0]))
    return sizes


def order_layers(prefixes: Sequence[str], params: Mapping[str, torch.Tensor]) -> tuple[list[str], list[int], str]:
    """The forward order of the dense layers, their sizes and a description of how the order was chosen."""
    natural = sorted(prefixes, key=natural_key)
    numbered = len({_template(p) for p in prefixes}) == 1
    tries = [(natural, NATURAL), (list(prefixes), FILE)] if numbered else [(list(prefixes), FILE), (natural, NATURAL)]
    first_error: UnsupportedArchitecture | None = None
    for i, (layers, how) in enumerate(tries):
        if i and layers == tries[0][0]:
            break
        try:
            sizes = _chain_sizes(layers, params)
        except UnsupportedArchitecture as exc:
            first_error = first_error or exc
            continue
        return layers, sizes, how if i == 0 else f"{how} ({tries[0][1]} does not chain by shape)"
    assert first_error is not None
    raise first_error


def infer_spec(params: Mapping[str, torch.Tensor], activation: str | None = None) -> InferredSpec:
    """A dense chain ``W_1 .. W_L`` (ordered as described in the module docstring) -> an MLP spec."""
    layers, sizes, order = order_layers(_layer_prefixes(params), params)
    has_bias = {f"{p}.bias" in params for p in layers}
    if len(has_bias) != 1:
        raise UnsupportedArchitecture("cannot infer an architecture: some dense layers have biases and others do not")
    act = activation or "any"
    frag = catalogue.mlp(layers, sizes, act, bias=has_bias.pop())
    spec = Spec(frag, name=f"inferred-mlp{sizes}-{act}")
    shown = ", ".join(layers) if len(layers) <= 8 else ", ".join(layers[:4]) + ", .., " + ", ".join(layers[-2:])
    how = (
        f"inferred a {len(layers)}-layer dense chain {'-'.join(map(str, sizes))} from keys {layers[0]}.weight .. {layers[-1]}.weight; "
        f"layer order {shown} ({order}); "
        + (f"activation {act!r} (given)" if activation else "activation unknown: permutations only (pass an activation such as 'relu' to add scaling)")
    )
    return InferredSpec(spec, tuple(layers), tuple(sizes), act, how, order)


class DenseChain(torch.nn.Module):
    """An nn.Module whose state-dict keys are exactly an inferred dense chain's (for evaluation and hooks).

    ``activation`` overrides the inferred one (an unknown activation, ``"any"``, evaluates with ReLU).
    """

    def __init__(self, inferred: InferredSpec, activation: str | None = None) -> None:
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
        act = activation or ("relu" if inferred.activation == "any" else inferred.activation)
        self.activation = act
        self._act = activation_fn(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        modules = dict(self.named_modules())
        for i, name in enumerate(self.layer_names):
            x = modules[name](x)
            if i < len(self.layer_names) - 1:
                x = self._act(x)
        return x
