"""Families as data: Mistral, Qwen2, Qwen3, OLMo2, Phi-3, Gemma 1-3, OLMoE, Qwen3-MoE (and Llama with biases), checked on the logits of the
``transformers`` models themselves (float32), with negative controls, planted recovery through ``symm align``,
refusal of config options the adapters do not derive, and the meta-device layout check."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from hf_models import VOCAB, build_family, configs, family_configs, from_config, logits_fn, params_of
from symm.action import act
from symm.adapters import hf, load_hf, spec_from_hf
from symm.cli import main
from symm.element import GroupElement
from symm.errors import SpecError, UnsupportedArchitecture
from symm.testing import assert_invariant, assert_not_invariant

NAMES = list(family_configs())
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", NAMES)
def test_logits_preserved(name):
    model = build_family(name)
    spec = spec_from_hf(model)
    assert_invariant(logits_fn(model, TOKENS), spec, params_of(model), n_samples=20, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_spec_from_config_matches_model_and_meta(name):
    config = family_configs()[name]
    spec = spec_from_hf(config)  # checked against the meta-device model
    assert spec == spec_from_hf(build_family(name))
    assert set(spec.params) == set(hf.meta_shapes(config))


# ---------------------------------------------------------------------------------------------- what each group is


def _kinds(spec, prefix):
    return {n[len(prefix) + 1 :]: f.kind for n, f in spec.factors.items() if n.startswith(prefix + ".")}


def test_groups_per_family():
    llama_like = {"heads": "head-permutation", "qk": "rotation-scaling", "vo": "general-linear"}
    for name in ("mistral", "qwen2", "phi3", "llama-bias", "gemma", "gemma2"):
        assert _kinds(spec_from_hf(family_configs()[name]), "model.layers.0.self_attn") == llama_like, name
    qwen3 = _kinds(spec_from_hf(family_configs()["qwen3"]), "model.layers.0.self_attn")
    assert qwen3 == {"heads": "head-permutation", "vo": "general-linear", "q_scale": "norm-scale", "k_scale": "norm-scale", "qk_gain": "positive-scaling"}
    gemma3 = _kinds(spec_from_hf(family_configs()["gemma3"]), "model.layers.0.self_attn")
    assert gemma3 == {"heads": "head-permutation", "vo": "general-linear", "q_scale": "norm-scale", "k_scale": "norm-scale"}
    olmo2 = _kinds(spec_from_hf(family_configs()["olmo2"]), "model.layers.0.self_attn")
    assert olmo2 == {"heads": "head-permutation", "vo": "general-linear"}
    for name in NAMES:
        spec = spec_from_hf(family_configs()[name])
        if name.startswith("gpt-neox"):  # LayerNorm stream: permutations, no signs
            assert "stream.sign" not in spec.factors and spec.factors["stream"].kind == "permutation"
        else:
            assert spec.factors["stream.sign"].kind == "sign-flip"  # RMSNorm streams (pre- or post-norm): signed permutations
        assert any(n.startswith(spec.name + ":") for n in spec.notes), spec.notes
    qwen2 = spec_from_hf(family_configs()["qwen2"])
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2.params and "model.layers.0.self_attn.o_proj.bias" not in qwen2.params
    phi3 = spec_from_hf(family_configs()["phi3"])
    assert [s.size for s in phi3.params["model.layers.0.self_attn.qkv_proj.weight"].axes[0]] == [32, 16, 16]
    assert [s.size for s in phi3.params["model.layers.0.mlp.gate_up_proj.weight"].axes[0]] == [48, 48]


# ---------------------------------------------------------------------------------------------- negative controls


def _pair_rotation(params, prefix, dh, n_q_per_kv, kv=0, pair=0, angle=0.7, scale=1.0):
    """Rotate (and scale) RoPE pair ``pair`` (dims j, j + d_h/2) of KV group ``kv``: Q rows by M, K rows by M^{-T}.

    For Llama this is an element of the catalogued rotation-scaling (a symmetry); with a QK-norm it is not."""
    c, s = math.cos(angle), math.sin(angle)
    m = torch.tensor([[c, -s], [s, c]]) * scale
    m_inv_t = torch.linalg.inv(m).T
    out = dict(params)
    idx = [pair, pair + dh // 2]

    def move(key, heads, mat):
        w = out[key].clone()
        for h in heads:
            rows = [h * dh + i for i in idx]
            w[rows] = mat @ w[rows]
        out[key] = w

    move(f"{prefix}.q_proj.weight", range(kv * n_q_per_kv, (kv + 1) * n_q_per_kv), m)
    move(f"{prefix}.k_proj.weight", [kv], m_inv_t)
    return out


def test_pair_rotation_control_is_a_llama_symmetry():
    """The control transform is right: on Llama (no QK-norm) it keeps the logits."""
    model = build_family("mistral")
    params = params_of(model)
    f = logits_fn(model, TOKENS)
    moved = _pair_rotation(params, "model.layers.0.self_attn", 8, 2, kv=1, pair=2, angle=0.9, scale=1.7)
    with torch.no_grad():
        assert (f(moved) - f(params)).abs().max() / f(params).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "olmoe", "qwen3-moe"])
def test_qk_norm_kills_rope_rotations_on_qk(name):
    model = build_family(name)
    params = params_of(model)
    f = logits_fn(model, TOKENS)
    assert_not_invariant(f, params, _pair_rotation(params, "model.layers.0.self_attn", 8, 2, angle=0.9))


@pytest.mark.parametrize("name", ["qwen3", "olmo2", "olmoe", "qwen3-moe"])
def test_qk_norm_kills_general_linear_on_qk(name):
    """GL(d_h) on Q/K (Q rows by E^T, K rows by E^{-1}, one KV group): a symmetry without norm and PE, not here."""
    model = build_family(name)
    params = params_of(model)
    e = torch.eye(8) + 0.3 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    moved = dict(params)
    q, k = params["model.layers.0.self_attn.q_proj.weight"].clone(), params["model.layers.0.self_attn.k_proj.weight"].clone()
    for h in (0, 1):
        q[h * 8 : (h + 1) * 8] = e.T @ q[h * 8 : (h + 1) * 8]
    k[0:8] = torch.linalg.inv(e) @ k[0:8]
    moved["model.layers.0.self_attn.q_proj.weight"], moved["model.layers.0.self_attn.k_proj.weight"] = q, k
    assert_not_invariant(logits_fn(model, TOKENS), params, moved)


def _quarter_turn(params, prefix, dh, heads_q, heads_k, pair, per_head_gains):
    """J = 90-degree turn of RoPE pair (j, j + d_h/2) on the given Q and K heads' rows, with the norm gains of the pair
    swapped (per head for OLMo2's (H d_h,) gains, once for Qwen3's shared (d_h,) gains)."""
    out = dict(params)
    j, jj = pair, pair + dh // 2
    for key, heads in ((f"{prefix}.q_proj.weight", heads_q), (f"{prefix}.k_proj.weight", heads_k)):
        w = out[key].clone()
        for h in heads:
            a, b = h * dh + j, h * dh + jj
            w[a], w[b] = -params[key][b], params[key][a]
        out[key] = w
    for key, heads in ((f"{prefix}.q_norm.weight", heads_q), (f"{prefix}.k_norm.weight", heads_k)):
        g = out[key].clone()
        for h in heads if per_head_gains else [0]:
            a, b = h * dh + j, h * dh + jj
            g[a], g[b] = params[key][b], params[key][a]
        out[key] = g
    return out


def test_discrete_extras_not_catalogued_do_hold():
    """The README's uncatalogued discrete symmetries are real: OLMo2's per-KV-group quarter turn of a RoPE pair (gains
    swapped per head), Qwen3's quarter turn of a pair on every head (shared gains swapped) and its per-KV-group pair sign."""
    prefix = "model.layers.1.self_attn"
    olmo2 = build_family("olmo2")
    p = params_of(olmo2)
    f = logits_fn(olmo2, TOKENS)
    with torch.no_grad():
        ref = f(p)
        assert float((f(_quarter_turn(p, prefix, 8, [2, 3], [1], 1, True)) - ref).abs().max() / ref.abs().max()) < 1e-5
    qwen3 = build_family("qwen3")
    p = params_of(qwen3)
    f = logits_fn(qwen3, TOKENS)
    sign = dict(p)
    for key, heads in ((f"{prefix}.q_proj.weight", [0, 1]), (f"{prefix}.k_proj.weight", [0])):
        w = p[key].clone()
        for h in heads:
            w[[h * 8 + 2, h * 8 + 6]] *= -1
        sign[key] = w
    with torch.no_grad():
        ref = f(p)
        assert float((f(_quarter_turn(p, prefix, 8, range(4), range(2), 3, False)) - ref).abs().max() / ref.abs().max()) < 1e-5
        assert float((f(sign) - ref).abs().max() / ref.abs().max()) < 1e-5
        # ... but a quarter turn on one KV group only is not a symmetry of Qwen3 (its gains are shared by all heads)
        assert float((f(_quarter_turn(p, prefix, 8, [0, 1], [0], 3, False)) - ref).abs().max() / ref.abs().max()) > 1e-3


def test_olmo2_per_head_scale_is_not_absorbed():
    """Qwen3's (and Qwen3-MoE's) per-head norm absorbs a query head's scale; OLMo2's (and OLMoE's) norm over all heads
    does not."""
    for name, symmetric in (("qwen3", True), ("olmo2", False), ("qwen3-moe", True), ("olmoe", False)):
        model = build_family(name)
        params = params_of(model)
        f = logits_fn(model, TOKENS)
        moved = dict(params)
        q = params["model.layers.0.self_attn.q_proj.weight"].clone()
        q[8:16] *= 3.0
        moved["model.layers.0.self_attn.q_proj.weight"] = q
        with torch.no_grad():
            err = float((f(moved) - f(params)).abs().max() / f(params).abs().max())
        assert (err < 1e-5) if symmetric else (err > 1e-3), (name, err)


def test_olmo2_stream_has_no_orthogonal_freedom_through_post_norm_gains():
    """A post-norm gain must move with the stream's permutation; leaving it in place changes the logits."""
    model = build_family("olmo2")
    spec = spec_from_hf(model)
    params = params_of(model)
    g = GroupElement.sample(spec, 3).restrict(["stream"])
    moved = act(spec, params, g)
    key = "model.layers.0.post_attention_layernorm.weight"
    moved[key] = params[key]
    assert_not_invariant(logits_fn(model, TOKENS), params, moved)


def test_gemma3_gain_balance_is_affine_in_w_so_it_is_not_catalogued():
    """Qwen3's q/k gain balance (q gain x a, k gain / a) acts on (1 + w) in Gemma3: scaling w itself breaks the logits,
    scaling 1 + w keeps them (a symmetry, but not a linear action on the weights: dropped from the spec)."""
    model = build_family("gemma3")
    params = params_of(model)
    f = logits_fn(model, TOKENS)
    a = torch.tensor([1.5, 0.5, 2.0, 0.7]).repeat(2)  # per RoPE pair (dims j and j + 4)
    q, k = "model.layers.0.self_attn.q_norm.weight", "model.layers.0.self_attn.k_norm.weight"
    linear, affine = dict(params), dict(params)
    linear[q], linear[k] = params[q] * a, params[k] / a
    affine[q], affine[k] = (1 + params[q]) * a - 1, (1 + params[k]) / a - 1
    assert_not_invariant(f, params, linear)
    with torch.no_grad():
        assert float((f(affine) - f(params)).abs().max() / f(params).abs().max()) < 1e-5


def test_softcapping_is_active_in_the_gemma_tests():
    """The soft-capped Gemma3 model really caps: removing the caps changes its logits (so the invariance above covers them)."""
    model = build_family("gemma3")
    with torch.no_grad():
        capped = model(TOKENS).logits
        model.config.final_logit_softcapping = None
        uncapped = model(TOKENS).logits
    assert capped.abs().max() <= 5.0 + 1e-5 and float((capped - uncapped).abs().max()) > 1e-2


def test_phi3_fused_segments_matter():
    model = build_family("phi3")
    params = params_of(model)
    moved = dict(params)
    w = params["model.layers.0.mlp.gate_up_proj.weight"]
    moved["model.layers.0.mlp.gate_up_proj.weight"] = torch.cat([w[48:], w[:48]])  # gate <-> up
    assert_not_invariant(logits_fn(model, TOKENS), params, moved)


def test_qwen2_bias_must_move_with_its_rows():
    model = build_family("qwen2")
    spec = spec_from_hf(model)
    params = params_of(model)
    moved = act(spec, params, GroupElement.sample(spec, 1).restrict(["model.layers.0.self_attn.qk"]))
    moved["model.layers.0.self_attn.q_proj.bias"] = params["model.layers.0.self_attn.q_proj.bias"]
    assert_not_invariant(logits_fn(model, TOKENS), params, moved)


# ---------------------------------------------------------------------------------------------- refusals


def test_partial_rotary_is_refused_naming_the_option():
    from transformers import Phi3Config

    config = family_configs()["phi3"].to_dict()
    config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.5}
    with pytest.raises(UnsupportedArchitecture, match="rope_parameters.*partial_rotary_factor=0.5"):
        spec_from_hf(Phi3Config(**{k: v for k, v in config.items() if k != "model_type"}))


def test_unknown_rope_type_is_refused():
    config = family_configs()["mistral"]
    config = type(config)(**{**config.to_dict(), "rope_parameters": {"rope_type": "mystery", "rope_theta": 1e4}})
    with pytest.raises(UnsupportedArchitecture, match="rope_type 'mystery'"):
        spec_from_hf(config)


ROPE_VARIANTS = {
    "linear": ("mistral", {"factor": 2.0}),
    "dynamic": ("mistral", {"factor": 2.0}),
    "yarn": ("qwen2", {"factor": 4.0, "original_max_position_embeddings": 8}),
    "llama3": ("llama-bias", {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
    "longrope": ("phi3", {"short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 6.0], "original_max_position_embeddings": 8}),
}


@pytest.mark.parametrize("rope_type", sorted(ROPE_VARIANTS))
def test_frequency_only_rope_types_keep_the_group(rope_type):
    """RoPE variants that only change frequencies (and scale cos/sin): the rotation-scalings still commute."""
    from transformers import AutoModelForCausalLM

    name, extra = ROPE_VARIANTS[rope_type]
    config = family_configs()[name]
    values = {k: v for k, v in config.to_dict().items() if k != "model_type"}
    values["rope_parameters"] = {"rope_type": rope_type, "rope_theta": 1e4, **extra}
    if rope_type == "longrope":
        values["original_max_position_embeddings"] = 8
    config = type(config)(**values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape))
    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))  # past original_max_position_embeddings
    spec = spec_from_hf(model)
    assert spec.factors["model.layers.0.self_attn.qk"].kind == "rotation-scaling"
    assert_invariant(logits_fn(model, tokens), spec, params_of(model), n_samples=5, rtol=1e-5)


def test_gpt2_cross_attention_is_refused():
    config = configs()["gpt2"]
    config.add_cross_attention = True
    with pytest.raises(UnsupportedArchitecture, match="add_cross_attention=True"):
        spec_from_hf(config)


def test_unclassified_option_is_refused(monkeypatch):
    """An option the modeling code reads but the family record does not classify is refused, never ignored."""
    fam = hf.RECORDS["qwen3"]
    options = {k: v for k, v in fam.options.items() if k != "attention_bias"}
    monkeypatch.setitem(hf.RECORDS, "qwen3", dataclasses.replace(fam, options=options))
    with pytest.raises(UnsupportedArchitecture, match="attention_bias=False is not understood"):
        spec_from_hf(family_configs()["qwen3"])


def _read_by_modeling_code(model_type: str, config) -> set[str]:
    """Config attributes the causal LM's modeling file reads: ``getattr(config, "x", ...)`` always, ``config.x`` when the
    config has ``x`` (a multimodal file, e.g. Gemma3's, also reads its other configs' attributes)."""
    import inspect

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from symm.adapters.hf.encoders import ARCHITECTURES  # encoders: their head class (ViT has no causal LM)

    cls = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) or ARCHITECTURES[model_type][0]
    text = Path(inspect.getsourcefile(getattr(transformers, cls))).read_text()
    direct = set(re.findall(r"\bconfig\.([a-z][a-z0-9_]*)\b(?!\()", text))
    optional = set(re.findall(r"getattr\((?:self\.)?config, \"([a-z][a-z0-9_]*)\"", text))
    return {k for k in direct if hasattr(config, k)} | optional


@pytest.mark.parametrize("model_type", sorted(hf.RECORDS))
def test_every_option_the_installed_transformers_reads_is_classified(model_type):
    """Drift guard: every config attribute the modeling code reads, and every default key of the config class, has a
    verdict in the family record (size, handled option, or inert)."""
    from transformers import AutoConfig

    fam = hf.RECORDS[model_type]
    known = fam.classified()
    config = AutoConfig.for_model(model_type)
    aliases = getattr(type(config), "attribute_map", {})
    read = {aliases.get(k, k) for k in _read_by_modeling_code(model_type, config) | set(config.to_dict())}
    missing = sorted(read - known)
    assert not missing, f"{model_type}: unclassified config options {missing}"


def test_layout_drift_fails_at_spec_build_naming_parameters(monkeypatch):
    fam = hf.RECORDS["mistral"]
    monkeypatch.setitem(hf.RECORDS, "mistral", dataclasses.replace(fam, layer="model.blocks.{i}"))
    with pytest.raises(SpecError, match=r"layout drift.*model\.blocks\.0.*model\.layers\.0|layout drift.*model\.layers\.0"):
        spec_from_hf(family_configs()["mistral"])


def test_meta_check_is_cheap_and_cached():
    import time

    config = family_configs()["olmo2"]
    spec_from_hf(config)
    t = time.perf_counter()
    for _ in range(20):
        spec_from_hf(config)
    assert time.perf_counter() - t < 5.0


# ---------------------------------------------------------------------------------------------- symm describe / align


@pytest.mark.parametrize(
    "name, needles",
    [
        ("qwen3", ["QK-norm", "norm-scale", "hf-qwen3"]),
        ("olmo2", ["QK-norm over all heads", "hf-olmo2", "signed permutations"]),
        ("phi3", ["rotation-scaling", "fused qkv_proj", "hf-phi3"]),
        ("mistral", ["sliding window", "rotation-scaling"]),
        ("qwen2", ["biases move with their rows"]),
        ("gemma2", ["soft-capping", "(1 + w)", "sliding window"]),
        ("gemma3", ["QK-norm with (1 + w) gains", "norm-scale"]),
        ("olmoe", ["hf-olmoe", "QK-norm over all heads", "softmax gating adds a common translation", "norm_topk_prob"]),
        ("qwen3-moe", ["hf-qwen3-moe", "per-head QK-norm", "norm-scale", "softmax gating", "no shared expert"]),
        ("dots1", ["hf-dots1", "e_score_correction_bias moves with the experts", "group-limited top-k (1 of 2 groups)", "grouped-permutation", "shared experts are not routed", "no router translation"]),
        ("gpt-neox", ["hf-gpt-neox", "partial rotary (4 of 8 head dims)", "rotation-scaling", "parallel residual", "GL on the 4 pass-through dims"]),
    ],
)
def test_describe_states_group_and_reasons(name, needles, tmp_path, capsys):
    build_family(name).save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out, (needle, out[:2000])


@pytest.mark.parametrize(
    "name",
    ["mistral", "qwen2", "qwen3", "olmo2", "olmo2-bias", "phi3", "gemma", "gemma2", "gemma3", "llama-bias", "olmoe",
     "olmoe-norm-topk", "qwen3-moe", "qwen3-moe-step", "gpt-neox", "gpt-neox-seq-tied", "dots1", "dots1-ungrouped"],
)
def test_planted_recovery_through_symm_align(name, tmp_path):
    """B = g.A saved by save_pretrained; ``symm align A B`` gives back A (1e-4 relative) computing B's logits."""
    model = build_family(name, seed=0)
    spec = spec_from_hf(model)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    model.save_pretrained(a)
    params = params_of(model)
    moved = act(spec, params, GroupElement.sample(spec, 11))
    model.load_state_dict({k: v.to(params[k].dtype) for k, v in moved.items()})
    model.save_pretrained(b)
    before = sum(float((moved[k].double() - params[k].double()).pow(2).sum()) for k in params)
    assert math.sqrt(before / sum(float(v.double().pow(2).sum()) for v in params.values())) > 0.1  # g moved the weights
    assert main(["align", str(a), str(b), "--out", str(out), "--quiet", "--points", "3"]) == 0
    aligned, original_b = load_hf(out / "aligned_model"), load_hf(b)
    pa, pal = params_of(load_hf(a)), params_of(aligned)
    num = sum(float((pal[k].double() - pa[k].double()).pow(2).sum()) for k in pa)
    den = sum(float(pa[k].double().pow(2).sum()) for k in pa)
    assert math.sqrt(num / den) <= 1e-4, math.sqrt(num / den)
    with torch.no_grad():
        la, lb = aligned(TOKENS).logits, original_b(TOKENS).logits
    assert float((la - lb).abs().max() / lb.abs().max()) < 1e-4
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["format"] == "hf"


# ---------------------------------------------------------------------------------------------- OLMoE, Qwen3-MoE


def test_moe_qk_norm_family_groups():
    """OLMoE: OLMo2's attention group (QK-norm over all heads) in a pre-norm stream; Qwen3-MoE: Qwen3's (per-head
    QK-norm); both route with a top-k softmax (router rows move with the experts, plus a common translation)."""
    olmoe = spec_from_hf(family_configs()["olmoe"])
    assert _kinds(olmoe, "model.layers.0.self_attn") == {"heads": "head-permutation", "vo": "general-linear"}
    qwen3_moe = spec_from_hf(family_configs()["qwen3-moe"])
    assert _kinds(qwen3_moe, "model.layers.0.self_attn") == {
        "heads": "head-permutation", "vo": "general-linear", "q_scale": "norm-scale", "k_scale": "norm-scale", "qk_gain": "positive-scaling",
    }
    routed = {"gate.shift": "translation", "experts": "permutation", "expert_units": "permutation", "expert_units.scale": "positive-scaling",
              "expert_units.sign": "sign-flip"}
    for spec, layer in ((olmoe, 0), (olmoe, 1), (qwen3_moe, 0)):
        assert _kinds(spec, f"model.layers.{layer}.mlp") == routed, (spec.name, layer)
    assert _kinds(qwen3_moe, "model.layers.1.mlp") == {"units": "permutation", "units.scale": "positive-scaling", "units.sign": "sign-flip"}  # mlp_only_layers
    step = spec_from_hf(family_configs()["qwen3-moe-step"])  # decoder_sparse_step=2: layer 0 dense, layer 1 routed
    assert "model.layers.0.mlp.gate_proj.weight" in step.params and "model.layers.1.mlp.experts.gate_up_proj" in step.params
    assert not any("shared_expert" in k for k in step.params)
    for key, side in (("q_norm", "out"), ("k_norm", "in")):  # per-row gains over all heads move with their heads only
        (seg,) = olmoe.params[f"model.layers.0.self_attn.{key}.weight"].axes[0]
        assert [(a.factor, a.side) for a in seg.acts] == [("model.layers.0.self_attn.heads", side)]


def _moe_model(name):
    model = build_family(name)
    return model, params_of(model), logits_fn(model, TOKENS)


def _rel(f, moved, params):
    with torch.no_grad():
        ref = f(params)
        return float((f(moved) - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", ["olmoe", "olmoe-norm-topk", "qwen3-moe", "qwen3-moe-step"])
def test_router_translation_survives_norm_topk_prob_but_a_row_shift_does_not(name):
    """softmax(z + c) = softmax(z): a common shift of the router rows keeps top-k and its weights, renormalised over the
    k (norm_topk_prob) or not; shifting one expert's row alone changes routing weights (negative control)."""
    model, params, f = _moe_model(name)
    layer = 1 if name == "qwen3-moe-step" else 0
    key = f"model.layers.{layer}.mlp.gate.weight"
    c = 0.7 * torch.randn(32, generator=torch.Generator().manual_seed(3))
    common, one = dict(params), dict(params)
    common[key] = params[key] + c
    w = params[key].clone()
    w[1] += c
    one[key] = w
    assert _rel(f, common, params) < 1e-5
    assert_not_invariant(f, params, one)


@pytest.mark.parametrize("name", ["olmoe", "qwen3-moe"])
def test_experts_must_move_with_their_router_rows(name):
    model, params, f = _moe_model(name)
    perm = torch.tensor([2, 0, 3, 1])
    both, experts_only = dict(params), dict(params)
    for k in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        both[k] = experts_only[k] = params[k][perm]
    both["model.layers.0.mlp.gate.weight"] = params["model.layers.0.mlp.gate.weight"][perm]
    assert _rel(f, both, params) < 1e-5
    assert_not_invariant(f, params, experts_only)


def test_expert_unit_scale_must_stay_on_the_up_rows():
    """Per-expert SwiGLU: scaling the experts' up rows and dividing their down columns is a symmetry; on the gate rows
    (through SiLU) it is not."""
    model, params, f = _moe_model("olmoe")
    up, gate = dict(params), dict(params)
    gu, down = params["model.layers.0.mlp.experts.gate_up_proj"], params["model.layers.0.mlp.experts.down_proj"]
    a_units = torch.linspace(0.3, 3.0, 24)
    for moved, rows in ((up, slice(24, 48)), (gate, slice(0, 24))):
        a, b = gu.clone(), down.clone()
        a[:, rows] *= a_units[:, None]
        b /= a_units
        moved["model.layers.0.mlp.experts.gate_up_proj"], moved["model.layers.0.mlp.experts.down_proj"] = a, b
    assert _rel(f, up, params) < 1e-5
    assert_not_invariant(f, params, gate)


def test_olmoe_clip_qkv_and_head_dim_are_refused():
    from transformers import OlmoeConfig

    values = {k: v for k, v in family_configs()["olmoe"].to_dict().items() if k != "model_type"}
    with pytest.raises(UnsupportedArchitecture, match="clip_qkv=8.0 is not supported.*GL\\(d_h\\) on V/O"):
        spec_from_hf(OlmoeConfig(**{**values, "clip_qkv": 8.0}))
    with pytest.raises(UnsupportedArchitecture, match="head_dim=16.*hidden_size / num_attention_heads = 8"):
        spec_from_hf(OlmoeConfig(**{**values, "head_dim": 16}))


def test_clip_qkv_really_breaks_gl_on_vo():
    """Why clip_qkv is refused: with a clamp on v, the catalogued GL(d_h) on V/O no longer keeps the logits."""
    model, params, f = _moe_model("olmoe")
    spec = spec_from_hf(model)
    moved = act(spec, params, GroupElement.sample(spec, 5).restrict(["model.layers.0.self_attn.vo"]))
    assert _rel(f, moved, params) < 1e-5
    model.config.clip_qkv = 0.05
    assert_not_invariant(f, params, moved)
    model.config.clip_qkv = None


@pytest.mark.parametrize("model_type", ["deepseek_v2", "deepseek_v3"])
def test_multi_head_latent_attention_is_refused_with_the_reason(model_type, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    with pytest.raises(UnsupportedArchitecture, match=f"'{model_type}' is refused: multi-head latent attention"):
        spec_from_hf(config)
    if model_type == "deepseek_v3":
        with pytest.raises(UnsupportedArchitecture, match=r"catalogued \(family dots1.*MLA is the only blocker"):
            spec_from_hf(config)
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="multi-head latent attention"):
        load_hf(tmp_path)
    assert main(["describe", str(tmp_path)]) == 2


def test_any_latent_attention_config_is_refused_as_mla():
    """Another model_type with kv_lora_rank (MiniCPM3) gets the MLA reason, not just "no adapter"."""
    from transformers import AutoConfig

    with pytest.raises(UnsupportedArchitecture, match="'minicpm3' is refused: multi-head latent attention"):
        spec_from_hf(AutoConfig.for_model("minicpm3"))


# ---------------------------------------------------------------------------------------------- GPT-NeoX (gauged)


def _neox(parallel: bool, seed: int = 0):
    """The plain transformers model (not gauged): the by-hand derivation below acts on the fused layout itself."""
    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    config = GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, use_parallel_residual=parallel,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}, bos_token_id=0, eos_token_id=2,
    )
    return from_config(config, seed, build=AutoModelForCausalLM.from_config)


def _gl(n, gen):
    """A well-conditioned random element of GL(n) (the exponential of a small random matrix)."""
    return torch.linalg.matrix_exp(0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64))


def _rotation_scaling(n_pairs, gen):
    m = torch.zeros(n_pairs, 2, 2, dtype=torch.float64)
    for i in range(n_pairs):
        a, t = float(torch.empty(()).uniform_(0.5, 2.0, generator=gen)), float(torch.empty(()).uniform_(-3, 3, generator=gen))
        m[i] = a * torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    return m


def _neox_act(params, seed, qk="derived"):
    """The derived GPT-NeoX group, by hand: stream permutation (LayerNorm: no signs), head permutation (blocks of 3 d_h
    rows of query_key_value, d_h columns of dense), per head: a rotation-scaling per rotary pair (dims i, i + rot/2) on
    Q with its inverse transpose on K, GL on the pass-through dims (Q: A, K: A^{-T}), GL on V (F) and dense (F^{-1}),
    GELU units permuted. ``qk="full-gl"``: GL on all of a head's Q/K dims (a control), ``"wrong-pairs"``: the
    rotation-scalings on pairs (2i, 2i + 1) (a control)."""
    gen = torch.Generator().manual_seed(seed)
    d, n_heads, dh, rot, ffn = 32, 4, 8, 4, 48
    dtypes = {k: v.dtype for k, v in params.items()}
    params = {k: v.double() for k, v in params.items()}  # act in float64, store in the model's dtype
    out = {}
    stream = torch.randperm(d, generator=gen)
    for k, v in params.items():
        out[k] = v.clone()
    out["gpt_neox.embed_in.weight"] = params["gpt_neox.embed_in.weight"][:, stream]
    out["lm_head.weight"] = params["lm_head.weight"][:, stream]
    for k in ("weight", "bias"):
        out[f"gpt_neox.final_layer_norm.{k}"] = params[f"gpt_neox.final_layer_norm.{k}"][stream]
    for layer in range(2):
        b = f"gpt_neox.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            for k in ("weight", "bias"):
                out[f"{b}.{norm}.{k}"] = params[f"{b}.{norm}.{k}"][stream]
        heads = torch.randperm(n_heads, generator=gen)
        qkv_w = params[f"{b}.attention.query_key_value.weight"][:, stream].reshape(n_heads, 3, dh, d)[heads].clone()
        qkv_b = params[f"{b}.attention.query_key_value.bias"].reshape(n_heads, 3, dh)[heads].clone()
        dense = params[f"{b}.attention.dense.weight"][stream].reshape(d, n_heads, dh)[:, heads].clone()
        for h in range(n_heads):
            mq, mk = torch.eye(dh, dtype=torch.float64), torch.eye(dh, dtype=torch.float64)
            if qk == "full-gl":
                mq = _gl(dh, gen)
                mk = torch.linalg.inv(mq).T
            else:
                pairs = _rotation_scaling(rot // 2, gen)
                for i in range(rot // 2):
                    idx = [2 * i, 2 * i + 1] if qk == "wrong-pairs" else [i, i + rot // 2]
                    mq[[[idx[0]], [idx[1]]], idx] = pairs[i]
                    mk[[[idx[0]], [idx[1]]], idx] = torch.linalg.inv(pairs[i]).T
                a = _gl(dh - rot, gen)
                mq[rot:, rot:], mk[rot:, rot:] = a, torch.linalg.inv(a).T
            f = _gl(dh, gen)
            for role, m in ((0, mq), (1, mk), (2, f)):
                qkv_w[h, role] = m @ qkv_w[h, role]
                qkv_b[h, role] = m @ qkv_b[h, role]
            dense[:, h] = dense[:, h] @ torch.linalg.inv(f)
        out[f"{b}.attention.query_key_value.weight"] = qkv_w.reshape(3 * d, d)
        out[f"{b}.attention.query_key_value.bias"] = qkv_b.reshape(3 * d)
        out[f"{b}.attention.dense.weight"] = dense.reshape(d, d)
        out[f"{b}.attention.dense.bias"] = params[f"{b}.attention.dense.bias"][stream]
        units = torch.randperm(ffn, generator=gen)
        out[f"{b}.mlp.dense_h_to_4h.weight"] = params[f"{b}.mlp.dense_h_to_4h.weight"][units][:, stream]
        out[f"{b}.mlp.dense_h_to_4h.bias"] = params[f"{b}.mlp.dense_h_to_4h.bias"][units]
        out[f"{b}.mlp.dense_4h_to_h.weight"] = params[f"{b}.mlp.dense_4h_to_h.weight"][stream][:, units]
        out[f"{b}.mlp.dense_4h_to_h.bias"] = params[f"{b}.mlp.dense_4h_to_h.bias"][stream]
    return {k: v.to(dtypes[k]) for k, v in out.items()}


@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_derived_group_holds_on_logits(parallel):
    """The README's GPT-NeoX derivation (partial rotary: rotation-scalings on the rotary pairs, GL on the pass-through
    dims; interleaved [q_h | k_h | v_h]; parallel or sequential residual) on the transformers model's logits, 20
    elements; GL over a whole head's Q/K, or rotation-scalings on the wrong pairs, change the logits."""
    model = _neox(parallel)
    params = params_of(model)
    f = logits_fn(model, TOKENS)
    for seed in range(20):
        assert _rel(f, _neox_act(params, seed), params) < 1e-5, seed
    assert_not_invariant(f, params, _neox_act(params, 0, qk="full-gl"))
    assert_not_invariant(f, params, _neox_act(params, 0, qk="wrong-pairs"))


def test_gpt_neox_catalogued_group_is_the_derivation():
    """The catalogued factors per layer are the by-hand derivation above: heads, rotation-scalings on the rotary pairs,
    GL on the pass-through dims, GL on V/dense, GELU units (permutation only); full rotary has no pass-through GL."""
    spec = spec_from_hf(family_configs()["gpt-neox"])
    kinds = _kinds(spec, "gpt_neox.layers.0.attention")
    assert kinds == {"heads": "head-permutation", "qk_rot": "rotation-scaling", "qk_pass": "general-linear", "vo": "general-linear"}
    assert spec.factors["gpt_neox.layers.0.attention.qk_rot"].dim == 4 and spec.factors["gpt_neox.layers.0.attention.qk_pass"].dim == 4
    assert spec.factors["gpt_neox.layers.0.mlp.dense_h_to_4h.units"].kind == "permutation"
    full = family_configs()["gpt-neox"].to_dict()
    full["rope_parameters"] = {**full["rope_parameters"], "partial_rotary_factor": 1.0}
    from transformers import GPTNeoXConfig

    spec_full = spec_from_hf(GPTNeoXConfig(**{k: v for k, v in full.items() if k != "model_type"}))
    assert set(_kinds(spec_full, "gpt_neox.layers.0.attention")) == {"heads", "qk_rot", "vo"}


def test_gpt_neox_gauge_keeps_the_function_and_saves_the_fused_layout(tmp_path):
    """The gauge re-holds query_key_value without changing the logits; a saved folder has transformers' fused keys and
    loads in plain transformers (no symm) with the same logits."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from symm.adapters.hf.gauge import checkpoint_state_dict, gauge_model, merge_rows, split_rows

    plain = _neox(True)
    plain_keys = list(plain.state_dict())
    with torch.no_grad():
        ref = plain(TOKENS).logits
    fused = plain.gpt_neox.layers[0].attention.query_key_value.weight.detach().clone()
    assert torch.equal(merge_rows(split_rows(fused, 4, 8, 4), 4, 8, 4), fused)
    gauged = gauge_model(plain)
    assert gauge_model(gauged) is gauged and hf.is_gauged(gauged)
    with torch.no_grad():
        assert torch.equal(gauged(TOKENS).logits, ref)
    assert "gpt_neox.layers.0.attention.query_key_value.q_rot.weight" in gauged.state_dict()
    assert set(checkpoint_state_dict(gauged)) == set(plain_keys)
    gauged.save_pretrained(tmp_path / "a")  # a gauged model's own save_pretrained writes the fused layout
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in keys and not any(".q_rot." in k for k in keys)
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()(TOKENS).logits, ref)
    twin = copy.deepcopy(gauged)  # a copy saves its own weights, not the original's
    with torch.no_grad():
        twin.gpt_neox.layers[0].attention.query_key_value.v.weight.mul_(2.0)
    twin.save_pretrained(tmp_path / "b")
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        assert not torch.equal(f.get_tensor("gpt_neox.layers.0.attention.query_key_value.weight"), fused)


def test_gpt_neox_ungauged_model_gets_a_clear_error():
    with pytest.raises(SpecError, match="gauge_model"):
        spec_from_hf(_neox(True))


def test_gpt_neox_odd_rotary_dims_are_refused():
    from transformers import GPTNeoXConfig

    config = family_configs()["gpt-neox"].to_dict()
    config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": 0.375}  # 3 of 8 dims
    with pytest.raises(UnsupportedArchitecture, match="rope_parameters.*odd"):
        spec_from_hf(GPTNeoXConfig(**{k: v for k, v in config.items() if k != "model_type"}))


# ---------------------------------------------------------------------------------------------- DeepSeek-V3-style router (Dots1)


def _move_experts(params, layer, order, bias=True, shift=0.0):
    """Reorder the experts of ``layer`` (router rows, experts' weights, and the score bias if ``bias``); add ``shift``
    to every router row."""
    out = dict(params)
    b = f"model.layers.{layer}.mlp"
    for key in (f"{b}.gate.weight", f"{b}.experts.gate_up_proj", f"{b}.experts.down_proj") + ((f"{b}.gate.e_score_correction_bias",) if bias else ()):
        out[key] = params[key][order]
    out[f"{b}.gate.weight"] = out[f"{b}.gate.weight"] + shift
    return out


def test_dots1_router_group():
    """8 experts in 2 groups of 4, top-2 inside the best group. Within-group expert permutations with their score bias keep the logits; moving an expert to another group,
    leaving the score bias behind, or a common router translation (sigmoid gates) change them."""
    model = build_family("dots1")
    params = params_of(model)
    f = logits_fn(model, TOKENS)
    spec = spec_from_hf(model)
    assert spec.factors["model.layers.1.mlp.experts"].kind == "grouped-permutation"
    assert spec.factors["model.layers.1.mlp.experts"].groups == 2
    assert not any(n.startswith("model.layers.1.mlp.gate.") for n in spec.factors)  # no router translation
    assert "model.layers.0.mlp.experts" not in spec.factors  # first_k_dense_replace = 1: layer 0 is dense
    within, groups_swap, across = [1, 3, 0, 2, 6, 4, 7, 5], [4, 5, 6, 7, 0, 1, 2, 3], [0, 1, 5, 3, 4, 2, 6, 7]
    assert _rel(f, _move_experts(params, 1, within), params) < 1e-5
    assert _rel(f, _move_experts(params, 1, groups_swap), params) < 1e-5
    assert_not_invariant(f, params, _move_experts(params, 1, across))  # expert 2 <-> 5 across the 2 groups of 4
    assert_not_invariant(f, params, _move_experts(params, 1, within, bias=False))
    assert_not_invariant(f, params, _move_experts(params, 1, list(range(8)), shift=0.5 * torch.randn(32, generator=torch.Generator().manual_seed(3))))
    ungrouped = spec_from_hf(family_configs()["dots1-ungrouped"])
    assert ungrouped.factors["model.layers.0.mlp.experts"].kind == "permutation"  # n_group = 1: any expert order


def test_dots1_expert_groups_must_divide_the_experts():
    from transformers import Dots1Config

    config = family_configs()["dots1"].to_dict()
    config["n_group"] = 3
    with pytest.raises(UnsupportedArchitecture, match="n_group=3.*do not split"):
        spec_from_hf(Dots1Config(**{k: v for k, v in config.items() if k != "model_type"}))
