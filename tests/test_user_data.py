"""The user's own data for ``symm align --data FILE|DIR`` (issue 17, item 3): a text file tokenised by the
checkpoint folder's own tokenizer (built and saved offline here), tensor folders/files for classifiers, the
``--max-tokens``/``--max-samples`` budgets, and bad data (exit 2, one clear message, nothing written)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hf_models import VOCAB, build
from symm.cli import main
from symm.data import byte_tokens, digits
from symm.errors import DataError
from symm.evaluate import state_dict_of
from symm.io import save_state_dict
from symm.models import MLP, MLPConfig
from symm.train import train_classifier
from symm.user_data import folder_tokenizer_tokens, load_tensor_split, load_text_tokens

WORDS = "the quick brown fox jumps over a lazy dog while my lord and lady sing of love war and kings".split()


def _text(n_lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(12)) + ".\n" for _ in range(n_lines))


def _tokenizer():
    """A tiny BPE tokenizer trained in memory (no download), vocabulary below the models' (VOCAB)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([_text(50, seed=1)], trainers.BpeTrainer(vocab_size=VOCAB - 4, special_tokens=["[UNK]"], show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    assert len(fast) <= VOCAB
    return fast


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """Llama folders A and B with the tokenizer saved into each, one folder without a tokenizer, a text file."""
    root = tmp_path_factory.mktemp("lm")
    tokenizer = _tokenizer()
    for name, seed in (("A", 0), ("B", 1)):
        build("llama-gqa-tied", seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    build("llama-gqa-tied", seed=2).save_pretrained(root / "bare")
    text = root / "text.txt"
    text.write_text(_text(600), encoding="utf-8")
    return root / "A", root / "B", root / "bare", text, tokenizer


@pytest.fixture(scope="module")
def mlps(tmp_path_factory):
    """Two 64-32-10 ReLU MLPs trained briefly on digits (different seeds), and digits as a train/test tensor folder."""
    root = tmp_path_factory.mktemp("mlp")
    data = digits()
    paths = []
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        model = train_classifier(MLP(MLPConfig((64, 32, 10), "relu")), data.x_train, data.y_train, epochs=5, seed=seed, progress=False)
        paths.append(save_state_dict(state_dict_of(model), root / f"{name}.safetensors"))
    folder = root / "digits_tensors"
    folder.mkdir()
    np.savez(folder / "train.npz", inputs=data.x_train.numpy(), labels=data.y_train.numpy())
    save_file({"inputs": data.x_test.contiguous(), "labels": data.y_test.contiguous()}, folder / "test.safetensors")
    return paths[0], paths[1], folder, data


# ---- text --------------------------------------------------------------------------------------------------------


def test_text_file_is_tokenised_by_the_folder_tokenizer(lm):
    a, _, _, text, tokenizer = lm
    split = load_text_tokens(text, a, VOCAB, max_tokens=2000)
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"][:2000]
    stream = " ".join(map(str, ids))
    for row in torch.cat([split.train[:20], split.test[:20]]):
        assert " ".join(map(str, row.tolist())) in stream  # every window is a piece of the tokenised text
    assert split.train.shape[1] == 65 and str(text) in split.name and "tokenizer of" in split.name
    assert "2000 tokens" in split.name


def test_text_without_a_tokenizer_folds_bytes(lm):
    _, _, bare, text, _ = lm
    split = load_text_tokens(text, bare, VOCAB, max_tokens=1000)
    assert "bytes modulo 50" in split.name and int(split.train.max()) < VOCAB
    raw = torch.tensor(list(text.read_bytes()[:1000])) % VOCAB
    assert torch.equal(split.train[0], raw[split_start(raw, split.train[0])])


def split_start(raw: torch.Tensor, row: torch.Tensor) -> slice:
    for s in range(len(raw) - len(row) + 1):
        if torch.equal(raw[s : s + len(row)], row):
            return slice(s, s + len(row))
    raise AssertionError("window not found in the byte stream")


def test_default_text_uses_the_folder_tokenizer(lm):
    a, _, bare, _, _ = lm
    tokens = folder_tokenizer_tokens(a, VOCAB, max_tokens=5000)
    assert "tokenizer of" in tokens.name and "5000 tokens" in tokens.name and int(tokens.test.max()) < VOCAB
    fallback = folder_tokenizer_tokens(bare, VOCAB)  # no tokenizer: exactly the byte-level default of before
    reference = byte_tokens(vocab_size=VOCAB, n_train=256, n_test=64)
    assert torch.equal(fallback.test, reference.test) and fallback.name == reference.name


def test_token_ids_outside_the_vocabulary_are_refused(lm):
    a, _, _, text, _ = lm
    with pytest.raises(DataError, match="vocabulary has 10 entries"):
        load_text_tokens(text, a, 10, max_tokens=2000)


def test_cli_align_hf_on_a_text_file(lm, tmp_path, capsys):
    a, b, _, text, _ = lm
    out = tmp_path / "out"
    assert main(["align", str(a), str(b), "--data", str(text), "--max-tokens", "2000", "--out", str(out), "--quiet", "--points", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"].startswith(str(text)) and "2000 tokens" in report["data"] and "tokenizer of" in report["data"]
    assert str(text) in capsys.readouterr().out
    assert (out / "aligned_model" / "tokenizer.json").is_file()  # the tokenizer travels with the aligned model


# ---- tensors -----------------------------------------------------------------------------------------------------


def test_cli_align_mlps_on_a_tensor_folder(mlps, tmp_path):
    pa, pb, folder, _ = mlps
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--data", str(folder), "--max-samples", "100", "--out", str(out), "--quiet", "--points", "3"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == f"{folder} (100 train + 100 test samples)"
    for acc in report["naive"]["accuracy"]:  # evaluated on the 100 test samples
        assert abs(acc * 100 - round(acc * 100)) < 1e-4
    assert report["loss_barrier"]["aligned"] < report["loss_barrier"]["naive"]


def test_single_tensor_file_is_split_80_20(tmp_path):
    x = torch.randn(50, 3)
    y = torch.arange(50) % 4
    path = tmp_path / "data.npz"
    np.savez(path, inputs=x.numpy(), labels=y.numpy(), n_classes=np.int64(6))
    split = load_tensor_split(path)
    assert (len(split.x_train), len(split.x_test), split.n_classes) == (40, 10, 6)
    both = torch.cat([split.x_train, split.x_test])
    assert sorted(both[:, 0].tolist()) == sorted(x[:, 0].tolist())  # a partition of the samples
    again = load_tensor_split(path)
    assert torch.equal(again.x_test, split.x_test)  # seeded
    small = load_tensor_split(path, max_samples=5)
    assert (len(small.x_train), len(small.x_test)) == (5, 5)


# ---- bad data: exit 2, one clear message, nothing written ----------------------------------------------------------


def _fails(args: list[str], tmp_path, capsys, needle: str) -> None:
    out = tmp_path / "never"
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(args + ["--out", str(out), "--quiet", "--points", "3"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and err.startswith("symm: error:"), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == before


def _tensors(path, x, y) -> str:
    np.savez(path, inputs=np.asarray(x), labels=np.asarray(y))
    return str(path)


def test_bad_data_fails_cleanly(lm, mlps, tmp_path, capsys):
    a, b, _, text, _ = lm
    pa, pb, folder, data = mlps
    hf, mlp = ["align", str(a), str(b)], ["align", str(pa), str(pb)]
    x, y = data.x_test[:50].numpy(), data.y_test[:50].numpy()
    inputs = tmp_path / "inputs"
    inputs.mkdir()

    _fails(hf + ["--data", str(inputs / "absent.txt")], tmp_path, capsys, "no such file or folder")
    (inputs / "empty.txt").write_text("")
    _fails(hf + ["--data", str(inputs / "empty.txt")], tmp_path, capsys, "is empty")
    (inputs / "blank.txt").write_text(" \n\n ")
    _fails(hf + ["--data", str(inputs / "blank.txt")], tmp_path, capsys, "tokens")
    (inputs / "short.txt").write_text("the fox.\n")
    _fails(hf + ["--data", str(inputs / "short.txt")], tmp_path, capsys, "at least 132 are needed")
    (inputs / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 50)
    _fails(hf + ["--data", str(inputs / "latin1.txt")], tmp_path, capsys, "not UTF-8 text")
    (inputs / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    _fails(hf + ["--data", str(inputs / "binary.txt")], tmp_path, capsys, "binary data")
    _fails(hf + ["--data", str(folder)], tmp_path, capsys, "classifier data")  # tensors given to an LM
    _fails(hf + ["--max-samples", "10"], tmp_path, capsys, "--max-samples applies to classifier data")

    _fails(mlp + ["--data", str(text)], tmp_path, capsys, "language-model data")  # text given to a classifier
    _fails(mlp + ["--max-tokens", "10"], tmp_path, capsys, "--max-tokens applies to a language model")
    labels = y.copy()
    labels[3] = 12
    _fails(mlp + ["--data", _tensors(inputs / "labels.npz", x, labels)], tmp_path, capsys, "labels up to 12")
    labels[3] = -1
    _fails(mlp + ["--data", _tensors(inputs / "negative.npz", x, labels)], tmp_path, capsys, "negative label -1")
    _fails(mlp + ["--data", _tensors(inputs / "width.npz", x[:, :40], y)], tmp_path, capsys, "has 40 inputs per sample; the model takes 64")
    nan = x.copy()
    nan[5, 7] = np.nan
    _fails(mlp + ["--data", _tensors(inputs / "nan.npz", nan, y)], tmp_path, capsys, "NaN or Inf")
    _fails(mlp + ["--data", _tensors(inputs / "float_labels.npz", x, y.astype("float32"))], tmp_path, capsys, "'labels' must be an integer")
    _fails(mlp + ["--data", _tensors(inputs / "lengths.npz", x, y[:-1])], tmp_path, capsys, "50 inputs but 49 labels")
    np.savez(inputs / "keys.npz", x=x, labels=y)
    _fails(mlp + ["--data", str(inputs / "keys.npz")], tmp_path, capsys, "no tensor named 'inputs'")
    (inputs / "corrupt.safetensors").write_bytes(b"\x00" * 64)
    _fails(mlp + ["--data", str(inputs / "corrupt.safetensors")], tmp_path, capsys, "cannot read the tensors")
    half = inputs / "half"
    half.mkdir()
    _tensors(half / "train.npz", x, y)
    _fails(mlp + ["--data", str(half)], tmp_path, capsys, "no test.npz or test.safetensors")


def test_budgets_must_be_positive(mlps, capsys):
    pa, pb, folder, _ = mlps
    for flag in ("--max-samples", "--max-tokens"):
        with pytest.raises(SystemExit) as exc:
            main(["align", str(pa), str(pb), "--data", str(folder), flag, "0"])
        assert exc.value.code == 2 and f"{flag}: must be at least 1, got 0" in capsys.readouterr().err


def test_the_data_folder_is_protected_like_an_input(mlps, capsys):
    pa, pb, folder, _ = mlps
    before = sorted(p.name for p in folder.iterdir())
    assert main(["align", str(pa), str(pb), "--data", str(folder), "--out", str(folder / "out"), "--quiet"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == before
