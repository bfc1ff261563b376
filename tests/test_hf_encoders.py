"""Encoder families (BERT, RoBERTa, ViT; ``symm/adapters/hf/encoders.py``), checked on the logits of the
``transformers`` models themselves (float32) under 20 random group elements, with negative controls, positive
controls of the symmetries that are derived but not catalogued, refusals, and planted recovery through ``symm align``."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import transformers

from symm.action import act
from symm.adapters import hf, load_hf, spec_from_hf
from hf_models import from_config
from symm.adapters.hf.encoders import architecture, build_model, digit_images, mask_windows
from symm.cli import main
from symm.element import GroupElement
from symm.errors import UnsupportedArchitecture
from symm.testing import assert_invariant, assert_not_invariant

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)

VOCAB = 50


def configs() -> dict:
    from transformers import BertConfig, RobertaConfig, ViTConfig

    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    return {
        "bert": BertConfig(vocab_size=VOCAB, max_position_embeddings=32, **small),
        "bert-untied-relu": BertConfig(vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=False, hidden_act="relu", **small),
        "roberta": RobertaConfig(vocab_size=VOCAB, max_position_embeddings=34, **small),
        "vit": ViTConfig(image_size=8, patch_size=2, num_channels=3, num_labels=10, **small),
        "vit-1ch-nobias": ViTConfig(image_size=8, patch_size=4, num_channels=1, num_labels=10, qkv_bias=False, **small),
    }


NAMES = list(configs())
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def build(name: str, seed: int = 0):
    """A model with random (not default-initialised) weights, eval mode, float32 (its head class)."""
    config = configs()[name]
    return from_config(config, seed, build_model)


def inputs_for(name: str) -> torch.Tensor:
    if name.startswith("vit"):
        c = configs()[name].num_channels
        return torch.randn(2, c, 8, 8, generator=torch.Generator().manual_seed(1))
    return TOKENS


def params_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def logits_fn(model, x):
    def f(params):
        model.load_state_dict(params)
        with torch.no_grad():
            return model(x).logits

    return f


def setup(name):
    model = build(name)
    return model, params_of(model), logits_fn(model, inputs_for(name))


# ---------------------------------------------------------------------------------------------- the group holds


@pytest.mark.parametrize("name", NAMES)
def test_logits_preserved(name):
    model, params, f = setup(name)
    spec = spec_from_hf(model)
    assert_invariant(f, spec, params, n_samples=20, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_spec_from_config_matches_model_and_meta(name):
    config = configs()[name]
    spec = spec_from_hf(config)  # checked against the meta-device model
    assert spec == spec_from_hf(build(name))
    assert set(spec.params) == set(hf.meta_shapes(config))


def _kinds(spec, prefix):
    return {n[len(prefix) + 1 :]: f.kind for n, f in spec.factors.items() if n.startswith(prefix + ".")}


def test_groups_per_family():
    bert = spec_from_hf(configs()["bert"])
    assert bert.factors["stream"].kind == "permutation" and "stream.sign" not in bert.factors  # LayerNorm: no signs
    assert _kinds(bert, "bert.encoder.layer.0.attention") == {"heads": "head-permutation", "qk": "general-linear", "vo": "general-linear"}
    assert bert.factors["bert.encoder.layer.0.intermediate.dense.units"].kind == "permutation"
    assert "bert.encoder.layer.0.intermediate.dense.units.scale" not in bert.factors  # GELU: no scaling
    assert not any(n.startswith("cls.") for n in bert.factors)  # tied: the head's units are the stream
    (seg,) = bert.params["cls.predictions.transform.dense.weight"].axes[0]
    assert [a.factor for a in seg.acts] == ["stream"]
    untied = spec_from_hf(configs()["bert-untied-relu"])
    assert untied.factors["cls.predictions.transform.units"].kind == "permutation"  # LN after relu: no scaling
    assert untied.factors["bert.encoder.layer.0.intermediate.dense.units.scale"].kind == "positive-scaling"  # relu MLP
    vit = spec_from_hf(configs()["vit"])
    assert _kinds(vit, "vit.layers.1.attention") == {"heads": "head-permutation", "qk": "general-linear", "vo": "general-linear"}
    assert set(vit.factors) >= {"stream", "vit.layers.0.mlp.fc1.units"} and "stream.sign" not in vit.factors
    assert "vit.layers.0.attention.q_proj.bias" not in spec_from_hf(configs()["vit-1ch-nobias"]).params
    for name in NAMES:
        spec = spec_from_hf(configs()[name])
        assert any(n.startswith(spec.name + ":") for n in spec.notes)


# ---------------------------------------------------------------------------------------------- negative controls


def _stream_keys(spec, side=None):
    """(param, axis) pairs on which the stream permutation acts."""
    return [(p, axis) for p, axis, _, on in spec.uses("stream") if side is None or on.side == side]


def _scale_axis(x, axis, v):
    shape = [1] * x.dim()
    shape[axis] = -1
    return x * v.reshape(shape).to(x.dtype)


def _signed_stream(spec, params, signs):
    """Per-channel signs on every stream axis (writers' rows, readers' columns, LayerNorm gains and biases)."""
    out = dict(params)
    for p, axis in _stream_keys(spec):
        out[p] = _scale_axis(out[p], axis, signs)
    return out


@pytest.mark.parametrize("name", ["bert", "roberta", "vit"])
def test_per_channel_stream_signs_break(name):
    """LayerNorm centres the stream: the signed permutations of RMSNorm streams are not a symmetry here."""
    model, params, f = setup(name)
    spec = spec_from_hf(model)
    signs = torch.ones(32)
    signs[::3] = -1
    assert_not_invariant(f, params, _signed_stream(spec, params, signs))


def test_bert_one_sublayer_with_its_own_permutation_breaks():
    """Post-LN: layer 1's attention sublayer (its reads, its writes, its LayerNorm) permuted on its own breaks."""
    model, params, f = setup("bert")
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    moved = dict(params)
    b = "bert.encoder.layer.1.attention"
    for key in ("self.query.weight", "self.key.weight", "self.value.weight"):
        moved[f"{b}.{key}"] = params[f"{b}.{key}"][:, perm]
    for key in ("output.dense.weight", "output.dense.bias", "output.LayerNorm.weight", "output.LayerNorm.bias"):
        moved[f"{b}.{key}"] = params[f"{b}.{key}"][perm]
    assert_not_invariant(f, params, moved)


def test_bert_tied_head_units_cannot_permute_alone():
    """Tied decoder: the head transform's units are read in the word embeddings' order; permuting them alone breaks."""
    model, params, f = setup("bert")
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    moved = dict(params)
    for key in ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight", "transform.LayerNorm.bias"):
        moved[f"cls.predictions.{key}"] = params[f"cls.predictions.{key}"][perm]
    assert_not_invariant(f, params, moved)


@pytest.mark.parametrize("name,fc1,fc2", [
    ("bert", "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"),
    ("vit", "vit.layers.0.mlp.fc1", "vit.layers.0.mlp.fc2"),
])
def test_gelu_units_do_not_scale(name, fc1, fc2):
    model, params, f = setup(name)
    a = torch.exp(0.5 * torch.randn(48, generator=torch.Generator().manual_seed(0)))
    moved = dict(params)
    moved[f"{fc1}.weight"], moved[f"{fc1}.bias"] = params[f"{fc1}.weight"] * a[:, None], params[f"{fc1}.bias"] * a
    moved[f"{fc2}.weight"] = params[f"{fc2}.weight"] / a
    assert_not_invariant(f, params, moved)


# ------------------------------------------------------------------- derived but not catalogued (positive controls)


def _close(f, params, moved):
    with torch.no_grad():
        ref = f(params)
        return float((f(moved) - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_post_ln_global_sign(name):
    """-1 on the whole stream: writers and readers negated, every stream LayerNorm's bias negated (gain kept), the
    head LayerNorm's gain and bias negated (its output is read by the negated, tied decoder)."""
    model, params, f = setup(name)
    spec = spec_from_hf(model)
    moved = _signed_stream(spec, params, -torch.ones(32))  # also negates every LN gain and bias on the stream
    head_ln = "cls.predictions.transform.LayerNorm" if name == "bert" else "lm_head.layer_norm"
    for p in spec.params:
        if p.endswith(".weight") and spec.params[p].shape == (32,):  # LayerNorm gains: keep on the stream ...
            moved[p] = params[p]
    for key in ("weight", "bias"):  # ... the head LN (after the activation) flips gain and bias
        moved[f"{head_ln}.{key}"] = -params[f"{head_ln}.{key}"]
    dense = "cls.predictions.transform.dense" if name == "bert" else "lm_head.dense"
    moved[f"{dense}.weight"] = -params[f"{dense}.weight"]  # reads the flipped stream; its rows feed the activation
    moved[f"{dense}.bias"] = params[f"{dense}.bias"]
    assert _close(f, params, moved) < 1e-5


def test_bert_last_layernorm_output_scales_per_channel():
    """The last layer's LN output feeds no residual: its gain and bias times a_i (any sign), the head's columns / a_i."""
    model, params, f = setup("bert")
    a = torch.exp(0.5 * torch.randn(32, generator=torch.Generator().manual_seed(0)))
    a[::4] *= -1
    ln, dense = "bert.encoder.layer.1.output.LayerNorm", "cls.predictions.transform.dense"
    moved = dict(params)
    moved[f"{ln}.weight"], moved[f"{ln}.bias"] = params[f"{ln}.weight"] * a, params[f"{ln}.bias"] * a
    moved[f"{dense}.weight"] = params[f"{dense}.weight"] / a
    assert _close(f, params, moved) < 1e-5
    # ... but not an earlier LN's (its output is added to the residual and normalised again)
    ln0 = "bert.encoder.layer.0.output.LayerNorm"
    early = dict(params)
    early[f"{ln0}.weight"], early[f"{ln0}.bias"] = params[f"{ln0}.weight"] * a, params[f"{ln0}.bias"] * a
    for key in ("self.query", "self.key", "self.value"):
        early[f"bert.encoder.layer.1.attention.{key}.weight"] = params[f"bert.encoder.layer.1.attention.{key}.weight"] / a
    assert_not_invariant(f, params, early)


def test_vit_layernorm_outputs_scale_per_channel():
    """Pre-LN: each LayerNorm's output is read only by its block (or the classifier): per-channel scalings of any
    sign hold for every LN at once; with negated writers and negated gains the stream takes a global sign."""
    model, params, f = setup("vit")
    gen = torch.Generator().manual_seed(0)
    moved = dict(params)
    readers = {
        "vit.layers.{i}.layernorm_before": ["vit.layers.{i}.attention.q_proj", "vit.layers.{i}.attention.k_proj", "vit.layers.{i}.attention.v_proj"],
        "vit.layers.{i}.layernorm_after": ["vit.layers.{i}.mlp.fc1"],
    }
    lns = [(ln.format(i=i), [r.format(i=i) for r in rs]) for i in range(2) for ln, rs in readers.items()]
    for ln, rs in lns + [("vit.layernorm", ["classifier"])]:
        a = torch.exp(0.5 * torch.randn(32, generator=gen)) * torch.where(torch.rand(32, generator=gen) < 0.3, -1.0, 1.0)
        moved[f"{ln}.weight"], moved[f"{ln}.bias"] = params[f"{ln}.weight"] * a, params[f"{ln}.bias"] * a
        for r in rs:
            moved[f"{r}.weight"] = params[f"{r}.weight"] / a
    assert _close(f, params, moved) < 1e-5
    spec = spec_from_hf(model)
    flipped = {k: (-v if any(k == p for p, _ in _stream_keys(spec, "out")) and not k.endswith("layernorm.bias")
                   and "layernorm_" not in k and k != "vit.layernorm.weight" else v) for k, v in params.items()}
    for k in params:
        if k.endswith(("layernorm_before.weight", "layernorm_after.weight")) or k == "vit.layernorm.weight":
            flipped[k] = -params[k]
    assert _close(f, params, flipped) < 1e-5


# ---------------------------------------------------------------------------------------------- refusals


def test_other_heads_are_refused():
    from transformers import BertConfig, ViTConfig

    with pytest.raises(UnsupportedArchitecture, match="BertForSequenceClassification"):
        spec_from_hf(BertConfig(architectures=["BertForSequenceClassification"]))
    with pytest.raises(UnsupportedArchitecture, match="ViTModel"):
        architecture(ViTConfig(architectures=["ViTModel"]))
    with pytest.raises(UnsupportedArchitecture, match="add_cross_attention"):
        spec_from_hf(BertConfig(is_decoder=True, add_cross_attention=True))
    with pytest.raises(UnsupportedArchitecture, match="num_labels"):
        spec_from_hf(ViTConfig(num_labels=0))
    with pytest.raises(UnsupportedArchitecture, match="position_embedding_type"):
        spec_from_hf(BertConfig(position_embedding_type="relative_key"))
    spec_from_hf(BertConfig(position_embedding_type="absolute", num_hidden_layers=1))  # what real BERT configs say


# ---------------------------------------------------------------------------------------------- symm align / describe


def test_evaluation_data():
    windows = torch.arange(40).reshape(2, 20)
    x, y = mask_windows(windows, 99, seed=0)
    assert ((x == 99).sum(1) == 3).all() and torch.equal(y[x == 99], windows[x == 99]) and (y[x != 99] == -100).all()
    assert torch.equal(mask_windows(windows, 99, seed=0)[0], x)  # deterministic
    x_train, y_train, x_test, y_test = digit_images(configs()["vit"])
    assert x_train.shape[1:] == (3, 8, 8) and len(x_test) == len(y_test) and int(y_train.max()) == 9


@pytest.mark.parametrize("name", NAMES)
def test_planted_recovery_through_symm_align(name, tmp_path):
    """B = g.A saved by save_pretrained; ``symm align A B`` gives back A (1e-4 relative) computing B's logits."""
    model = build(name, seed=0)
    spec = spec_from_hf(model)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    model.save_pretrained(a)
    params = params_of(model)
    moved = act(spec, params, GroupElement.sample(spec, 11))
    model.load_state_dict(moved)
    model.save_pretrained(b)
    assert main(["align", str(a), str(b), "--out", str(out), "--quiet", "--points", "3"]) == 0
    aligned, original_b = load_hf(out / "aligned_model"), load_hf(b)
    assert type(aligned).__name__ == architecture(configs()[name])
    pa, pal = params_of(load_hf(a)), params_of(aligned)
    num = sum(float((pal[k].double() - pa[k].double()).pow(2).sum()) for k in pa)
    den = sum(float(pa[k].double().pow(2).sum()) for k in pa)
    assert math.sqrt(num / den) <= 1e-4, math.sqrt(num / den)
    x = inputs_for(name)
    with torch.no_grad():
        la, lb = aligned(x).logits, original_b(x).logits
    assert float((la - lb).abs().max() / lb.abs().max()) < 1e-4
    report = json.loads((out / "report.json").read_text())
    assert report["models"]["format"] == "hf"
    assert ("digits" in report["data"]) if name.startswith("vit") else ("masked LM" in report["data"])


@pytest.mark.parametrize("name", ["roberta", "vit"])
def test_describe_cli_on_folder(name, tmp_path, capsys):
    build(name).save_pretrained(tmp_path)
    assert main(["describe", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "LayerNorm" in out and "no per-channel signs" in out and "GL(d_h)" in out


def _bert_tokenizer(folder):
    """A tiny WordPiece tokenizer (offline): special tokens, then letters and punctuation; [MASK] is id 4."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz,.:;'!?")
    path = folder / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path)).save_pretrained(folder)
    assert len(vocab) <= VOCAB


def test_masked_lm_task_uses_the_folders_mask_token(tmp_path):
    model = build("bert")
    spec = spec_from_hf(model)
    a, b, out = tmp_path / "A", tmp_path / "B", tmp_path / "out"
    model.save_pretrained(a)
    model.load_state_dict(act(spec, params_of(model), GroupElement.sample(spec, 5)))
    model.save_pretrained(b)
    _bert_tokenizer(a)
    text = tmp_path / "my.txt"
    text.write_text("to be, or not to be: that is the question. " * 200)
    assert main(["align", str(a), str(b), "--out", str(out), "--quiet", "--points", "2", "--data", str(text)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert "masked with id 4" in report["data"] and "my.txt" in report["data"], report["data"]


def test_align_refuses_an_unsupported_head(tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48)
    for name in ("A", "B"):
        BertForSequenceClassification(config).save_pretrained(tmp_path / name)
    assert main(["align", str(tmp_path / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "BertForSequenceClassification" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- ViT on the user's images


def _save_images(path, x, y, **extra):
    import numpy as np

    np.savez(path, inputs=x.numpy(), labels=y.numpy(), **extra)


def _vit_pair(tmp_path, seeds=(0, 1)):
    a, b = tmp_path / "A", tmp_path / "B"
    build("vit", seed=seeds[0]).save_pretrained(a)
    build("vit", seed=seeds[1]).save_pretrained(b)
    return a, b


def test_vit_evaluates_the_users_image_tensors(tmp_path):
    """--data FOLDER with train/test image tensors [n, C, H, W] (test: flattened [n, C*H*W]); --max-samples caps each split;
    the loss reported at A's end is A's classification loss on exactly those test images."""
    a, b = _vit_pair(tmp_path)
    gen = torch.Generator().manual_seed(5)
    x_tr, y_tr = torch.randn(40, 3, 8, 8, generator=gen), torch.randint(0, 7, (40,), generator=gen)
    x_te, y_te = torch.randn(30, 3, 8, 8, generator=gen), torch.randint(0, 7, (30,), generator=gen)
    data = tmp_path / "images"
    data.mkdir()
    _save_images(data / "train.npz", x_tr, y_tr)
    _save_images(data / "test.npz", x_te.reshape(30, -1), y_te)
    out = tmp_path / "out"
    assert main(["align", str(a), str(b), "--out", str(out), "--quiet", "--points", "2", "--data", str(data), "--max-samples", "20"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert str(data) in report["data"] and "20 train + 20 test samples" in report["data"]
    from symm.user_data import load_tensor_split

    split = load_tensor_split(data, max_samples=20, seed=0, sample_shape=(3, 8, 8))  # the job's seeded subset, recomputed
    assert len(split.x_test) == 20 and all(any(torch.equal(x, t) for t in x_te) for x in split.x_test)
    with torch.no_grad():
        loss_a = torch.nn.functional.cross_entropy(load_hf(a)(split.x_test).logits, split.y_test).item()
    assert abs(report["naive"]["loss"][0] - loss_a) < 1e-4, (report["naive"]["loss"][0], loss_a)


@pytest.mark.parametrize(
    "make, flags, needle",
    [
        (lambda d: _save_images(d / "x.npz", torch.randn(10, 3, 4, 4), torch.zeros(10, dtype=torch.long)), [], r"shape \[10, 3, 4, 4\].*images \[n, 3, 8, 8\]"),
        (lambda d: _save_images(d / "x.npz", torch.randn(10, 3, 8, 8), torch.full((10,), 12)), [], "labels up to 12.*10 outputs"),
        (lambda d: (d / "x.npz").write_text("not a zip"), [], "cannot read the tensors"),
        (lambda d: _save_images(d / "x.npz", torch.randn(10, 3, 8, 8), torch.zeros(10, dtype=torch.long)), ["--max-tokens", "100"], "--max-tokens applies"),
    ],
)
def test_vit_bad_image_data_is_refused_before_any_output(make, flags, needle, tmp_path, capsys):
    a, b = _vit_pair(tmp_path)
    make(tmp_path)
    out = tmp_path / "out"
    assert main(["align", str(a), str(b), "--out", str(out), "--quiet", "--points", "2", "--data", str(tmp_path / "x.npz"), *flags]) == 2
    assert re.search(needle, capsys.readouterr().err), needle
    assert not out.exists()


def test_vit_refuses_a_text_file(tmp_path, capsys):
    a, b = _vit_pair(tmp_path)
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["align", str(a), str(b), "--out", str(tmp_path / "out"), "--quiet", "--data", str(text)]) == 2
    assert "image classifier is evaluated on image tensors" in capsys.readouterr().err
