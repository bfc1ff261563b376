"""Smoke test of ``experiments/lm_lmc.py --quick``: tiny models, a few dozen steps, a temporary cache and output."""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))  # the script imports its sibling ``_common``
    return importlib.import_module("lm_lmc")


def test_quick_run_writes_a_row_per_setting(tmp_path, monkeypatch):
    lm_lmc = _load_script(monkeypatch)
    cache, out = tmp_path / "cache", tmp_path / "out"
    lm_lmc.main(["--quick", "--cache", str(cache), "--out", str(out)])

    payload = json.loads((out / "lm_lmc.json").read_text())
    assert payload["complete"] and payload["quick"]
    assert (out / "lm_lmc.png").stat().st_size > 0
    rows = payload["rows"]
    for family in lm_lmc.FAMILIES:
        settings = [r["setting"] for r in rows if r["family"] == family]
        expected = [s for s in lm_lmc.SETTINGS if (s != "experts-fixed" or family == "mixtral") and (not s.startswith("untied-") or family == "gpt2")]
        assert settings == expected, family
        naive = [r["naive"] for r in rows if r["family"] == family and r["status"] == "ok"]
        assert naive and all(math.isfinite(x) and x >= 0 for x in naive), family
        assert max(naive) - min(naive) < 1e-9, "every setting evaluates the same naive path"
    by = {(r["family"], r["setting"]): r for r in rows}
    assert by[("llama", "signed")]["status"] == "ok"
    assert by[("gpt2", "signed")]["status"] == "refused" and "--stream signed" in by[("gpt2", "signed")]["message"]
    assert by[("mixtral", "experts-fixed")]["status"] == "ok"
    assert by[("gpt2-untied", "orthogonal")]["status"] == "ok"  # the untied LayerNorm stream rotates
    assert by[("gpt2", "orthogonal")]["status"] == "refused" and "tied" in by[("gpt2", "orthogonal")]["message"]
    assert by[("gpt2", "untied-orthogonal")]["status"] == "ok" and by[("gpt2", "untied-orthogonal")]["stream"] == "orthogonal"
    assert by[("gpt2", "untied-learned")]["status"] == "ok" and by[("gpt2", "untied-learned")]["stream"] == "orthogonal"
    for family in lm_lmc.FAMILIES:  # learned matching is recorded, whether it exists yet or not
        assert by[(family, "learned")]["status"] in ("ok", "not available")
        assert by[(family, "learned-generated")]["status"] == "ok", by[(family, "learned-generated")]

    # models are cached complete (no staging folders left) and reused by a rerun
    folders = sorted(p.name for p in cache.iterdir())
    assert len(folders) == 2 * len(lm_lmc.FAMILIES) and not any(name.startswith(".") for name in folders)
    stamps = {p: (p / "train.json").stat().st_mtime_ns for p in cache.iterdir()}
    lm_lmc.main(["--quick", "--cache", str(cache), "--out", str(out), "--families", "llama"])
    assert all((p / "train.json").stat().st_mtime_ns == t for p, t in stamps.items())

    # the objective study reads the same cache: barrier and folded distance per data-free variant and for learned
    objective = importlib.import_module("lm_lmc_objective")
    result = objective.main(["--quick", "--cache", str(cache), "--out", str(out), "--families", "llama"])
    variants = [r["variant"] for r in result["rows"]]
    assert variants == [*objective.VARIANTS, "learned (from default)"]
    assert all(math.isfinite(r["folded_distance"]) and r["folded_distance"] >= 0 for r in result["rows"])
    assert (out / "lm_lmc_objective.json").is_file()

    # the block study reads it too: the catalogue's blocks (attention, MLP, stream-only tensors), each measured both ways
    blocks = importlib.import_module("lm_lmc_blocks")
    result = blocks.main(["--quick", "--cache", str(cache), "--out", str(out), "--families", "llama"])["results"][0]
    for name in ("data-free", "learned"):
        measured = result[name]["blocks"]
        assert set(measured) == {"model.embed_tokens", "model.layers.0.input_layernorm", "model.layers.0.self_attn",
                                 "model.layers.0.post_attention_layernorm", "model.layers.0.mlp", "model.norm", "lm_head"}, measured
        assert all(math.isfinite(v) for x in measured.values() for v in x.values())
    assert 0.0 <= result["units"]["factors"]["model.layers.0.mlp.units"]["agreement"] <= 1.0
    assert (out / "lm_lmc_blocks.json").is_file()


def test_quick_bpe_run_evaluates_every_setting_on_the_same_windows(tmp_path, monkeypatch):
    """--vocab: a BPE tokenizer trained on the training half is saved with each model; every setting (the
    experts-fixed one included) evaluates the same held-out windows, so the naive barrier is the same."""
    lm_lmc = _load_script(monkeypatch)
    cache, out = tmp_path / "cache", tmp_path / "out"
    payload = lm_lmc.main(["--quick", "--vocab", "300", "--cache", str(cache), "--out", str(out), "--families", "mixtral"])
    assert "300 BPE tokens" in payload["data"]
    naive = [r["naive"] for r in payload["rows"] if r["status"] == "ok"]
    assert len(naive) >= 5 and max(naive) - min(naive) < 1e-9
    folders = [p for p in cache.iterdir() if p.name.startswith("mixtral-")]
    assert len(folders) == 2 and all((f / "tokenizer.json").is_file() for f in folders)


def test_recipes_have_their_own_cache_keys_and_constant_keeps_the_earlier_ones(monkeypatch):
    """Models of the earlier results (no weight decay, constant learning rate) keep their keys; the cosine recipe
    (the default) gets new ones, so neither reads the other's models."""
    import hashlib
    from dataclasses import asdict

    lm_lmc = _load_script(monkeypatch)
    sizes = lm_lmc.Sizes(vocab=2048)
    cosine = lm_lmc.Training()
    constant = lm_lmc.Training(**(asdict(cosine) | lm_lmc.CONSTANT_RECIPE))
    assert (cosine.weight_decay, cosine.schedule) == (0.1, "cosine")
    earlier = {"steps": constant.steps, "batch": constant.batch, "lr": constant.lr, "windows": constant.windows}
    blob = json.dumps({"config": lm_lmc.config_for("llama", sizes).to_diff_dict() | {"transformers_version": None},
                       "sizes": asdict(sizes), "training": earlier}, sort_keys=True)
    assert lm_lmc.model_key("llama", sizes, constant, 0, 1000) == f"llama-{hashlib.sha256(blob.encode()).hexdigest()[:12]}-init0-data1000"
    assert lm_lmc.model_key("llama", sizes, cosine, 0, 1000) != lm_lmc.model_key("llama", sizes, constant, 0, 1000)
    assert lm_lmc.parse_args(["--recipe", "constant"]).recipe == "constant" and lm_lmc.parse_args([]).recipe == "cosine"


def test_quick_tied_llama_is_aligned_on_untied_copies(tmp_path, monkeypatch):
    """llama-tied (on request): trained tied; the orthogonal stream is refused on it and applies to its untied copies,
    on the same naive path."""
    lm_lmc = _load_script(monkeypatch)
    payload = lm_lmc.main(["--quick", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--families", "llama-tied"])
    by = {r["setting"]: r for r in payload["rows"]}
    assert by["orthogonal"]["status"] == "refused" and "symm untie" in by["orthogonal"]["message"]
    assert by["untied-orthogonal"]["status"] == "ok" and by["untied-orthogonal"]["stream"] == "orthogonal"
    assert by["untied-orthogonal"]["naive"] == pytest.approx(by["permutation"]["naive"], rel=1e-9)
    configs = [json.loads((p / "config.json").read_text()) for p in (tmp_path / "cache").iterdir()]
    assert len(configs) == 2 and all(c["tie_word_embeddings"] for c in configs), "the cached models stay tied"


def test_kv_heads_option_keys_its_own_models_and_refuses_a_non_divisor(monkeypatch):
    lm_lmc = _load_script(monkeypatch)
    gqa, training = lm_lmc.sizes_and_training(False, None, 2048, None, "cosine")
    full, _ = lm_lmc.sizes_and_training(False, None, 2048, None, "cosine", kv_heads=4)
    assert (gqa.kv_heads, full.kv_heads) == (2, 4)
    assert lm_lmc.config_for("llama", full).num_key_value_heads == 4
    assert lm_lmc.model_key("llama", gqa, training, 0, 1000) != lm_lmc.model_key("llama", full, training, 0, 1000)
    with pytest.raises(SystemExit, match="--kv-heads must divide"):
        lm_lmc.sizes_and_training(False, None, 2048, None, "cosine", kv_heads=3)
