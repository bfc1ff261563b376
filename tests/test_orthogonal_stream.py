"""Orthogonal residual stream of RMSNorm and LayerNorm decoders: fold / unfold gauges, the orthogonal action on
folded weights (reference model and transformers logits; O 1 = 1 for LayerNorm), negative controls, planted
recovery by alternating Procrustes with weight matching, and refusal of tied embeddings."""

from __future__ import annotations

import pytest
import torch

from aligners import weight_matching
from aligners.orthogonal_stream import align_orthogonal, free_tensors, match_orthogonal, stream_factors, stream_objective
from hf_models import VOCAB, build, build_family, family_configs, from_config, logits_fn, params_of
from planted import reference_params, rel_distance
from symm.action import act
from symm.adapters import spec_from_hf
from symm.element import GroupElement
from symm.errors import SpecError, UnsupportedArchitecture
from symm.evaluate import functional
from symm.folding import (
    act_orthogonal,
    centre_writers,
    derive_layout,
    fold,
    gains_of,
    layout_for,
    random_orthogonal,
    stream_tensors,
    unfold,
)
from symm.models import TransformerConfig, build_model, spec_for

REFERENCE = {
    "rope-swiglu-gqa": TransformerConfig(norm="rms", pe="rope", n_kv_heads=2),
    "learned-gelu-bias": TransformerConfig(norm="rms", pe="learned", ffn="gelu", attn_bias=True),
    "none-moe-shared": TransformerConfig(norm="rms", pe="none", ffn="moe", gating="topk", shared_expert=True, router_bias=True),
    "rope-qknorm-moe-dense": TransformerConfig(norm="rms", pe="rope", n_kv_heads=1, qk_norm=True, ffn="moe", gating="dense"),
    "layer-rope-gqa": TransformerConfig(norm="layer", pe="rope", n_kv_heads=2),
    "layer-learned-gelu-bias": TransformerConfig(norm="layer", pe="learned", ffn="gelu", attn_bias=True),
}
HF = ["llama-mqa-untied", "llama-gqa-untied", "mixtral", "qwen2-moe", "gpt2-untied", "mistral", "qwen3", "phi3", "llama-bias", "gemma-untied", "olmoe", "qwen3-moe"]
FINAL_NORMS = ("norm.weight", "model.norm.weight", "transformer.ln_f.weight")


def _hf(name: str, seed: int = 0):
    """``hf_models.build`` / ``build_family`` plus untied GQA Llama, GPT-2 and Gemma (not in the shared tables)."""
    if name in family_configs():
        return build_family(name, seed)
    if name not in ("llama-gqa-untied", "gpt2-untied", "gemma-untied"):
        return build(name, seed)
    from transformers import GemmaConfig, GPT2Config, LlamaConfig

    if name == "gemma-untied":  # (1 + w) gains
        config = GemmaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            intermediate_size=48, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    elif name == "gpt2-untied":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB, tie_word_embeddings=False)
    else:
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, tie_word_embeddings=False,
        )
    return from_config(config, seed)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _orthogonal(layout, seed: int) -> torch.Tensor:
    """A random element of the layout's stream group: any orthogonal O (RMSNorm), O 1 = 1 (LayerNorm)."""
    return random_orthogonal(layout.d, torch.Generator().manual_seed(seed), layout.centred)


def _reference(name: str):
    config = REFERENCE[name]
    model = build_model(config).double().eval()
    params = reference_params(config, 0)  # float64, gains 1 + N(0, 0.3^2)
    tokens = torch.randint(0, config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    f = functional(model)
    return spec_for(config), layout_for(config, params), params, lambda p: f(p, tokens)


def _hf_case(name: str, seed: int = 0):
    model = _hf(name, seed)
    params = params_of(model)
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    return spec_from_hf(model), layout_for(model, params), params, logits_fn(model, tokens)


# ----- layouts ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REFERENCE) + HF)
def test_layout_covers_every_parameter(name):
    spec, layout, params, _ = _reference(name) if name in REFERENCE else _hf_case(name)
    n_layers = 2
    assert len(layout.norms) == 2 * n_layers + 1
    readers = [r for n in layout.norms for r in n.readers]
    assert sorted(readers) == sorted(layout.readers)  # every reader reads exactly one norm
    assert set(layout.gains) | {t.name for t in layout.tensors} | set(layout.untouched) == set(params)
    final = next(n for n in layout.norms if n.name in FINAL_NORMS)
    assert final.readers == ("lm_head.weight",)
    assert layout.centred == ("layer" in name or "gpt2" in name)
    assert all((n.bias is not None) == layout.centred for n in layout.norms)  # LayerNorm biases belong to their gains
    stream = ["stream"] if layout.centred else ["stream", "stream.sign"]  # LayerNorm: no per-channel signs
    assert stream_factors(spec, layout) == stream
    assert {"lm_head.weight"} <= set(free_tensors(spec, layout, stream))
    for t in layout.tensors:
        assert params[t.name].shape[t.axis] == layout.d


def test_unknown_layouts_refused():
    _, _, params, _ = _reference("rope-swiglu-gqa")
    with pytest.raises(UnsupportedArchitecture, match="blocks.0.attn.extra.weight"):
        derive_layout({**params, "blocks.0.attn.extra.weight": torch.zeros(3, 32)}, "reference")
    with pytest.raises(UnsupportedArchitecture, match="no stream layout for family"):
        derive_layout(params, "gpt-j")
    with pytest.raises(SpecError, match="stream axis"):
        derive_layout({**params, "blocks.0.attn.o_proj.weight": torch.zeros(31, 32)}, "reference")
    layer = TransformerConfig(norm="layer", pe="rope")
    with pytest.raises(UnsupportedArchitecture, match="norm bias.*expect RMSNorm"):  # LayerNorm under RMSNorm rules
        derive_layout(reference_params(layer, 0), "reference")
    sinus = TransformerConfig(norm="rms", pe="sinusoidal")
    with pytest.raises(UnsupportedArchitecture, match="sinusoidal"):
        layout_for(sinus, reference_params(sinus, 0))
    gpt2 = build("gpt2")  # ties by default
    with pytest.raises(UnsupportedArchitecture, match="tied embeddings"):
        layout_for(gpt2, params_of(gpt2))
    xglm = build("xglm")
    with pytest.raises(UnsupportedArchitecture, match="xglm"):
        layout_for(xglm, params_of(xglm))


def test_tied_models_refused():
    tied = TransformerConfig(norm="rms", pe="rope", tied=True)
    with pytest.raises(UnsupportedArchitecture, match="tied embeddings.*O diag\\(g\\) O\\^T"):
        layout_for(tied, reference_params(tied, 0))
    model = build("llama-gqa-tied")
    with pytest.raises(UnsupportedArchitecture, match="tied embeddings"):
        layout_for(model, params_of(model))
    # the same tensor under two names is refused even without a config
    with pytest.raises(UnsupportedArchitecture, match="one tensor"):
        derive_layout(model.state_dict(), "llama")


# ----- fold / unfold / act -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rope-swiglu-gqa", "none-moe-shared"])
def test_fold_unfold_round_trip_float64(name):
    _, layout, params, _ = _reference(name)
    folded = fold(params, layout)
    assert all(torch.equal(folded[g], torch.ones_like(params[g])) for g in layout.gains)
    back = unfold(folded, layout, gains_of(params, layout))
    assert all(torch.equal(back[g], params[g]) for g in layout.gains)  # gains exactly
    assert max(_rel(back[k], params[k]) for k in params) <= 1e-15  # measured 1.7e-16 (one float64 rounding)
    assert all(torch.equal(back[k], params[k]) for k in layout.writers)  # writers are never touched
    with pytest.raises(SpecError, match="folded"):
        unfold(params, layout, gains_of(params, layout))


def test_fold_unfold_layernorm():
    """LayerNorm: biases b -> b / g and back; writers untouched (their mean, which no reader sees, can be removed
    by centre_writers without changing the function)."""
    _, layout, params, f = _reference("layer-learned-gelu-bias")
    folded = fold(params, layout)
    assert layout.centred and all(n.bias for n in layout.norms)
    for n in layout.norms:
        assert torch.allclose(folded[n.bias], params[n.bias] / params[n.name], rtol=1e-15, atol=0)
    for w in layout.writers:
        axis = layout.axis_of(w)
        assert float(params[w].mean(axis).abs().max()) > 1e-3  # the reference writers are not centred ...
        assert torch.equal(folded[w], params[w])  # ... and folding leaves them alone
        assert float(centre_writers(params, layout)[w].mean(axis).abs().max()) <= 1e-15
    assert _rel(f(centre_writers(params, layout)), f(params)) <= 1e-12  # centring keeps the function
    back = unfold(folded, layout, gains_of(params, layout))
    assert max(_rel(back[k], params[k]) for k in params) <= 1e-15
    assert all(torch.equal(back[g], params[g]) for g in layout.gains)
    with pytest.raises(SpecError, match="folded"):
        unfold(params, layout, gains_of(params, layout))


@pytest.mark.parametrize("name", HF)
def test_fold_unfold_round_trip_float32(name):
    _, layout, params, _ = _hf_case(name)
    back = unfold(fold(params, layout), layout, gains_of(params, layout))
    assert all(back[k].dtype == torch.float32 for k in back)
    assert all(torch.equal(back[g], params[g]) for g in layout.gains)
    assert max(_rel(back[k], params[k]) for k in params) <= 3e-7  # measured <= 1.1e-7: the folded weights are stored in float32


@pytest.mark.parametrize("name", list(REFERENCE))
def test_reference_model_fold_and_rotation_keep_the_function(name):
    _, layout, params, f = _reference(name)
    base = f(params)
    folded = fold(params, layout)
    assert _rel(f(folded), base) <= 1e-12
    for seed in range(3):
        O = _orthogonal(layout, seed)
        moved = act_orthogonal(folded, layout, O)
        assert _rel(f(moved), base) <= 1e-12
        # the rows of every stream tensor move as v -> O v
        st, sm = stream_tensors(folded, layout), stream_tensors(moved, layout)
        assert all(torch.allclose(sm[k], st[k] @ O.T, atol=1e-13) for k in st)
        # negative control: O on the unfolded weights (non-unit gains) changes the function
        assert _rel(f(act_orthogonal(params, layout, O, require_folded=False)), base) > 1e-2
    with pytest.raises(SpecError, match="fold the parameters first"):
        act_orthogonal(params, layout, O)
    with pytest.raises(SpecError, match="not orthogonal"):
        act_orthogonal(folded, layout, 2 * O)
    if layout.centred:  # LayerNorm: an O that moves the all-ones vector is refused, and would change the function
        free = random_orthogonal(layout.d, torch.Generator().manual_seed(5))
        with pytest.raises(SpecError, match="all-ones"):
            act_orthogonal(folded, layout, free)
        assert _rel(f(act_orthogonal(folded, layout, free, require_folded=False)), base) > 1e-2


@pytest.mark.parametrize("name", HF)
def test_transformers_logits_fold_and_rotation(name):
    _, layout, params, f = _hf_case(name)
    base = f(params)
    folded = fold(params, layout)
    assert _rel(f(folded), base) <= 1e-5  # measured <= 3.7e-7
    for seed in range(3):
        O = _orthogonal(layout, seed)
        assert _rel(f(act_orthogonal(folded, layout, O)), base) <= 1e-5  # measured <= 4.6e-7
        assert _rel(f(act_orthogonal(params, layout, O, require_folded=False)), base) > 1e-2  # measured > 1


# ----- alignment -----------------------------------------------------------------------------------------------
def _plant(spec, layout, params, seed: int):
    """B = unfold(O . h . fold(A), random positive gains): A's function with other gains, a rotated stream and
    every other factor (heads, GL / RoPE per head, units, experts, translations) moved."""
    stream = stream_factors(spec, layout)
    h = GroupElement.sample(spec, seed).replace(**{n: spec.factors[n].identity() for n in stream})
    p64 = {k: v.double() for k, v in params.items()}
    O = _orthogonal(layout, seed + 100)
    gen = torch.Generator().manual_seed(seed + 200)
    gains_b = {g: 0.5 + torch.rand(layout.d, generator=gen, dtype=torch.float64) for g in layout.gains}
    b = unfold(act_orthogonal(act(spec, fold(p64, layout), h), layout, O), layout, gains_b)
    return {k: v.to(params[k].dtype) for k, v in b.items()}



def _check_planted(spec, layout, a, f, tol_fn, tol_dist, **kwargs):
    b = _plant(spec, layout, a, seed=7)
    base = f(a)
    assert _rel(f(b), base) <= tol_fn  # B computes A's function ...
    assert rel_distance(b, a) > 0.5  # ... with very different weights
    result = match_orthogonal(spec, layout, a, b, **kwargs)
    O, g = result
    assert O.shape == (layout.d, layout.d) and result.converged
    aligned = result(b)
    assert _rel(f(aligned), f(b)) <= tol_fn  # aligned B computes B's function
    assert all(torch.equal(aligned[k], a[k]) for k in layout.gains)  # and carries A's gains exactly
    dist = rel_distance(aligned, a)
    assert dist <= tol_dist, dist
    for name in stream_factors(spec, layout):
        assert spec.factors[name].is_identity(g.values[name], atol=0.0)
    return result


@pytest.mark.parametrize("name", ["rope-swiglu-gqa", "learned-gelu-bias", "none-moe-shared", "layer-rope-gqa", "layer-learned-gelu-bias"])
def test_planted_recovery_reference(name):
    spec, layout, params, f = _reference(name)
    result = _check_planted(spec, layout, params, f, tol_fn=1e-12, tol_dist=1e-9)  # measured <= 4.4e-15
    assert result.rounds == 1  # the first fit (embeddings, lm_head, writer biases) finds O exactly


@pytest.mark.parametrize("name", HF)
def test_planted_recovery_transformers(name):
    spec, layout, params, f = _hf_case(name)
    _check_planted(spec, layout, params, f, tol_fn=1e-5, tol_dist=1e-5)  # measured <= 3.6e-6 (fn <= 3.7e-7)


@pytest.mark.parametrize("name", ["rope-swiglu-gqa", "llama-gqa-untied", "gpt2-untied"])
def test_planted_recovery_by_alternation(name):
    """First fit on every stream tensor (heads and units still scrambled): the alternation has to do the work."""
    spec, layout, params, f = _reference(name) if name in REFERENCE else _hf_case(name)
    double = name in REFERENCE
    result = _check_planted(spec, layout, params, f, tol_fn=1e-12 if double else 1e-5, tol_dist=1e-9 if double else 1e-5, first_fit="all")
    assert result.rounds >= 5 and result.distances[0] > 1e-2  # measured 8 rounds (3.7e-2 -> 5.9e-12); 14 (0.90 -> 2.1e-8)
    assert all(later < 0.5 * earlier for earlier, later in zip(result.distances[:5], result.distances[1:5]))


def test_independent_models_alternation():
    """Two unrelated models: the orthogonal stream gets closer (folded) than signed permutations, keeps B's
    function, and a lerp of the two checkpoints is the lerp of the folded models (same gains)."""
    spec, layout, a, f = _hf_case("llama-mqa-untied", seed=0)
    _, _, b, _ = _hf_case("llama-mqa-untied", seed=1)
    result = match_orthogonal(spec, layout, a, b, max_outer=3)
    assert result.rounds == 3 and result.objectives[-1] < result.objectives[0]
    # the kept round is the one of smallest stream objective (what Procrustes minimises), not of smallest folded distance
    kept = min(range(result.rounds), key=result.objectives.__getitem__)
    assert stream_objective(fold(a, layout), result.folded(b), layout) == pytest.approx(result.objectives[kept], rel=1e-9)
    aligned = result(b)
    assert _rel(f(aligned), f(b)) <= 1e-5
    signed = act(spec, b, weight_matching(spec, a, b, progress=False))
    fa = fold(a, layout)
    d_orth, d_signed = rel_distance(fold(aligned, layout), fa), rel_distance(fold(signed, layout), fa)
    assert d_orth < 0.95 * d_signed, (d_orth, d_signed)  # measured 0.903 vs 1.054 (3 rounds)
    a64, al64 = ({k: v.double() for k, v in p.items()} for p in (a, aligned))
    mid = {k: 0.5 * (a64[k] + al64[k]) for k in a}
    fa64, fal64 = fold(a64, layout), fold(al64, layout)
    assert max(_rel(fold(mid, layout)[k], 0.5 * (fa64[k] + fal64[k])) for k in a) <= 1e-12
    assert torch.equal(align_orthogonal(spec, layout, a, b, max_outer=1)["model.norm.weight"], a["model.norm.weight"])


def test_tied_models_keep_only_the_gain_stabiliser():
    """Tied embeddings: E is the first writer and, through the final gain g, the last reader, so O survives iff
    O^T diag(g) O = diag(g). A rotation in the plane of two channels survives when their final gains are equal and
    breaks the logits when they differ; signed permutations survive whatever g is (the catalogue's group)."""
    config = TransformerConfig(norm="rms", pe="rope", n_kv_heads=2, tied=True)
    model = build_model(config).double().eval()
    base_params = reference_params(config, 0)
    tokens = torch.randint(0, config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    f = functional(model)
    assert "lm_head.weight" not in base_params  # the tied reference model reads embed.weight as its head
    untied = lambda p: {**p, "lm_head.weight": p["embed.weight"].clone()}  # noqa: E731
    layout = derive_layout(untied(base_params), "reference")  # the layout of an untied copy
    c, s = 0.6, 0.8
    O = torch.eye(layout.d, dtype=torch.float64)
    O[:2, :2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)

    def rotate(params):
        moved = act_orthogonal(fold(untied(params), layout), layout, O)  # every gain folded, rows v -> O v
        moved["norm.weight"] = params["norm.weight"]  # the tied model keeps its final gain g ...
        del moved["lm_head.weight"]  # ... and its head is the rotated embedding E O^T
        return moved

    for equal, expect_kept in ((True, True), (False, False)):
        params = dict(base_params)
        g = params["norm.weight"].clone()
        g[1] = g[0] if equal else g[0] + 0.5
        params["norm.weight"] = g
        base = f(params, tokens)
        err = _rel(f(rotate(params), tokens), base)
        assert (err <= 1e-12) if expect_kept else (err > 1e-3), (equal, err)
    # signed permutations (the catalogue's stream group for tied RMSNorm models) keep the function for any g
    spec = spec_for(config)
    g = GroupElement.sample(spec, 5, only=["stream", "stream.sign"])
    assert _rel(f(act(spec, base_params, g), tokens), f(base_params, tokens)) <= 1e-12


def test_vit_orthogonal_stream():
    """ViT (pre-LN with bias, patch conv + CLS + position embeddings writing the stream): a random O with O 1 = 1
    keeps the logits of the folded model, and a planted element is recovered."""
    import test_hf_encoders as enc

    model = enc.build("vit")
    params = enc.params_of(model)
    f = enc.logits_fn(model, enc.inputs_for("vit"))
    spec, layout = spec_from_hf(model), layout_for(model, params)
    assert layout.centred and "vit.embeddings.patch_embeddings.projection.weight" in layout.writers
    base = f(params)
    folded = fold(params, layout)
    for seed in range(3):
        O = _orthogonal(layout, seed)
        assert _rel(f(act_orthogonal(folded, layout, O)), base) <= 1e-5  # measured 2.3e-6
        assert _rel(f(act_orthogonal(params, layout, O, require_folded=False)), base) > 1e-2
    _check_planted(spec, layout, params, f, tol_fn=1e-5, tol_dist=1e-4)  # measured 6.6e-6
