"""Hugging Face adapters, checked on the logits of the transformers models themselves (float32: several
HF modules compute norms/routers in float32, so float64 would not be more precise)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hf_models import VOCAB, build, configs, logits_fn, params_of
from symm.action import act
from symm.adapters import load_hf, spec_from_hf
from symm.cli import main
from symm.element import GroupElement
from symm.errors import SpecError, UnsupportedArchitecture
from symm.testing import assert_invariant, assert_not_invariant

NAMES = list(configs())


@pytest.mark.parametrize("name", NAMES)
def test_hf_logits_preserved(name):
    model = build(name)
    spec = spec_from_hf(model)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    f = logits_fn(model, tokens)
    params = params_of(model)
    assert_invariant(f, spec, params, n_samples=20, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_spec_from_config_matches_model(name):
    model = build(name)
    spec = spec_from_hf(configs()[name])
    spec.check_params(model.state_dict())
    assert spec == spec_from_hf(model)


@pytest.mark.parametrize("name", ["llama-gqa-tied", "mixtral", "qwen2-moe"])
def test_rope_layout_and_gqa(name):
    spec = spec_from_hf(configs()[name])
    qk = spec.factors["model.layers.0.self_attn.qk"]
    heads = spec.factors["model.layers.0.self_attn.heads"]
    assert qk.kind == "rotation-scaling" and qk.layout == "half"
    assert qk.dimension == heads.groups * heads.head_dim
    assert spec.factors["model.layers.0.self_attn.vo"].dimension == heads.groups * heads.head_dim**2


def test_gpt2_and_xglm_qk_are_general_linear():
    for name in ("gpt2", "xglm"):
        spec = spec_from_hf(configs()[name])
        prefix = "transformer.h.0.attn" if name == "gpt2" else "model.layers.0.self_attn"
        assert spec.factors[f"{prefix}.qk"].kind == "general-linear"
        assert spec.factors[f"{prefix}.qk"].dimension == 4 * 8 * 8
    assert "stream" not in spec_from_hf(configs()["xglm"]).factors  # fixed sinusoidal table pins the stream
    assert "stream" in spec_from_hf(configs()["gpt2"]).factors  # learned wpe moves with it


def test_qwen2_moe_translation_and_shared_expert():
    spec = spec_from_hf(configs()["qwen2-moe"])
    assert "model.layers.0.mlp.gate.shift" in spec.factors
    assert "model.layers.1.mlp.gate.shift" not in spec.factors  # layer 1 is a dense MLP (mlp_only_layers)
    shared_params = [p for p in spec.params if "shared_expert" in p]
    for p in shared_params:
        factors = spec.params[p].factors()
        assert "model.layers.0.mlp.experts" not in factors


def test_mixtral_routing_decision_unchanged():
    model = build("mixtral")
    spec = spec_from_hf(model)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    params = params_of(model)

    def selected(p):
        model.load_state_dict(p)
        with torch.no_grad():
            out = model(tokens, output_router_logits=True)
        return [logits.topk(2, dim=-1).indices.sort(-1).values for logits in out.router_logits]

    before = selected(params)
    for seed in range(20):
        g = GroupElement.sample(spec, seed)
        after = selected(act(spec, params, g))
        for layer, (b, a) in enumerate(zip(before, after)):
            perm = g.values[f"model.layers.{layer}.mlp.experts"]
            assert torch.equal(perm[a].sort(-1).values, b)
    model.load_state_dict(params)


def test_qwen2_moe_shared_expert_permuted_as_routed_breaks():
    model = build("qwen2-moe")
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    f = logits_fn(model, tokens)
    params = params_of(model)
    moved = dict(params)
    key = "model.layers.0.mlp.shared_expert.up_proj.weight"
    moved[key] = params[key][torch.randperm(params[key].shape[0], generator=torch.Generator().manual_seed(0))]
    assert_not_invariant(f, params, moved)


@pytest.mark.parametrize("name", NAMES)
def test_save_pretrained_round_trip(name, tmp_path):
    """Spec from a folder == spec from the model; act on loaded weights, save, reload: same logits."""
    model = build(name)
    src = tmp_path / "src"
    model.save_pretrained(src)
    assert (src / "model.safetensors").is_file()
    loaded = load_hf(src)
    spec = spec_from_hf(src)
    assert spec == spec_from_hf(loaded)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(tokens).logits
    params = params_of(loaded)
    moved = act(spec, params, GroupElement.sample(spec, 0))
    loaded.load_state_dict(moved)
    dst = tmp_path / "dst"
    loaded.save_pretrained(dst)
    again = load_hf(dst)
    with torch.no_grad():
        err = ((again(tokens).logits - reference).abs().max() / reference.abs().max()).item()
    assert err < 1e-5
    changed = [k for k, v in params_of(again).items() if not torch.equal(v, params[k])]
    assert changed, "the random element should move the weights"


def test_mixtral_disk_layout_is_per_expert(tmp_path):
    model = build("mixtral")
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in keys or any(".experts.0." in k for k in keys)
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)
    spec = spec_from_hf(tmp_path)  # built for the in-memory (fused) layout
    assert "model.layers.0.mlp.experts.gate_up_proj" in spec.params


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPTJConfig  # (BERT is supported: symm/adapters/hf/encoders.py)

    with pytest.raises(UnsupportedArchitecture, match="'gptj'.*supported: gpt2"):
        spec_from_hf(GPTJConfig())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gptj"}))
    with pytest.raises(UnsupportedArchitecture, match="gptj"):
        spec_from_hf(tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="config.json"):
        spec_from_hf(tmp_path / "missing")


def test_layout_mismatch_is_reported():
    model = build("llama-gqa-tied")
    other = configs()["llama-mqa-untied"]
    with pytest.raises(SpecError, match="k_proj"):
        spec_from_hf(other).check_params(model.state_dict())


@pytest.mark.parametrize("name", ["llama-gqa-tied", "qwen2-moe", "xglm"])
def test_describe_cli_on_folder(name, tmp_path, capsys):
    model = build(name)
    model.save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "block" in out.lower()
    if name != "xglm":
        assert "rotation-scaling" in out and "RoPE" in out
    else:
        assert "sinusoidal" in out
