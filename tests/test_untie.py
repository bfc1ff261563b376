"""``symm untie``: the untied copy of a tied checkpoint computes the same logits (checked on the transformers model
reloaded from disk), admits the orthogonal stream in ``symm align``, and bad input or a kill leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from symm.cli import main
from symm.errors import CheckpointError, OutputError, UsageError
from symm.untie import untie
from test_align_faults import run_forked


def _gpt2(folder: Path, seed: int, tied: bool = True) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_inner=32, n_positions=32, tie_word_embeddings=tied,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # non-uniform norm gains and biases: the case where a tied stream cannot rotate
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "README.md").write_text("model card: copied as is")
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).eval()
    x = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(x).logits


def test_untied_copy_has_the_same_logits_and_a_separate_head(tmp_path):
    src = _gpt2(tmp_path / "tied", 0)
    before = _digest(src)
    report = untie(src, tmp_path / "untied")
    out = tmp_path / "untied"
    assert _digest(src) == before, "the input is never modified"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert (out / "README.md").read_text() == (src / "README.md").read_text() and report["copied"] == ["README.md"]
    assert report["lm_head"] == "lm_head.weight" and report["embedding"] == "transformer.wte.weight"
    assert torch.equal(_logits(src), _logits(out))
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], weights["transformer.wte.weight"])
    assert weights["lm_head.weight"].data_ptr() != weights["transformer.wte.weight"].data_ptr()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".symm-stage")) == []


def test_orthogonal_stream_applies_to_untied_copies_only(tmp_path):
    from aligners.job import align
    from symm.errors import SymmError

    a, b = _gpt2(tmp_path / "A", 0), _gpt2(tmp_path / "B", 1)
    with pytest.raises(SymmError, match="symm untie"):
        align(a, b, tmp_path / "refused", stream="orthogonal", barrier="none", progress=False)
    assert not (tmp_path / "refused").exists()
    ua, ub = tmp_path / "A-untied", tmp_path / "B-untied"
    untie(a, ua)
    untie(b, ub)
    report = align(ua, ub, tmp_path / "aligned", stream="orthogonal", n_points=3, progress=False)
    assert report["stream"] == "orthogonal"
    assert report["function_check"]["max_relative_error"] <= 1e-5
    aligned = tmp_path / "aligned" / report["outputs"]["aligned"].split(os.sep)[-1]
    assert torch.allclose(_logits(aligned), _logits(b), rtol=0, atol=1e-4 * float(_logits(b).abs().max())), "aligned B computes tied B's logits"
    naive = align(a, b, tmp_path / "perm", n_points=3, progress=False)
    assert report["loss_barrier"]["naive"] == pytest.approx(naive["loss_barrier"]["naive"], rel=1e-6), "untying keeps the naive path"


def test_refusals_write_nothing(tmp_path):
    tied = _gpt2(tmp_path / "tied", 0)
    untied = _gpt2(tmp_path / "plain", 0, tied=False)
    with pytest.raises(UsageError, match="not tied"):
        untie(untied, tmp_path / "o1")
    with pytest.raises(UsageError, match="not a Hugging Face model folder"):
        untie(tmp_path / "nowhere", tmp_path / "o2")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        untie(tied, tmp_path / "exists")
    assert (tmp_path / "exists" / "keep.txt").read_text() == "mine"
    with pytest.raises(OutputError, match="inside the input folder"):
        untie(tied, tied / "sub")
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    _gpt2(bad, 2)
    w = load_file(bad / "model.safetensors")
    w["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError):
        untie(bad, tmp_path / "o3")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "tied/sub"))


def test_cli(tmp_path, capsys):
    tied = _gpt2(tmp_path / "tied", 0)
    assert main(["untie", str(tied), str(tmp_path / "u"), "--quiet"]) == 0
    assert "lm_head.weight is now a copy of transformer.wte.weight" in capsys.readouterr().out
    assert main(["untie", str(tmp_path / "u"), str(tmp_path / "u2")]) == 2
    assert "nothing to untie" in capsys.readouterr().err


@pytest.mark.parametrize("stage", ["locked", "publish", "published"])
def test_kill_leaves_nothing_or_the_complete_copy(tmp_path, stage):
    tied = _gpt2(tmp_path / "tied", 0)
    before = _digest(tied)
    out = tmp_path / "u"
    status = run_forked(["untie", str(tied), str(out), "--quiet"], fault=f"{stage}:kill")
    assert os.WIFSIGNALED(status)
    assert _digest(tied) == before
    if stage == "published":  # killed after the rename: the copy is complete
        assert torch.equal(_logits(out), _logits(tied))
    else:
        assert not out.exists()
        assert main(["untie", str(tied), str(out), "--quiet"]) == 0  # the next run cleans up and succeeds
        assert torch.equal(_logits(out), _logits(tied))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".symm-stage")]


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_rmsnorm_families_untie_and_take_the_orthogonal_stream(tmp_path, family):
    """Tied RMSNorm decoders (Llama, Gemma with its scaled embedding): the untied copies keep the logits and the
    orthogonal stream aligns them to B's function."""
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    from aligners.job import align

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "gemma": (GemmaConfig, GemmaForCausalLM)}[family]
    copies = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = model_cls(config_cls(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, max_position_embeddings=64))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"m{seed}")
        report = untie(tmp_path / f"m{seed}", tmp_path / f"m{seed}-untied")
        assert report["logits_difference"] == 0.0
        assert torch.equal(_logits(tmp_path / f"m{seed}"), _logits(tmp_path / f"m{seed}-untied"))
        copies.append(tmp_path / f"m{seed}-untied")
    aligned = align(*copies, tmp_path / "out", stream="orthogonal", barrier="none", progress=False)
    assert aligned["stream"] == "orthogonal" and aligned["function_check"]["max_relative_error"] <= 1e-5


def test_bfloat16_checkpoint_stays_bfloat16(tmp_path):
    """The copy keeps the checkpoint's dtype (no silent float32 up-cast doubling the files) and its logits."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32)).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    untie(tmp_path / "bf16", tmp_path / "u")
    weights = load_file(tmp_path / "u" / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    assert torch.equal(_logits(tmp_path / "bf16"), _logits(tmp_path / "u"))
