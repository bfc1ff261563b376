"""Mixture-of-Experts entries, by gating.

One permutation acts on the experts and the router rows (and router bias) together; each expert keeps its
own MLP group, batched along the expert axis (permuting experts reorders their factors: a wreath product).
Router translation (a common shift of all router rows / biases) by gating:
  dense softmax, top-k softmax (k >= 2), top-1 softmax: softmax(z + c) = softmax(z): a symmetry;
  sigmoid (top-k, renormalised over the k), sigmoid-raw (every expert, not normalised), normsigmoid (every expert,
  sigma(z_e) / sum sigma(z)): no translation (a shift changes every sigmoid, and the normalisation does not undo it:
  only where every gate is small, sigma(z) ~ e^z, does the normalised form approach a softmax).
Shared experts (and their sigmoid gate) are not routed: they stay put and keep their own MLP group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from ..factors import Factor, GroupedPermutation, Permutation, PositiveScaling, SignFlip, Translation
from ..spec import Fragment, On, Segment, Shift, param
from .mlp import swiglu
from .units import Units, activation_group

GATINGS = ("dense", "topk", "top1", "sigmoid", "sigmoid-raw", "normsigmoid")
Gating = Literal["dense", "topk", "top1", "sigmoid", "sigmoid-raw", "normsigmoid"]
#: gatings whose router allows a common translation (softmax)
SOFTMAX_GATINGS = ("dense", "topk", "top1")


def has_translation(gating: str) -> bool:
    """Whether a common shift of router logits leaves the gate values unchanged."""
    if gating not in GATINGS:
        raise ValueError(f"gating must be one of {GATINGS}, got {gating!r}")
    return gating in SOFTMAX_GATINGS


def router(
    prefix: str, n_experts: int, d_model: int, gating: str, stream: Units, experts: str, bias: bool = False, score_bias: str | None = None
) -> Fragment:
    """Router ``{prefix}.weight`` (E, d) [+ bias (E,)]: rows move with the experts; softmax adds translations.

    ``score_bias``: a per-expert bias added to the gate scores for the top-k choice only (DeepSeek-V3's
    ``e_score_correction_bias`` after a sigmoid): it moves with the experts."""
    factors: list = []
    w_shifts, b_shifts = [], []
    if has_translation(gating):
        factors.append(Translation(f"{prefix}.shift", d_model))
        w_shifts.append(Shift(f"{prefix}.shift", axis=0))
        if bias:
            factors.append(Translation(f"{prefix}.bias_shift", 1))
            b_shifts.append(Shift(f"{prefix}.bias_shift", axis=0))
    params = {f"{prefix}.weight": param((n_experts, d_model), On(experts, "out"), stream.inn(), shifts=w_shifts)}
    if bias:
        params[f"{prefix}.bias"] = param((n_experts,), On(experts, "out"), shifts=b_shifts)
    if score_bias:
        params[f"{prefix}.{score_bias}"] = param((n_experts,), On(experts, "out"))
    if has_translation(gating):
        note = f"{prefix}: {gating} softmax gating adds a common translation of the router rows"
    else:
        note = f"{prefix}: {gating} gating allows no router translation (only the expert permutation)"
    return Fragment.of(factors, params, notes=[note])


def expert_factors(
    prefix: str, n_experts: int, d_expert: int, activation: str, groups: int = 1
) -> tuple[Permutation, Permutation, tuple[Factor, ...]]:
    """Expert permutation, per-expert hidden-unit permutation (batched), and the units' per-expert children: a
    positive scaling if homogeneous, a sign flip if odd (both for SwiGLU: the up branch is linear).

    ``groups`` > 1: group-limited routing (top-k only inside the best expert groups, DeepSeek-V3's ``n_group`` /
    ``topk_group``): experts permute within their group and whole groups permute (a group's score is symmetric in its
    experts); moving one expert to another group changes which experts can be chosen."""
    experts = Permutation(f"{prefix}.experts", n_experts) if groups == 1 else GroupedPermutation(f"{prefix}.experts", n_experts, groups=groups)
    units = Permutation(f"{prefix}.expert_units", d_expert, parent=experts.name, batch=(n_experts,))
    group = activation_group(activation)
    children: list[Factor] = []
    if group in ("scaling", "scaling-sign"):
        children.append(PositiveScaling(f"{prefix}.expert_units.scale", d_expert, parent=units.name, batch=(n_experts,)))
    if group in ("sign", "scaling-sign"):
        children.append(SignFlip(f"{prefix}.expert_units.sign", d_expert, parent=units.name, batch=(n_experts,)))
    return experts, units, tuple(children)


def stacked_swiglu_experts(
    prefix: str,
    n_experts: int,
    d_model: int,
    d_expert: int,
    stream: Units,
    experts: Permutation,
    units: Permutation,
    children: Sequence[Factor] = (),
    *,
    fused_gate_up: str | None = None,
    names: tuple[str, str, str] = ("w1", "w3", "w2"),
) -> Fragment:
    """Expert weights stacked on axis 0: gate/up (E, I, d) and down (E, d, I), or a fused gate_up (E, 2I, d).

    Names are parameter names under ``prefix``; ``fused_gate_up`` is the HF in-memory layout (rows [:I] gate, [I:] up).
    """
    gate_acts = (On(units.name, "out", batch_axis=0),)
    up_acts = gate_acts + tuple(On(c.name, "out", batch_axis=0) for c in children)
    down_acts = [On(units.name, "in", batch_axis=0)] + [On(c.name, "in", batch_axis=0) for c in children]
    e_in = On(experts.name, "in")
    params = {}
    if fused_gate_up:
        segs = [Segment(d_expert, gate_acts), Segment(d_expert, up_acts)]
        params[f"{prefix}.{fused_gate_up}"] = param((n_experts, 2 * d_expert, d_model), e_in, segs, stream.inn())
    else:
        params[f"{prefix}.{names[0]}"] = param((n_experts, d_expert, d_model), e_in, list(gate_acts), stream.inn())
        params[f"{prefix}.{names[1]}"] = param((n_experts, d_expert, d_model), e_in, list(up_acts), stream.inn())
    params[f"{prefix}.{names[2]}"] = param((n_experts, d_model, d_expert), e_in, stream.out(), down_acts)
    return Fragment.of([experts, units, *children], params)


def shared_expert(prefix: str, d_model: int, d_hidden: int, stream: Units, gate: str | None, names=("gate_proj", "up_proj", "down_proj")) -> Fragment:
    """A SwiGLU shared expert (not routed: it stays put) and optionally its sigmoid gate ``gate`` (1, d)."""
    frag, units = swiglu(prefix, d_hidden, d_model, stream.inn(), units_name=f"{prefix}.units", names=names[:2])
    if gate:
        frag = frag + Fragment.of(notes=[f"{prefix}: shared expert, not routed: it stays put and keeps its own SwiGLU group"])
    frag = frag + Fragment.of(params={f"{prefix}.{names[2]}.weight": param((d_model, d_hidden), stream.out(), units.inn())})
    if gate:
        frag = frag + Fragment.of(params={gate: param((1, d_model), None, stream.inn())})
    return frag
