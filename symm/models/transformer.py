"""Reference decoder-only transformer LM: PE in {none, sinusoidal, learned, rope}, FFN in {relu, gelu, silu,
swiglu, moe}, MoE gating in {dense, topk, top1, sigmoid, sigmoid-raw, normsigmoid}, optional shared expert,
LayerNorm or RMSNorm, tied or untied embeddings, grouped-query attention, optional per-head QK-norm (Qwen3)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import catalogue
from ..catalogue.attention import QK_NORM_EPS, AttentionShape
from ..catalogue.conv import check_mode
from ..catalogue.units import Units
from ..spec import Fragment, Spec, param
from .activations import activation_fn

FFN_KINDS = ("relu", "gelu", "silu", "swiglu", "moe")


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 64
    d_model: int = 32
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    max_len: int = 64
    pe: str = "rope"
    rope_layout: str = "half"
    rope_base: float = 10000.0
    ffn: str = "swiglu"
    d_ff: int = 64
    n_experts: int = 4
    top_k: int = 2
    gating: str = "topk"
    router_bias: bool = False
    shared_expert: bool = False
    d_shared: int = 48
    norm: str = "layer"
    tied: bool = False
    attn_bias: bool = False
    qk_norm: bool = False  # per-head RMSNorm of q and k over head_dim, before RoPE (Qwen3)
    qk_norm_eps: float = QK_NORM_EPS

    def __post_init__(self) -> None:
        if self.pe not in catalogue.PE_KINDS:
            raise ValueError(f"pe must be one of {catalogue.PE_KINDS}, got {self.pe!r}")
        if self.ffn not in FFN_KINDS:
            raise ValueError(f"ffn must be one of {FFN_KINDS}, got {self.ffn!r}")
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {self.norm!r}")
        if not self.qk_norm_eps >= 0.0:
            raise ValueError(f"qk_norm_eps must be >= 0, got {self.qk_norm_eps}")
        catalogue.has_translation(self.gating)
        if self.gating == "top1" and self.top_k != 1:
            object.__setattr__(self, "top_k", 1)
        AttentionShape(self.d_model, self.n_heads, self.kv_heads, self.dh)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


def sinusoidal_table(n: int, d: int) -> torch.Tensor:
    pos = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2, dtype=torch.float64) / d)
    table = torch.zeros(n, d, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return table


def apply_rope(x: torch.Tensor, base: float, layout: str) -> torch.Tensor:
    """Rotate pairs of ``x`` (B, H, T, dh) by position-dependent angles; pair j has frequency base^(-2j/dh)."""
    t, dh = x.shape[-2], x.shape[-1]
    inv = base ** (-torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    ang = torch.arange(t, dtype=torch.float64).unsqueeze(1) * inv  # (T, dh/2)
    cos, sin = torch.cos(ang).to(x.dtype), torch.sin(ang).to(x.dtype)
    if layout == "interleaved":
        x0, x1 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    x0, x1 = x[..., : dh // 2], x[..., dh // 2 :]
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.c = c
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.dh, bias=c.attn_bias)
        self.k_proj = nn.Linear(c.d_model, c.kv_heads * c.dh, bias=c.attn_bias)
        self.v_proj = nn.Linear(c.d_model, c.kv_heads * c.dh, bias=c.attn_bias)
        self.o_proj = nn.Linear(c.n_heads * c.dh, c.d_model, bias=c.attn_bias)
        if c.qk_norm:
            self.q_norm = nn.RMSNorm(c.dh, eps=c.qk_norm_eps)
            self.k_norm = nn.RMSNorm(c.dh, eps=c.qk_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, (b, t, _) = self.c, x.shape
        q = self.q_proj(x).view(b, t, c.n_heads, c.dh)
        k = self.k_proj(x).view(b, t, c.kv_heads, c.dh)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, c.kv_heads, c.dh).transpose(1, 2)
        if c.pe == "rope":
            q, k = apply_rope(q, c.rope_base, c.rope_layout), apply_rope(k, c.rope_base, c.rope_layout)
        r = c.n_heads // c.kv_heads
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, c.n_heads * c.dh))


class DenseFFN(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.d_model, c.d_ff)
        self.fc2 = nn.Linear(c.d_ff, c.d_model)
        self._act = activation_fn(c.ffn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self._act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.up_proj = nn.Linear(d_model, d_hidden, bias=False)
        self.down_proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def gate_weights(logits: torch.Tensor, gating: str, top_k: int) -> torch.Tensor:
    """Per-token expert weights (N, E), zero for unselected experts.

    dense: softmax; topk: softmax, top-k, renormalised over the k; top1: the top softmax probability
    (not renormalised, Switch-style); sigmoid: sigmoid, top-k, renormalised over the k; sigmoid-raw: sigmoid of every
    expert, not normalised; normsigmoid: sigmoid of every expert, normalised over all experts.
    """
    if gating == "sigmoid-raw":
        return torch.sigmoid(logits)
    if gating == "normsigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True)
    probs = torch.sigmoid(logits) if gating == "sigmoid" else torch.softmax(logits, dim=-1)
    if gating == "dense":
        return probs
    top_v, top_i = probs.topk(top_k, dim=-1)
    if gating != "top1":
        top_v = top_v / top_v.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, top_i, top_v)


class MoEFFN(nn.Module):
    """Routed SwiGLU experts stacked as w1/w3 (E, I, d) and w2 (E, d, I), plus an optional shared expert."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.c = c
        e, i, d = c.n_experts, c.d_ff, c.d_model
        self.router = nn.Linear(d, e, bias=c.router_bias)
        self.w1 = nn.Parameter(torch.randn(e, i, d) / math.sqrt(d))
        self.w3 = nn.Parameter(torch.randn(e, i, d) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(e, d, i) / math.sqrt(i))
        if c.shared_expert:
            self.shared = SwiGLUFFN(d, c.d_shared)
            self.shared_gate = nn.Linear(d, 1, bias=False)
        self.last_router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        self.last_router_logits = logits.detach()
        w = gate_weights(logits, self.c.gating, self.c.top_k)  # (..., E)
        h = F.silu(torch.einsum("...d,eid->...ei", x, self.w1)) * torch.einsum("...d,eid->...ei", x, self.w3)
        y = torch.einsum("...ei,edi,...e->...d", h, self.w2, w)
        if self.c.shared_expert:
            y = y + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return y


def make_norm(c: TransformerConfig) -> nn.Module:
    return nn.LayerNorm(c.d_model) if c.norm == "layer" else nn.RMSNorm(c.d_model, eps=1e-6)


class Block(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(c)
        self.attn = Attention(c)
        self.norm2 = make_norm(c)
        if c.ffn == "moe":
            self.ffn: nn.Module = MoEFFN(c)
        elif c.ffn == "swiglu":
            self.ffn = SwiGLUFFN(c.d_model, c.d_ff)
        else:
            self.ffn = DenseFFN(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class TransformerLM(nn.Module):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        c = self.config = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        if c.pe == "learned":
            self.pos = nn.Embedding(c.max_len, c.d_model)
        if c.pe == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(c.max_len, c.d_model).float(), persistent=False)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.norm = make_norm(c)
        if not c.tied:
            self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[-1]
        x = self.embed(tokens)
        if self.config.pe == "learned":
            x = x + self.pos.weight[:t]
        elif self.config.pe == "sinusoidal":
            x = x + self.pos_table[:t].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.config.tied else self.lm_head(x)


def _norm(prefix: str, c: TransformerConfig, stream: Units) -> Fragment:
    return catalogue.layernorm(prefix, stream, bias=c.norm == "layer")


def transformer_spec(c: TransformerConfig, mode: str = "eval") -> Spec:
    """Stream permutation (unless a fixed sinusoidal table pins the stream), attention by PE (and QK-norm), FFN by kind.

    No batch statistics: ``mode`` ("eval" or "train") gives the same group (a QK-norm's scales hold in both).
    """
    check_mode(mode)
    d = c.d_model
    stream = Units.fixed(d) if c.pe == "sinusoidal" else catalogue.stream("stream", d, signed=c.norm == "rms")
    frag = Fragment.of(stream.factors, {"embed.weight": param((c.vocab_size, d), None, stream.out())})
    if c.pe == "sinusoidal":
        frag = frag + Fragment.of(notes=["additive sinusoidal PE is a fixed buffer: the residual stream cannot be permuted"])
    if c.pe == "learned":
        frag = frag + Fragment.of(params={"pos.weight": param((c.max_len, d), None, stream.out())})
    shape = AttentionShape(d, c.n_heads, c.kv_heads, c.dh)
    for i in range(c.n_layers):
        b = f"blocks.{i}"
        frag = frag + _norm(f"{b}.norm1", c, stream) + _norm(f"{b}.norm2", c, stream)
        frag = frag + catalogue.attention(
            f"{b}.attn", shape, c.pe, stream, bias=(c.attn_bias,) * 4, rope_layout=c.rope_layout, qk_norm=c.qk_norm, qk_norm_eps=c.qk_norm_eps
        )
        frag = frag + _ffn_fragment(f"{b}.ffn", c, stream)
    frag = frag + _norm("norm", c, stream)
    if not c.tied:
        frag = frag + Fragment.of(params={"lm_head.weight": param((c.vocab_size, d), None, stream.inn())})
    return Spec(frag, name=f"transformer-{c.pe}-{c.ffn}" + (f"-{c.gating}" if c.ffn == "moe" else "") + ("-qknorm" if c.qk_norm else ""))


def _ffn_fragment(prefix: str, c: TransformerConfig, stream: Units) -> Fragment:
    d = c.d_model
    if c.ffn in ("relu", "gelu", "silu"):
        return catalogue.mlp([f"{prefix}.fc1", f"{prefix}.fc2"], [d, c.d_ff, d], c.ffn, input_units=stream, output_units=stream)
    if c.ffn == "swiglu":
        return catalogue.shared_expert(prefix, d, c.d_ff, stream, gate=None)
    experts, units, children = catalogue.expert_factors(prefix, c.n_experts, c.d_ff, "swiglu")
    frag = catalogue.router(f"{prefix}.router", c.n_experts, d, c.gating, stream, experts.name, bias=c.router_bias)
    frag = frag + catalogue.stacked_swiglu_experts(prefix, c.n_experts, d, c.d_ff, stream, experts, units, children)
    if c.shared_expert:
        frag = frag + catalogue.shared_expert(f"{prefix}.shared", d, c.d_shared, stream, gate=f"{prefix}.shared_gate.weight")
    return frag
