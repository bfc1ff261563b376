"""Families as data: Mistral, Qwen2, Qwen3, OLMo2, Phi-3 (and Llama with biases), checked on the logits of the
``transformers`` models themselves (float32), with negative controls, planted recovery through ``symm align``,
refusal of config options the adapters do not derive, and the meta-device layout check."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from hf_models import VOCAB, build_family, configs, family_configs, logits_fn, params_of
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


@pytest.mark.parametrize("name", ["qwen3", "olmo2"])
def test_qk_norm_kills_rope_rotations_on_qk(name):
    model = build_family(name)
    params = params_of(model)
    f = logits_fn(model, TOKENS)
    assert_not_invariant(f, params, _pair_rotation(params, "model.layers.0.self_attn", 8, 2, angle=0.9))


@pytest.mark.parametrize("name", ["qwen3", "olmo2"])
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
    """Qwen3's per-head norm absorbs a query head's scale; OLMo2's norm over all heads does not."""
    for name, symmetric in (("qwen3", True), ("olmo2", False)):
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

    text = Path(inspect.getsourcefile(getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]))).read_text()
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
    ],
)
def test_describe_states_group_and_reasons(name, needles, tmp_path, capsys):
    build_family(name).save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for needle in needles:
        assert needle in out, (needle, out[:2000])


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "olmo2", "olmo2-bias", "phi3", "gemma", "gemma2", "gemma3", "llama-bias"])
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
