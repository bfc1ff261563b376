"""Residual stream entries: one permutation shared by everything that writes to or reads from the stream.

Per-channel gains of LayerNorm / BatchNorm on the stream move with it. The stream itself carries only
the permutation here (a norm-free linear stream would allow all of GL(d)).
"""

from __future__ import annotations

from ..spec import Fragment, On, param
from .conv import batchnorm, conv2d
from .mlp import linear, mlp
from .units import Units, channels, stream


def layernorm(prefix: str, units: Units, bias: bool = True) -> Fragment:
    """LayerNorm over the stream: gain (and bias) permute with it; LayerNorm allows no per-unit scaling."""
    params = {f"{prefix}.weight": param((units.n,), units.out(with_child=False))}
    if bias:
        params[f"{prefix}.bias"] = param((units.n,), units.out(with_child=False))
    return Fragment.of(params=params)


def residual_mlp(
    prefix: str,
    d_in: int,
    d_model: int,
    d_hidden: int,
    n_blocks: int,
    n_out: int,
    activation: str,
    norm: bool = True,
) -> Fragment:
    """``embed -> [x + fc2(act(fc1(LN(x))))] * n_blocks -> LN -> head``; the stream is ``{prefix}stream``."""
    s = stream(f"{prefix}stream", d_model)
    frag = Fragment.of(s.factors) + linear(f"{prefix}embed", d_model, d_in, s.out(), None)
    for i in range(n_blocks):
        block = f"{prefix}blocks.{i}"
        if norm:
            frag = frag + layernorm(f"{block}.norm", s)
        frag = frag + mlp([f"{block}.fc1", f"{block}.fc2"], [d_model, d_hidden, d_model], activation, input_units=s, output_units=s)
    if norm:
        frag = frag + layernorm(f"{prefix}norm", s)
    return frag + linear(f"{prefix}head", n_out, d_model, None, s.inn())


def residual_cnn(
    prefix: str,
    in_channels: int,
    width: int,
    hidden: int,
    n_blocks: int,
    n_classes: int,
    activation: str,
) -> Fragment:
    """``stem conv -> BN -> [x + BN(conv2(act(BN(conv1(x)))))] * n -> global average pool -> head``."""
    s = stream(f"{prefix}stream", width)
    k = (3, 3)
    frag = Fragment.of(s.factors) + conv2d(f"{prefix}stem", width, in_channels, k, s.out(), None, bias=False)
    frag = frag + batchnorm(f"{prefix}stem_norm", s)
    for i in range(n_blocks):
        block = f"{prefix}blocks.{i}"
        h = channels(f"{block}.channels", hidden, activation)
        frag = frag + Fragment.of(h.factors)
        frag = frag + conv2d(f"{block}.conv1", hidden, width, k, h.out(with_child=False), s.inn(), bias=False)
        frag = frag + batchnorm(f"{block}.norm1", h)
        frag = frag + conv2d(f"{block}.conv2", width, hidden, k, s.out(), h.inn(), bias=False)
        frag = frag + batchnorm(f"{block}.norm2", s)
    return frag + linear(f"{prefix}head", n_classes, width, None, s.inn())
