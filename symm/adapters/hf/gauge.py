"""Adapter gauges: fused layers whose rows interleave factors per head, re-held as contiguous blocks.

GPT-NeoX's ``query_key_value`` (3 H d_h, d) stores its rows per head as [q_h | k_h | v_h], and with partial rotary
each q_h / k_h is [rotary dims | pass-through dims]. A head's Q rows are then not a contiguous segment of any axis, so
the spec cannot name them. The gauge replaces that layer, in the loaded model, by :class:`SplitHeadsQKV`: the same
rows held as contiguous ``q_rot``, ``q_pass``, ``k_rot``, ``k_pass`` and ``v`` Linear blocks (each H x its dims, heads
in order), reassembled into the fused weight at every forward. The function is unchanged; ``model.state_dict()``
then has the spec's keys, and :func:`checkpoint_state_dict` gives back the ``transformers`` keys that
``save_pretrained`` writes.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

#: virtual blocks of one head, in the fused row order (q, k, v; rotary dims first)
PIECES = ("q_rot", "q_pass", "k_rot", "k_pass", "v")


def piece_dims(head_dim: int, rotary: int) -> dict[str, int]:
    """Per-head rows of each non-empty block: rotary dims ``rotary``, pass-through ``head_dim - rotary``, value ``head_dim``."""
    dims = {"q_rot": rotary, "q_pass": head_dim - rotary, "k_rot": rotary, "k_pass": head_dim - rotary, "v": head_dim}
    return {k: v for k, v in dims.items() if v > 0}


def split_rows(fused: torch.Tensor, heads: int, head_dim: int, rotary: int) -> dict[str, torch.Tensor]:
    """Rows [q_h | k_h | v_h] per head (axis 0 of ``fused``) -> contiguous blocks ``(H * dims, ...)`` per piece."""
    per_head = fused.reshape(heads, 3 * head_dim, *fused.shape[1:])
    out, start = {}, 0
    for name in PIECES:
        dim = piece_dims(head_dim, rotary).get(name, 0)
        if dim:
            out[name] = per_head[:, start : start + dim].reshape(heads * dim, *fused.shape[1:])
        start += dim
    return out


def merge_rows(pieces: dict[str, torch.Tensor], heads: int, head_dim: int, rotary: int) -> torch.Tensor:
    """Inverse of :func:`split_rows`."""
    dims = piece_dims(head_dim, rotary)
    rest = next(iter(pieces.values())).shape[1:]
    blocks = [pieces[name].reshape(heads, dims[name], *rest) for name in PIECES if name in dims]
    return torch.cat(blocks, dim=1).reshape(heads * 3 * head_dim, *rest)


class SplitHeadsQKV(nn.Module):
    """A fused per-head-interleaved QKV Linear, held as contiguous per-piece Linear blocks (same function)."""

    def __init__(self, fused: nn.Linear, heads: int, rotary: int) -> None:
        super().__init__()
        head_dim = fused.out_features // (3 * heads)
        if head_dim * 3 * heads != fused.out_features or not 0 <= rotary <= head_dim:
            raise ValueError(f"cannot split {fused.out_features} rows into {heads} heads of [q | k | v] with {rotary} rotary dims")
        self.heads, self.head_dim, self.rotary = heads, head_dim, rotary
        self.in_features, self.out_features = fused.in_features, fused.out_features
        weights = split_rows(fused.weight.detach(), heads, head_dim, rotary)
        biases = split_rows(fused.bias.detach(), heads, head_dim, rotary) if fused.bias is not None else None
        for name, w in weights.items():
            piece = nn.Linear(fused.in_features, w.shape[0], bias=biases is not None, device=w.device, dtype=w.dtype)
            piece.weight = nn.Parameter(w.clone(), requires_grad=fused.weight.requires_grad)
            if biases is not None:
                piece.bias = nn.Parameter(biases[name].clone(), requires_grad=fused.bias.requires_grad)
            self.add_module(name, piece)

    def _pieces(self) -> list[str]:
        return [n for n in PIECES if hasattr(self, n)]

    def fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The ``transformers`` layer's ``(weight, bias)``."""
        names = self._pieces()
        weight = merge_rows({n: getattr(self, n).weight for n in names}, self.heads, self.head_dim, self.rotary)
        if getattr(self, names[0]).bias is None:
            return weight, None
        return weight, merge_rows({n: getattr(self, n).bias for n in names}, self.heads, self.head_dim, self.rotary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.fused_weight())


def _neox_attention(model: nn.Module):
    for name, module in model.named_modules():
        if type(module).__name__ == "GPTNeoXAttention" and isinstance(getattr(module, "query_key_value", None), (nn.Linear, SplitHeadsQKV)):
            yield name, module


def _save_pretrained_fused(self, save_directory, *args, state_dict=None, **kwargs):
    """``save_pretrained`` of a gauged model: writes the ``transformers`` layout unless given a state dict."""
    if state_dict is None:
        state_dict = checkpoint_state_dict(self)
    return type(self).save_pretrained(self, save_directory, *args, state_dict=state_dict, **kwargs)


def gauge_model(model: nn.Module) -> nn.Module:
    """Re-hold every GPT-NeoX ``query_key_value`` as :class:`SplitHeadsQKV` (in place, idempotent); other models
    are returned unchanged. The gauged model's ``save_pretrained`` still writes the fused ``transformers`` layout."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "gpt_neox":
        return model
    for _, attention in _neox_attention(model):
        if isinstance(attention.query_key_value, nn.Linear):
            heads = attention.config.num_attention_heads
            attention.query_key_value = SplitHeadsQKV(attention.query_key_value, heads, attention.rotary_ndims)
    if hasattr(type(model), "save_pretrained"):
        model.save_pretrained = types.MethodType(_save_pretrained_fused, model)  # rebinds to the copy under deepcopy
    return model


def is_gauged(model: nn.Module) -> bool:
    return any(isinstance(m, SplitHeadsQKV) for m in model.modules())


def checkpoint_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` in the ``transformers`` layout (what ``save_pretrained`` writes): gauged blocks fused back."""
    state = model.state_dict()
    fused: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SplitHeadsQKV):
            weight, bias = module.fused_weight()
            prefix = f"{name}." if name else ""
            state = {k: v for k, v in state.items() if not k.startswith(prefix)}
            fused[prefix + "weight"] = weight.detach()
            if bias is not None:
                fused[prefix + "bias"] = bias.detach()
    return {**state, **fused}
