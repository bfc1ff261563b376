"""Planted recovery by weight matching over the product of the catalogue's options.

For every reference-model family and every combination of the options that change its symmetry group
(activation x norm x layout, enumerated from the catalogue's own tables where it has them), and for 10
seeds each (model init and planted element both vary): A = a float64 reference model with perturbed norms and
running statistics, h* = a random element of the whole group (continuous factors included), B = h*^{-1} . A.
Weight matching must return h with ||h.B - A|| / ||A|| <= 1e-6 and every permutation factor equal to h*'s.

Select by family and options, e.g. ``-k "cnn and tanh and batch"``, ``-k "rope_half and moe and with_router_bias"``
(transformer ids spell out every option: PE, heads/KV heads, FFN [gating, router bias, shared expert], norm,
tied or separate head, attention biases, layers).
Seeds loop inside one test per combination; a failure lists every failing seed and what went wrong.
"""

from __future__ import annotations

import pytest
import torch

from aligners import MatchInfo, weight_matching
from planted import SPEC_ONLY_ACTIVATIONS, buildable, plant, recovery_problems, reference_params
from symm import catalogue
from symm.element import GroupElement
from symm.models import CNNConfig, MLPConfig, ResidualCNNConfig, ResidualMLPConfig, TransformerConfig, spec_for
from symm.models.transformer import FFN_KINDS

SEEDS = range(10)

ACTIVATIONS = tuple(catalogue.ACTIVATION_GROUPS)
#: CNN norms (``catalogue.cnn`` has no table of them; ``test_cnn_norms_are_the_accepted_ones`` pins this list)
CNN_NORMS = ("none", "batch", "group")
#: transformer options (the config validates against these; the catalogue holds PE kinds and gatings)
RMS_OR_LAYER = ("layer", "rms")
ROPE_LAYOUTS = ("half", "interleaved")
#: attention layouts: (query heads, KV heads) at d_model 16: MHA with head_dim 8, GQA 4/2 and MQA 4/1 with head_dim 4
HEAD_LAYOUTS = ((2, None), (4, 2), (4, 1))


def _pe_variants():
    for pe in catalogue.PE_KINDS:
        for layout in ROPE_LAYOUTS if pe == "rope" else ("half",):
            yield (f"{pe}_{layout}" if pe == "rope" else pe), {"pe": pe, "rope_layout": layout}


def _lm(**kw) -> TransformerConfig:
    base = dict(vocab_size=20, d_model=16, n_layers=2, n_heads=2, max_len=8, d_ff=12, n_experts=4, d_shared=8)
    return TransformerConfig(**{**base, **kw})


def lm_id(c: TransformerConfig) -> str:
    """Every option that changes the group, each value a distinct token (``-k with_router_bias`` vs ``no_router_bias``)."""
    pe = f"rope_{c.rope_layout}" if c.pe == "rope" else c.pe
    ffn = c.ffn
    if c.ffn == "moe":
        ffn += f"-{c.gating}-{'with' if c.router_bias else 'no'}_router_bias-{'with' if c.shared_expert else 'no'}_shared_expert"
    parts = [
        "lm",
        pe,
        f"heads{c.n_heads}kv{c.kv_heads}",
        ffn,
        f"{c.norm}norm",
        "tied" if c.tied else "separate_head",
        f"{'with' if c.attn_bias else 'no'}_attn_bias",
        f"layers{c.n_layers}",
    ]
    return "-".join(parts)


def _cases() -> dict[str, object]:
    cases: dict[str, object] = {}

    def add(case_id: str, config) -> None:
        if case_id not in cases and buildable(config):
            cases[case_id] = config

    for act in ACTIVATIONS:
        for bias in (True, False):
            add(f"mlp-{act}-{'with' if bias else 'no'}bias", MLPConfig((12, 10, 10, 4), act, bias=bias))
        for norm in CNN_NORMS:
            add(f"cnn-{act}-{norm}", CNNConfig(widths=(4, 6), n_classes=4, image_size=4, activation=act, norm=norm))
        # other GroupNorm groupings (the default is 2 groups, of 2 and of 3 channels): 3 groups of 2 channels,
        # and one group (any channel permutation keeps the statistics)
        cfg = CNNConfig(widths=(6, 6), n_classes=4, image_size=4, activation=act, norm="group", groups=3)
        add(f"cnn-{act}-group-groups3", cfg)
        cfg = CNNConfig(widths=(4, 6), n_classes=4, image_size=4, activation=act, norm="group", groups=1)
        add(f"cnn-{act}-group-groups1", cfg)
        for norm in (True, False):
            cfg = ResidualMLPConfig(d_in=12, d_model=8, d_hidden=10, n_blocks=2, n_out=4, activation=act, norm=norm)
            add(f"resmlp-{act}-{'with' if norm else 'no'}norm", cfg)
        cfg = ResidualCNNConfig(width=4, hidden=6, n_blocks=2, n_classes=4, image_size=4, activation=act)
        add(f"rescnn-{act}-batch", cfg)

    def add_lm(**kw) -> None:
        config = _lm(**kw)
        add(lm_id(config), config)

    # PE x FFN
    for _, pe in _pe_variants():
        for ffn in FFN_KINDS:
            add_lm(**pe, ffn=ffn, n_layers=1 if ffn == "moe" else 2)
    # MoE gating x router bias x shared expert
    for gating in catalogue.GATINGS:
        for router_bias in (False, True):
            for shared in (False, True):
                add_lm(ffn="moe", n_layers=1, gating=gating, router_bias=router_bias, shared_expert=shared)
    # attention layout (MHA / GQA / MQA) x PE x attention biases
    for _, pe in _pe_variants():
        for n_heads, n_kv in HEAD_LAYOUTS:
            for attn_bias in (False, True):
                add_lm(**pe, n_heads=n_heads, n_kv_heads=n_kv, attn_bias=attn_bias, ffn="gelu", n_layers=1)
    # residual stream: PE x norm x tied embeddings
    for _, pe in _pe_variants():
        for norm in RMS_OR_LAYER:
            for tied in (False, True):
                add_lm(**pe, norm=norm, tied=tied, ffn="relu", n_layers=2)
    return cases


CASES = _cases()


@pytest.mark.parametrize("case_id", list(CASES), ids=list(CASES))
def test_planted_recovery_product(case_id):
    config = CASES[case_id]
    spec = spec_for(config)
    failures = []
    for seed in SEEDS:
        params = reference_params(config, seed)
        h_star = GroupElement.sample(spec, 1000 + seed)
        planted = plant(spec, params, h_star)
        info = MatchInfo()
        try:
            h = weight_matching(spec, params, planted, seed=seed, progress=False, info=info)
        except Exception as exc:  # noqa: BLE001 - report every seed, not only the first
            failures.append(f"seed {seed}: raised {type(exc).__name__}: {exc}")
            continue
        problems = recovery_problems(spec, params, planted, h, h_star)
        if problems:
            failures.append(f"seed {seed} ({info.sweeps} sweeps): " + "; ".join(problems[:3]))
    assert not failures, f"{spec.name}: {len(failures)}/{len(SEEDS)} seeds not recovered:\n" + "\n".join(failures)


# ----- the product really is the product ---------------------------------------------------------------------


def test_every_activation_is_covered():
    """Each catalogue activation appears in every family that can build it (none silently dropped)."""
    for act in ACTIVATIONS:
        assert any(c.startswith(f"mlp-{act}-") for c in CASES), f"no MLP case for activation {act!r}"
        if act != "swiglu":  # SwiGLU is a layer, not an elementwise activation: MLP only
            for family in ("cnn", "resmlp", "rescnn"):
                assert any(c.startswith(f"{family}-{act}") for c in CASES), f"no {family} case for activation {act!r}"
    for act in SPEC_ONLY_ACTIVATIONS:
        assert act in ACTIVATIONS


def test_every_option_value_is_covered():
    lms = [c for c in CASES.values() if isinstance(c, TransformerConfig)]
    for norm in CNN_NORMS:
        assert any(isinstance(c, CNNConfig) and c.norm == norm for c in CASES.values())
    assert {c.pe for c in lms} == set(catalogue.PE_KINDS)
    assert {c.rope_layout for c in lms if c.pe == "rope"} == set(ROPE_LAYOUTS)
    assert {(c.pe, c.ffn) for c in lms} == {(p, f) for p in catalogue.PE_KINDS for f in FFN_KINDS}
    moe = {(c.gating, c.router_bias, c.shared_expert) for c in lms if c.ffn == "moe"}
    assert moe == {(g, b, s) for g in catalogue.GATINGS for b in (False, True) for s in (False, True)}
    assert {(c.pe, c.n_heads, c.kv_heads) for c in lms} >= {(p, h, kv or h) for p in catalogue.PE_KINDS for h, kv in HEAD_LAYOUTS}
    assert {(c.pe, c.norm, c.tied) for c in lms} >= {(p, n, t) for p in catalogue.PE_KINDS for n in RMS_OR_LAYER for t in (False, True)}
    assert {c.attn_bias for c in lms} == {False, True}


def test_cnn_norms_are_the_accepted_ones():
    for norm in CNN_NORMS:
        spec_for(CNNConfig(norm=norm))
    with pytest.raises(ValueError):
        spec_for(CNNConfig(norm="layer"))


def test_planted_elements_are_generic():
    """Sanity of the set-up: the planted element moves every kind of factor (not the identity by accident)."""
    config = _lm(ffn="moe", n_layers=1, router_bias=True, shared_expert=True)
    spec = spec_for(config)
    h_star = GroupElement.sample(spec, 1000)
    for name, f in spec.factors.items():
        assert not f.is_identity(h_star.values[name]) or f.count == 1, f"{name} sampled as the identity"
    assert torch.is_floating_point(reference_params(config, 0)["embed.weight"])
