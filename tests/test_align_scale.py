"""`symm align --barrier none` on Hugging Face folders without instantiating the models (aligners/lean_job.py):
the same aligned B as the from_pretrained path, multi-shard output in B's own layout that loads and keeps B's
logits, clear errors (exit 2, nothing written) for --device cuda without a GPU, --repair without a barrier, bad
weights and write failures. Small models only; nothing here asserts on time or memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from aligners.job import align
from hf_models import VOCAB, build
from symm.adapters import load_hf
from symm.cli import main
from symm.publish import FAULT_ENV


def _save(model, path, shard: str | None = None):
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Tied GQA Llama (one file each), untied MQA Llama with B in several shards, and a bfloat16 pair."""
    root = tmp_path_factory.mktemp("scale")
    tied = (_save(build("llama-gqa-tied", 0), root / "tied_A"), _save(build("llama-gqa-tied", 1), root / "tied_B"))
    untied = (_save(build("llama-mqa-untied", 0), root / "untied_A"), _save(build("llama-mqa-untied", 1), root / "untied_B", "20KB"))
    half = (_save(build("llama-mqa-untied", 0).to(torch.bfloat16), root / "bf16_A"), _save(build("llama-mqa-untied", 1).to(torch.bfloat16), root / "bf16_B"))
    return {"tied": tied, "untied": untied, "bf16": half}


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def _distance(x: dict, y: dict) -> float:
    num = sum(float((x[k].double() - y[k].double()).pow(2).sum()) for k in y)
    return (num / sum(float(v.double().pow(2).sum()) for v in y.values())) ** 0.5


@pytest.mark.parametrize("name", ["tied", "untied", "bf16"])
def test_lean_path_matches_layer_by_layer_as_well_as_the_in_memory_path(pairs, tmp_path, name):
    """The lean path matches one block of tensors at a time (aligners/layerwise.py); its aligned B is as close to A
    as the from_pretrained path's (within 5%: the same block-coordinate ascent, visited in another order), computes
    B's function, and the report says how many blocks and tensors per block."""
    pa, pb = pairs[name]
    lean = align(pa, pb, tmp_path / "lean", barrier="none", stream="signed", progress=False)
    full = align(pa, pb, tmp_path / "full", n_points=2, stream="signed", progress=False)
    assert lean["loader"].startswith("memory-mapped") and "loader" not in full
    assert lean["barrier"] == "none" and not (tmp_path / "lean" / "barrier.png").exists()
    assert lean["layerwise"]["blocks"] == 2 * 2 + 2 * 2 + 1 + 2  # attention, MLP and 2 norms per layer; final norm; embedding and head (tied: one tensor, two keys)
    assert lean["layerwise"]["largest_block_tensors"] == 4
    assert lean["function_check"]["max_relative_error"] < (1e-2 if name == "bf16" else 1e-5)
    a = load_hf(pa).state_dict()
    d_lean = _distance(load_hf(tmp_path / "lean" / "aligned_model").state_dict(), a)
    d_full = _distance(load_hf(tmp_path / "full" / "aligned_model").state_dict(), a)
    d_naive = _distance(load_hf(pb).state_dict(), a)
    assert d_lean < d_naive and d_lean <= 1.05 * d_full, (d_lean, d_full, d_naive)


def test_lean_path_recovers_a_planted_pair_exactly(tmp_path):
    from symm.action import act
    from symm.adapters import spec_from_hf
    from symm.element import GroupElement

    model = build("llama-mqa-untied", 0)
    spec = spec_from_hf(model)
    a = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "A")
    model.load_state_dict(act(spec, a, GroupElement.sample(spec, 4)))
    model.save_pretrained(tmp_path / "B", max_shard_size="20KB")
    report = align(tmp_path / "A", tmp_path / "B", tmp_path / "out", barrier="none", progress=False)
    assert report["layerwise"]["blocks"] > 4
    assert _distance(load_hf(tmp_path / "out" / "aligned_model").state_dict(), a) <= 1e-5


def test_multi_shard_output_keeps_layout_and_b_logits(pairs, tmp_path):
    pa, pb = pairs["untied"]
    shards = sorted(p.name for p in pb.glob("*.safetensors"))
    assert len(shards) > 1
    before = {p.name: p.read_bytes() for p in pb.iterdir()}
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--barrier", "none", "--device", "cpu", "-q"]) == 0
    folder = out / "aligned_model"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == shards
    assert json.loads((folder / "model.safetensors.index.json").read_text()) == json.loads((pb / "model.safetensors.index.json").read_text())
    assert (folder / "config.json").read_bytes() == (pb / "config.json").read_bytes()
    for shard in shards:  # same keys per shard, same dtypes and shapes
        written, original = load_file(folder / shard), load_file(pb / shard)
        assert {k: (v.dtype, v.shape) for k, v in written.items()} == {k: (v.dtype, v.shape) for k, v in original.items()}
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    la, lb = _logits(load_hf(folder), tokens), _logits(load_hf(pb), tokens)
    assert ((la - lb).abs().max() / lb.abs().max()).item() < 1e-5
    assert {p.name: p.read_bytes() for p in pb.iterdir()} == before  # inputs untouched
    report = json.loads((out / "report.json").read_text())
    assert report["device"] == "cpu" and report["function_check"]["max_relative_error"] < 1e-5
    assert set(report["outputs"]) == {"aligned", "report"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_device_cuda_without_gpu_is_a_usage_error(pairs, tmp_path, capsys):
    pa, pb = pairs["tied"]
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--barrier", "none", "--device", "cuda", "-q"]) == 2
    assert "--device cuda" in capsys.readouterr().err
    assert not out.exists()


def test_auto_device_is_cpu_here(pairs, tmp_path):
    pa, pb = pairs["tied"]
    report = align(pa, pb, tmp_path / "out", barrier="none", device="auto", progress=False)
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_repair_without_barrier_is_a_usage_error(pairs, tmp_path, capsys):
    pa, pb = pairs["tied"]
    out = tmp_path / "out"
    assert main(["align", str(pa), str(pb), "--out", str(out), "--barrier", "none", "--repair", "-q"]) == 2
    assert "--barrier none" in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_shard_and_other_architecture_fail_cleanly(pairs, tmp_path, capsys):
    pa, pb = pairs["untied"]
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in pb.iterdir():
        bad.joinpath(p.name).write_bytes(p.read_bytes())
    shard = sorted(bad.glob("*.safetensors"))[-1]
    tensors = load_file(shard)
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["align", str(pa), str(bad), "--out", str(out), "--barrier", "none", "-q"]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert not out.exists()
    tied_a, _ = pairs["tied"]
    assert main(["align", str(tied_a), str(pb), "--out", str(out), "--barrier", "none", "-q"]) == 2
    assert "different architectures" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("stage", ["staged-model", "staged"])
def test_write_failure_leaves_nothing(pairs, tmp_path, monkeypatch, capsys, stage):
    pa, pb = pairs["untied"]
    out = tmp_path / "out"
    monkeypatch.setenv(FAULT_ENV, f"{stage}:enospc")
    assert main(["align", str(pa), str(pb), "--out", str(out), "--barrier", "none", "-q"]) == 2
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.delenv(FAULT_ENV)
    assert main(["align", str(pa), str(pb), "--out", str(out), "--barrier", "none", "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["aligned_model", "report.json"]


def test_orthogonal_stream_without_barrier(pairs, tmp_path):
    pa, pb = pairs["untied"]
    report = align(pa, pb, tmp_path / "out", barrier="none", stream="orthogonal", progress=False)
    assert report["stream"] == "orthogonal" and report["loader"].startswith("memory-mapped")
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    la, lb = _logits(load_hf(tmp_path / "out" / "aligned_model"), tokens), _logits(load_hf(pb), tokens)
    assert ((la - lb).abs().max() / lb.abs().max()).item() < 1e-4


def test_disk_full_while_writing_shards_leaves_nothing(pairs, tmp_path, monkeypatch, capsys):
    import subprocess

    pa, pb = pairs["untied"]
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(disk)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({exc})")
    try:
        monkeypatch.setattr("aligners.outputs._check_space", lambda home, need: None)
        assert main(["align", str(pa), str(pb), "--out", str(disk / "out"), "--barrier", "none", "-q"]) == 2
        err = capsys.readouterr().err
        assert "nothing was written" in err, err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=False, capture_output=True)


def test_state_dicts_without_barrier_write_no_plot(tmp_path):
    from symm.evaluate import state_dict_of
    from symm.io import save_state_dict
    from symm.models import MLP, MLPConfig

    paths = []
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        paths.append(save_state_dict(state_dict_of(MLP(MLPConfig((64, 32, 10), "relu"))), tmp_path / f"{name}.safetensors"))
    report = align(*paths, tmp_path / "out", barrier="none", progress=False)
    assert report["barrier"] == "none" and "loss_barrier" not in report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["B_aligned.safetensors", "report.json"]


def test_stream_save_writes_a_valid_safetensors_file_tensor_by_tensor(tmp_path):
    from symm.io import safetensors_header
    from symm.shards import stream_save

    tensors = {"b": torch.randn(3, 5), "a": torch.arange(7, dtype=torch.int64), "c": torch.randn(4, dtype=torch.float64).to(torch.bfloat16)}
    save_file(tensors, tmp_path / "src.safetensors", metadata={"format": "pt"})
    table = safetensors_header(tmp_path / "src.safetensors")
    seen = []
    stream_save(tmp_path / "out.safetensors", table, lambda k: tensors[k] * (2 if k == "b" else 1), {"format": "pt"}, after_tensor=seen.append)
    assert sorted(seen) == ["a", "b", "c"]
    back = load_file(tmp_path / "out.safetensors")
    assert torch.equal(back["b"], 2 * tensors["b"]) and torch.equal(back["a"], tensors["a"]) and torch.equal(back["c"], tensors["c"])
    assert safetensors_header(tmp_path / "out.safetensors") == table  # same dtypes, shapes and byte ranges
    with pytest.raises(OSError, match="the layout says"):
        stream_save(tmp_path / "bad.safetensors", table, lambda k: tensors[k].double(), None)
