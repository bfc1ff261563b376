"""Layer-wise weight matching (``aligners/layerwise.py``): planted elements recovered exactly with one block of
tensors read at a time, on the transformers models' own specs."""

from __future__ import annotations

import math

import pytest
import torch

from aligners.layerwise import LayerwiseInfo, blocks, layerwise_matching, stream_family, sub_spec
from hf_models import build, build_family, params_of
from symm.action import act
from symm.adapters import spec_from_hf
from symm.element import GroupElement


def _rel(x, y) -> float:
    num = sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in y)
    return math.sqrt(num / sum(float(v.double().pow(2).sum()) for v in y.values()))


def _reader(params, calls):
    def read(keys):
        calls.append(list(keys))
        return {k: params[k].clone() for k in keys}

    return read


@pytest.mark.parametrize("name", ["llama-gqa-tied", "llama-mqa-untied", "mixtral", "qwen2-moe", "gpt2", "gpt-neox", "qwen3", "dots1"])
def test_planted_element_is_recovered_block_by_block(name):
    model = build_family(name) if name in ("gpt-neox", "qwen3", "dots1") else build(name)
    spec = spec_from_hf(model)
    a = {k: v.double() for k, v in params_of(model).items()}
    b = act(spec, a, GroupElement.sample(spec, 7))
    assert _rel(b, a) > 0.1
    calls_a, calls_b = [], []
    info = LayerwiseInfo()
    g = layerwise_matching(spec, _reader(a, calls_a), _reader(b, calls_b), info=info)
    assert _rel(act(spec, b, g), a) <= 1e-6, _rel(act(spec, b, g), a)
    assert info.converged and info.sweeps <= 3
    # one block at a time: every read is one block's keys, and all of them together cover the model
    parts = {tuple(p) for p in blocks(spec, stream_family(spec))}
    assert all(tuple(c) in parts for c in calls_a + calls_b)
    assert {k for c in calls_b for k in c} == set(spec.params)
    assert max(len(c) for c in calls_b) == info.largest_block < len(spec.params) / 2


def test_blocks_are_layers_attention_and_mlp():
    spec = spec_from_hf(build("llama-mqa-untied"))
    parts = blocks(spec, stream_family(spec))
    attention = [p for p in parts if any(k.endswith("q_proj.weight") for k in p)]
    assert len(attention) == 2 and all(len(p) == 4 for p in attention)  # q, k, v, o of one layer
    mlp = [p for p in parts if any(k.endswith("gate_proj.weight") for k in p)]
    assert len(mlp) == 2 and all(len(p) == 3 for p in mlp)
    singles = [p for p in parts if len(p) == 1]  # embedding, lm_head, every norm
    assert len(singles) == 2 + 2 * 2 + 1
    assert set(sub_spec(spec, attention[0]).factors) >= {"stream", "stream.sign", "model.layers.0.self_attn.heads"}


def test_fixed_stream_signs_stay_fixed():
    model = build("llama-gqa-tied")
    spec = spec_from_hf(model)
    a = {k: v.double() for k, v in params_of(model).items()}
    g0 = GroupElement.sample(spec, 3).replace(**{"stream.sign": spec.factors["stream.sign"].identity()})
    b = act(spec, a, g0)
    g = layerwise_matching(spec, _reader(a, []), _reader(b, []), fixed_stream={"stream.sign": spec.factors["stream.sign"].identity()})
    assert torch.equal(g.values["stream.sign"], spec.factors["stream.sign"].identity())
    assert _rel(act(spec, b, g), a) <= 1e-6


def test_on_an_unplanted_pair_it_gets_close_to_the_full_matcher():
    """Two independent random models: both matchers lower the distance; the layer-wise answer is within 5% of the
    full matcher's (different visiting orders of the same block-coordinate ascent)."""
    from aligners import weight_matching

    spec = spec_from_hf(build("llama-gqa-tied"))
    a = {k: v.double() for k, v in params_of(build("llama-gqa-tied", seed=0)).items()}
    b = {k: v.double() for k, v in params_of(build("llama-gqa-tied", seed=1)).items()}
    full = _rel(act(spec, b, weight_matching(spec, a, b, progress=False)), a)
    layer = _rel(act(spec, b, layerwise_matching(spec, _reader(a, []), _reader(b, []))), a)
    naive = _rel(b, a)
    assert full < naive and layer < naive
    assert layer <= 1.05 * full, (layer, full, naive)


def test_a_pinned_stream_matches_each_block_alone():
    """XGLM's stream is pinned (a sinusoidal table is added to it): no stream factor, one pass over the blocks."""
    model = build("xglm")
    spec = spec_from_hf(model)
    assert "stream" not in spec.factors
    a = {k: v.double() for k, v in params_of(model).items()}
    b = act(spec, a, GroupElement.sample(spec, 5))
    info = LayerwiseInfo()
    g = layerwise_matching(spec, _reader(a, []), _reader(b, []), info=info)
    assert _rel(act(spec, b, g), a) <= 1e-6 and info.sweeps == 1
