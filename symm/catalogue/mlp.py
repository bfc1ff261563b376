"""MLP catalogue entries: dense layers, plain MLPs and SwiGLU layers, built from parameter-name prefixes."""

from __future__ import annotations

from collections.abc import Sequence

from ..spec import Fragment, On, param
from .units import Units, activation_group, neurons


def linear(prefix: str, d_out: int, d_in: int, out: Sequence[On] | None, inn: Sequence[On] | None, bias: bool = True) -> Fragment:
    """``y = W x + b`` with W of shape (d_out, d_in) under ``{prefix}.weight`` / ``{prefix}.bias``."""
    params = {f"{prefix}.weight": param((d_out, d_in), list(out) if out else None, list(inn) if inn else None)}
    if bias:
        params[f"{prefix}.bias"] = param((d_out,), list(out) if out else None)
    return Fragment.of(params=params)


def swiglu(
    prefix: str,
    d_hidden: int,
    d_in: int,
    inn: Sequence[On] | None,
    units_name: str | None = None,
    bias: bool = False,
    names: tuple[str, str] = ("gate", "up"),
) -> tuple[Fragment, Units]:
    """``silu(B x) * (A x)``: B = ``{prefix}.gate``, A = ``{prefix}.up``; returns the fragment and its units.

    The units' scaling acts on A's rows (out) and on whoever consumes the units (in); B only permutes.
    """
    units = neurons(units_name or f"{prefix}.units", d_hidden, "swiglu")
    gate, up = names
    frag = Fragment.of(units.factors)
    frag = frag + linear(f"{prefix}.{gate}", d_hidden, d_in, units.out(with_child=False), inn, bias)
    frag = frag + linear(f"{prefix}.{up}", d_hidden, d_in, units.out(), inn, bias)
    return frag, units


def mlp(
    layer_names: Sequence[str],
    sizes: Sequence[int],
    activation: str,
    bias: bool = True,
    input_units: Units | None = None,
    output_units: Units | None = None,
) -> Fragment:
    """A chain of dense layers ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between them.

    ``layer_names[i]`` is the state-dict prefix of layer i. With ``activation == "swiglu"`` each hidden layer
    i is a SwiGLU pair ``{name}.gate`` / ``{name}.up``. ``input_units`` / ``output_units`` let the chain read
    from / write to a shared stream (a residual block).
    """
    if len(layer_names) != len(sizes) - 1:
        raise ValueError(f"{len(sizes) - 1} layers need {len(sizes) - 1} names, got {len(layer_names)}")
    activation_group(activation)
    frag = Fragment.of(input_units.factors if input_units else ())
    inn = input_units.inn() if input_units else None
    for i, name in enumerate(layer_names):
        d_in, d_out = sizes[i], sizes[i + 1]
        last = i == len(layer_names) - 1
        if last:
            out_units = output_units
            frag = frag + Fragment.of(out_units.factors if out_units else ())
            frag = frag + linear(name, d_out, d_in, out_units.out() if out_units else None, inn, bias)
            break
        if activation == "swiglu":
            layer, units = swiglu(name, d_out, d_in, inn, units_name=f"{name}.units", bias=bias)
            frag = frag + layer
        else:
            units = neurons(f"{name}.units", d_out, activation)
            frag = frag + Fragment.of(units.factors) + linear(name, d_out, d_in, units.out(), inn, bias)
        inn = units.inn()
    return frag
