"""The command line: demo (embedded default job) and describe, including clear errors on bad input (never a traceback)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import nn

from hf_models import build
from symm.cli import main


def test_demo_trains_aligns_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--width", "64", "--epochs", "5", "--quiet", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "loss barrier" in text and "logits unchanged" in text
    report = json.loads((out / "report.json").read_text())
    assert report["loss_barrier"]["aligned"] < report["loss_barrier"]["naive"]
    for name in ("A.safetensors", "B.safetensors", "B_aligned.safetensors", "barrier.png"):
        assert (out / name).is_file()


def test_describe_state_dict(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    assert main(["describe", str(path), "--activation", "relu"]) == 0
    out = capsys.readouterr().out
    assert "positive-scaling" in out and "dense chain 4-8-2" in out


def test_describe_corrupt_file_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"garbage")
    assert main(["describe", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    for name, seed in (("A", 0), ("B", 1)):
        build("llama-gqa-tied", seed=seed).save_pretrained(folder / name)
    return folder / "A", folder / "B"


@pytest.fixture
def llama_folder(llama_pair):
    return llama_pair[0]


def _save_mlp(path, dtype=torch.float32):
    """A random 64-32-10 MLP state dict (digits-sized)."""
    from safetensors.torch import save_file

    torch.manual_seed(len(path.name))
    save_file({k: v.to(dtype).contiguous() for k, v in nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).state_dict().items()}, path)
    return path


def _assert_fails_cleanly(args, out, capsys, needle):
    assert main(args + ["--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("symm: error: ") and err.count("\n") == 1, err
    assert not out.exists()


def _copy(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_describe_hf_folder_checks_weights(llama_folder, capsys):
    assert main(["describe", str(llama_folder)]) == 0
    out = capsys.readouterr().out
    assert "20 tensors in 1 file(s), complete and finite" in out and "hf-llama" in out


def test_describe_hf_folder_with_nan_weights(llama_folder, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    folder = _copy(llama_folder, tmp_path)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[3]
    weights[name][0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert main(["describe", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and name in err and "Traceback" not in err


def test_describe_hf_folder_with_truncated_weights(llama_folder, tmp_path, capsys):
    folder = _copy(llama_folder, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    assert main(["describe", str(folder)]) == 2
    assert "truncated" in capsys.readouterr().err


@pytest.mark.parametrize("config", ['{"model_type": "llama", ', '["not a dict"]', '{"model_type": "nonsense"}', ""])
def test_describe_hf_folder_with_bad_config(llama_folder, tmp_path, capsys, config):
    folder = _copy(llama_folder, tmp_path)
    (folder / "config.json").write_text(config)
    assert main(["describe", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("symm: error: ") and err.count("\n") == 1, err


def test_describe_missing_target(tmp_path, capsys):
    assert main(["describe", str(tmp_path / "nope.pt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_unexpected_errors_are_one_line(monkeypatch, tmp_path, capsys):
    import aligners.job

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(aligners.job, "align", boom)
    assert main(["align", "a.pt", "b.pt", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == "symm: error: unexpected RuntimeError: something broke (rerun with -v for details)\n"


def test_activation_help_states_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["align", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: unknown, so only permutations are used" in text and "evaluated with relu" in text


# ---- align: argument and input checks, messages, -q (HF folders) ----


def test_points_below_two_refused_before_reading(tmp_path, capsys):
    from aligners.job import align
    from symm.errors import UsageError

    with pytest.raises(UsageError, match="at least 2"):
        align(tmp_path / "missing_a.pt", tmp_path / "missing_b.pt", tmp_path / "out", n_points=1)
    for points in ("0", "1"):
        with pytest.raises(SystemExit) as info:
            main(["align", "a.pt", "b.pt", "--points", points])
        assert info.value.code == 2
        assert "--points: must be at least 2 (the endpoints A and B)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--width", "0"], "--width: must be at least 1, got 0"),
        (["demo", "--epochs", "two"], "--epochs: not an integer: 'two'"),
        (["align", "a", "b", "--seed", "-1"], "--seed: must be at least 0, got -1"),
        (["align", "a", "b", "--learn-steps", "0"], "--learn-steps: must be at least 1"),
        (["merge", "a", "b", "--rounds", "0"], "--rounds: must be at least 1"),
        (["laws", "verify", "--lr", "-1"], "--lr: must be a finite number > 0, got -1"),
        (["laws", "verify", "--lr", "inf"], "--lr: must be a finite number > 0, got inf"),
        (["laws", "verify", "--weight-decay", "-0.1"], "--weight-decay: must be a finite number >= 0"),
        (["laws", "verify", "--every", "0"], "--every: must be at least 1"),
        (["zoo", "make", "--n-models", "0"], "--n-models: must be at least 1"),
        (["metanet", "train", "--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
        (["metanet", "train", "--batch-size", "0"], "--batch-size: must be at least 1"),
    ],
)
def test_bad_numbers_refused_by_the_parser(tmp_path, monkeypatch, capsys, argv, message):
    """Every numeric option is checked by argparse (exit code 2, the option named) before any work or output."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_mixed_dtypes_refused_up_front(tmp_path, capsys):
    pa, pb = _save_mlp(tmp_path / "A.safetensors"), _save_mlp(tmp_path / "B.safetensors", torch.float16)
    _assert_fails_cleanly(["align", str(pa), str(pb)], tmp_path / "out", capsys, "different dtypes")


def test_over_long_output_name_refused_up_front(tmp_path, capsys):
    pa, pb = _save_mlp(tmp_path / "A.safetensors"), _save_mlp(tmp_path / ("b" * 240 + ".safetensors"))
    _assert_fails_cleanly(["align", str(pa), str(pb)], tmp_path / "out", capsys, "longer than the file system allows")


def test_out_that_is_a_file_or_a_link_to_an_input(tmp_path, capsys):
    pa, pb = _save_mlp(tmp_path / "A.safetensors"), _save_mlp(tmp_path / "B.safetensors")
    before = pa.read_bytes()
    plain = tmp_path / "file.txt"
    plain.write_text("x")
    link = tmp_path / "link"
    link.symlink_to(pa)
    for out, needle in ((plain, "is an existing file"), (link, f"a link to {pa}")):
        assert main(["align", str(pa), str(pb), "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err
    assert pa.read_bytes() == before and plain.read_text() == "x" and link.is_symlink()


def test_never_deletes_an_input_inside_the_old_output(llama_pair, tmp_path, capsys):
    """``symm align OUT/aligned_model/A B --out OUT --overwrite`` must not delete A."""
    out = tmp_path / "OUT"
    inner = out / "aligned_model" / "A"
    shutil.copytree(llama_pair[0], inner)
    before = {p.name: p.read_bytes() for p in inner.iterdir()}
    assert main(["align", str(inner), str(llama_pair[1]), "--out", str(out), "--quiet", "--points", "3", "--overwrite"]) == 2
    assert "contains input" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in inner.iterdir()} == before
    # nor write into an input folder
    assert main(["align", str(llama_pair[0]), str(llama_pair[1]), "--out", str(llama_pair[0] / "sub"), "--quiet"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert not (llama_pair[0] / "sub").exists()


def test_align_truncated_hf_weights_fails_cleanly(llama_pair, tmp_path, capsys):
    cut = tmp_path / "cut"
    shutil.copytree(llama_pair[1], cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    _assert_fails_cleanly(["align", str(llama_pair[0]), str(cut)], tmp_path / "out", capsys, "truncated")


@pytest.mark.parametrize("other,needle", [("llama-mqa-untied", "num_key_value_heads: 2 vs 1"), ("gpt2", "model types differ: llama vs gpt2")])
def test_hf_architecture_mismatch_says_what_differs(llama_pair, tmp_path, capsys, other, needle):
    folder = tmp_path / other
    build(other, seed=1).save_pretrained(folder)
    _assert_fails_cleanly(["align", str(llama_pair[0]), str(folder)], tmp_path / "out", capsys, needle)


def test_quiet_silences_transformers_progress_bars(llama_pair, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    try:
        assert main(["align", str(llama_pair[0]), str(llama_pair[1]), "--out", str(tmp_path / "loud"), "--points", "3"]) == 0
        assert "Loading weights" in capsys.readouterr().err  # the control: bars are shown without -q
        assert main(["align", str(llama_pair[0]), str(llama_pair[1]), "--out", str(tmp_path / "quiet"), "--points", "3", "-q"]) == 0
        err = capsys.readouterr().err
        assert "Loading weights" not in err and "%|" not in err, err
    finally:
        hf_logging.enable_progress_bar()
