"""Multi-head attention entries, by positional encoding.

Per head h with query Q_h, key K_h, value V_h, output O_h (rows of the projections):
  no PE, additive sinusoidal or learned PE: heads permute; per KV group, Q -> E^T Q, K -> E^{-1} K (GL(d_h))
    and V -> F V, O -> O F^{-1} (GL(d_h)); continuous dims per group 2 d_h^2.
  RoPE: the Q/K factor shrinks to one rotation-scaling a I + b J per frequency pair (it must commute with
    every position's rotation): d_h dims per group; permuting Q/K dims within a head is NOT a symmetry.
  GQA: query heads permute only within their KV group, KV heads move with their group, and E, F are shared
    by a group's query heads (they share K and V).
  per-head QK-norm (Qwen3: RMSNorm over head_dim of each q and k head, gains (d_h,) shared by all heads, before
    RoPE): GL(d_h) on Q/K is gone (so is the RoPE rotation-scaling). What survives on Q/K: each query head's and each
    KV head's projection scale, absorbed by its norm (one-sided :class:`~symm.factors.NormScale`, laws ||W_q,h||^2 and
    ||W_k,g||^2), and a balance of the two gains, q_gain * a, k_gain / a, per head dim (no PE) or per RoPE pair
    (laws q_gain_i^2 - k_gain_i^2). Exact only with the norm's eps = 0. Discrete extras, not catalogued: per KV group,
    a sign flip of one head dim (no PE) or of one RoPE pair on Q and K together; without PE, one head-dim permutation
    shared by every head and both gains. Rotations within a RoPE pair commute with RoPE but not with generic gains
    (they hold only at pair-equal gains, e.g. the initialisation). (OLMo2 normalises all heads together over H * d_h:
    a different group, not catalogued.)
Layouts: separate q/k/v/o projections in torch Linear layout (out, in), or a fused QKV projection
(GPT-2 ``c_attn``: Conv1D (in, out) with [Q | K | V] along the output axis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..factors import GeneralLinear, HeadPermutation, NormScale, PositiveScaling, RotationScaling
from ..spec import Fragment, On, Segment, param
from .units import Units

PE_KINDS = ("none", "sinusoidal", "learned", "rope")
#: Qwen3's rms_norm_eps, the default epsilon of a QK-norm
QK_NORM_EPS = 1e-6
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
    qk: GeneralLinear | RotationScaling | None
    vo: GeneralLinear
    q_scale: NormScale | None = None  # per-head QK-norm: each query head's scale, absorbed by q_norm
    k_scale: NormScale | None = None  # ... each KV head's scale, absorbed by k_norm
    gain: PositiveScaling | None = None  # q_norm gain x a, k_norm gain / a (per head dim, or per RoPE pair)

    @property
    def all(self) -> tuple:
        return tuple(f for f in (self.heads, self.qk, self.vo, self.q_scale, self.k_scale, self.gain) if f is not None)

    def q(self, r: int) -> list[On]:
        acts = [On(self.heads.name, "out")]
        if self.qk is not None:
            acts.append(On(self.qk.name, "out", repeat=r))
        if self.q_scale is not None:
            acts.append(On(self.q_scale.name, "out", block=self.heads.head_dim))
        return acts

    def k(self) -> list[On]:
        acts = [On(self.heads.name, "in")]
        if self.qk is not None:
            acts.append(On(self.qk.name, "in"))
        if self.k_scale is not None:
            acts.append(On(self.k_scale.name, "out", block=self.heads.head_dim))
        return acts

    def v(self) -> list[On]:
        return [On(self.heads.name, "out"), On(self.vo.name, "out")]

    def o(self, r: int) -> list[On]:
        return [On(self.heads.name, "in"), On(self.vo.name, "in", repeat=r)]

    def gain_axis(self, side: str, layout: str) -> list[On] | list[Segment]:
        """Axis of a QK-norm gain (d_h,): one unit per head dim, or per RoPE pair (``half``: dims j and j + d_h/2)."""
        if self.gain is None:
            raise ValueError(f"{self.heads.name}: attention without QK-norm has no norm gains")
        dh = self.heads.head_dim
        if self.gain.count == dh:
            return [On(self.gain.name, side)]
        if layout == "interleaved":
            return [On(self.gain.name, side, block=2)]
        return [Segment(dh // 2, (On(self.gain.name, side),)), Segment(dh // 2, (On(self.gain.name, side),))]


def attention_factors(
    prefix: str, shape: AttentionShape, pe: PEKind, rope_layout: str = "half", qk_norm: bool = False, qk_norm_eps: float = QK_NORM_EPS
) -> AttentionFactors:
    if pe not in PE_KINDS:
        raise ValueError(f"positional encoding must be one of {PE_KINDS}, got {pe!r}")
    heads = HeadPermutation(f"{prefix}.heads", shape.n_heads, groups=shape.n_kv_heads, head_dim=shape.head_dim)
    vo = GeneralLinear(f"{prefix}.vo", shape.n_kv_heads, parent=heads.name, dim=shape.head_dim)
    if qk_norm:
        if pe == "rope" and shape.head_dim % 2:
            raise ValueError(f"{prefix}: RoPE head_dim must be even, got {shape.head_dim}")
        q_scale = NormScale(f"{prefix}.q_scale", shape.n_heads, parent=heads.name, norm=f"{prefix}.q_norm (per head)", eps=qk_norm_eps)
        k_scale = NormScale(f"{prefix}.k_scale", shape.n_kv_heads, parent=heads.name, norm=f"{prefix}.k_norm (per head)", eps=qk_norm_eps)
        gain = PositiveScaling(f"{prefix}.qk_gain", shape.head_dim // 2 if pe == "rope" else shape.head_dim)
        return AttentionFactors(heads, None, vo, q_scale, k_scale, gain)
    if pe == "rope":
        qk = RotationScaling(f"{prefix}.qk", shape.n_kv_heads, parent=heads.name, dim=shape.head_dim, layout=rope_layout)
    else:
        qk = GeneralLinear(f"{prefix}.qk", shape.n_kv_heads, parent=heads.name, dim=shape.head_dim)
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
    qk_norm: bool = False,
    qk_norm_eps: float = QK_NORM_EPS,
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm"),
) -> Fragment:
    """Separate projections ``{prefix}.{q,k,v,o}`` in (out, in) layout reading/writing ``stream``.

    ``qk_norm``: per-head RMSNorm of q and k over head_dim (gains ``{prefix}.{q_norm,k_norm}.weight``), Qwen3 style.
    """
    f = attention_factors(prefix, shape, pe, rope_layout, qk_norm, qk_norm_eps)
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
    if qk_norm:
        params[f"{prefix}.{qk_norm_names[0]}.weight"] = param((shape.head_dim,), f.gain_axis("out", rope_layout))
        params[f"{prefix}.{qk_norm_names[1]}.weight"] = param((shape.head_dim,), f.gain_axis("in", rope_layout))
    return Fragment.of(f.all, params, notes=_notes(prefix, pe, qk_norm))


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


def _notes(prefix: str, pe: str, qk_norm: bool = False) -> tuple[str, ...]:
    if qk_norm:
        per = "RoPE pair" if pe == "rope" else "head dim"
        return (
            f"{prefix}: per-head QK-norm removes GL(d_h) on Q/K; each Q head's and K head's scale is absorbed by its norm "
            f"(one-sided norm scales), the q/k norm gains balance per {per}; V/O keep GL(d_h) per KV group",
        )
    if pe == "rope":
        return (f"{prefix}: RoPE shrinks Q/K from GL(d_h) to one rotation-scaling per frequency pair (d_h dims per KV group)",)
    return (f"{prefix}: {pe} positional encoding leaves Q/K and V/O each a full GL(d_h) per KV group",)
