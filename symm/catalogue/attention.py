"""Multi-head attention entries, by positional encoding.

Per head h with query Q_h, key K_h, value V_h, output O_h (rows of the projections):
  no PE, additive sinusoidal or learned PE: heads permute; per KV group, Q -> E^T Q, K -> E^{-1} K (GL(d_h))
    and V -> F V, O -> O F^{-1} (GL(d_h)); continuous dims per group 2 d_h^2.
  RoPE: the Q/K factor shrinks to one rotation-scaling a I + b J per frequency pair (it must commute with
    every position's rotation): d_h dims per group; permuting Q/K dims within a head is NOT a symmetry.
  GQA: query heads permute only within their KV group, KV heads move with their group, and E, F are shared
    by a group's query heads (they share K and V).
Layouts: separate q/k/v/o projections in torch Linear layout (out, in), or a fused QKV projection
(GPT-2 ``c_attn``: Conv1D (in, out) with [Q | K | V] along the output axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..factors import GeneralLinear, HeadPermutation, RotationScaling
from ..spec import Fragment, On, Segment, param
from .units import Units

PE_KINDS = ("none", "sinusoidal", "learned", "rope")
PEKind = Literal["none", "sinusoidal", "learned", "rope"]


@dataclass(frozen=True)
class AttentionShape:
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not split into {self.n_kv_heads} KV heads")

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class AttentionFactors:
    heads: HeadPermutation
    qk: GeneralLinear | RotationScaling
    vo: GeneralLinear

    @property
    def all(self) -> tuple:
        return (self.heads, self.qk, self.vo)

    def q(self, r: int) -> list[On]:
        return [On(self.heads.name, "out"), On(self.qk.name, "out", repeat=r)]

    def k(self) -> list[On]:
        return [On(self.heads.name, "in"), On(self.qk.name, "in")]

    def v(self) -> list[On]:
        return [On(self.heads.name, "out"), On(self.vo.name, "out")]

    def o(self, r: int) -> list[On]:
        return [On(self.heads.name, "in"), On(self.vo.name, "in", repeat=r)]


def attention_factors(prefix: str, shape: AttentionShape, pe: PEKind, rope_layout: str = "half") -> AttentionFactors:
    if pe not in PE_KINDS:
        raise ValueError(f"positional encoding must be one of {PE_KINDS}, got {pe!r}")
    heads = HeadPermutation(f"{prefix}.heads", shape.n_heads, groups=shape.n_kv_heads, head_dim=shape.head_dim)
    if pe == "rope":
        qk = RotationScaling(f"{prefix}.qk", shape.n_kv_heads, parent=heads.name, dim=shape.head_dim, layout=rope_layout)
    else:
        qk = GeneralLinear(f"{prefix}.qk", shape.n_kv_heads, parent=heads.name, dim=shape.head_dim)
    vo = GeneralLinear(f"{prefix}.vo", shape.n_kv_heads, parent=heads.name, dim=shape.head_dim)
    return AttentionFactors(heads, qk, vo)


def attention(
    prefix: str,
    shape: AttentionShape,
    pe: PEKind,
    stream: Units,
    *,
    names: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    bias: tuple[bool, bool, bool, bool] = (False, False, False, False),
    rope_layout: str = "half",
) -> Fragment:
    """Separate projections ``{prefix}.{q,k,v,o}`` in (out, in) layout reading/writing ``stream``."""
    f = attention_factors(prefix, shape, pe, rope_layout)
    r = shape.group_size
    hq, hkv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
    d = shape.d_model
    rows = {names[0]: (hq, f.q(r)), names[1]: (hkv, f.k()), names[2]: (hkv, f.v())}
    params = {}
    for (name, (n_out, acts)), has_bias in zip(rows.items(), bias[:3]):
        params[f"{prefix}.{name}.weight"] = param((n_out, d), acts, stream.inn())
        if has_bias:
            params[f"{prefix}.{name}.bias"] = param((n_out,), acts)
    params[f"{prefix}.{names[3]}.weight"] = param((d, hq), stream.out(), f.o(r))
    if bias[3]:
        params[f"{prefix}.{names[3]}.bias"] = param((d,), stream.out())
    return Fragment.of(f.all, params, notes=_notes(prefix, pe))


def fused_attention_conv1d(prefix: str, shape: AttentionShape, pe: PEKind, stream: Units, *, qkv: str = "c_attn", out: str = "c_proj") -> Fragment:
    """GPT-2 layout: ``{prefix}.c_attn`` Conv1D (d, 3d) = [Q | K | V] columns, ``{prefix}.c_proj`` (d, d); biases."""
    if shape.n_kv_heads != shape.n_heads:
        raise ValueError("the fused Conv1D layout has no grouped-query attention")
    f = attention_factors(prefix, shape, pe)
    d, hd = shape.d_model, shape.n_heads * shape.head_dim
    segs = [Segment(hd, tuple(f.q(1))), Segment(hd, tuple(f.k())), Segment(hd, tuple(f.v()))]
    params = {
        f"{prefix}.{qkv}.weight": param((d, 3 * hd), stream.inn(), segs),
        f"{prefix}.{qkv}.bias": param((3 * hd,), segs),
        f"{prefix}.{out}.weight": param((hd, d), f.o(1), stream.out()),
        f"{prefix}.{out}.bias": param((d,), stream.out()),
    }
    return Fragment.of(f.all, params, notes=_notes(prefix, pe))


def _notes(prefix: str, pe: str) -> tuple[str, ...]:
    if pe == "rope":
        return (f"{prefix}: RoPE shrinks Q/K from GL(d_h) to one rotation-scaling per frequency pair (d_h dims per KV group)",)
    return (f"{prefix}: {pe} positional encoding leaves Q/K and V/O each a full GL(d_h) per KV group",)
