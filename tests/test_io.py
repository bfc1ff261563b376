"""Checkpoint I/O: round trips, clear errors for bad files, atomic writes that never overwrite inputs."""

from __future__ import annotations

import os

import pytest
import torch

from symm.errors import CheckpointError
from symm.io import (
    assert_finite,
    atomic_write_text,
    check_weights_file,
    compare_state_dicts,
    load_state_dict,
    safetensors_header,
    save_state_dict,
)


@pytest.fixture
def params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g), "n": torch.tensor(3)}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path, params, suffix):
    path = save_state_dict(params, tmp_path / f"m{suffix}")
    back = load_state_dict(path)
    assert set(back) == set(params)
    for k in params:
        assert torch.equal(back[k], params[k])
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_refuses_to_overwrite(tmp_path, params):
    path = save_state_dict(params, tmp_path / "m.pt")
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match="already exists"):
        save_state_dict({"x": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="input"):
        save_state_dict({"x": torch.zeros(1)}, path, overwrite=True, protect=[path])
    assert path.read_bytes() == before


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_state_dict(path)


def test_truncated_file(tmp_path, params):
    path = save_state_dict(params, tmp_path / "m.safetensors")
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 8])
    with pytest.raises(CheckpointError, match=r"cut.safetensors.*truncated: its header describes \d+ bytes"):
        load_state_dict(cut)
    cut.write_bytes(data[:20])  # inside the header
    with pytest.raises(CheckpointError, match="no complete header"):
        load_state_dict(cut)
    longer = tmp_path / "longer.safetensors"
    longer.write_bytes(data + b"\0" * 16)
    with pytest.raises(CheckpointError, match="16 bytes after the last tensor"):
        safetensors_header(longer)
    assert set(safetensors_header(path)) == set(params)


def test_check_weights_file_reads_every_tensor(tmp_path, params):
    path = save_state_dict(params, tmp_path / "m.safetensors")
    assert check_weights_file(path) == len(params)
    bad = dict(params)
    bad["a.weight"] = bad["a.weight"].clone()
    bad["a.weight"][1, 1] = float("inf")
    from safetensors.torch import save_file

    save_file(bad, tmp_path / "inf.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.weight \(0 NaN, 1 Inf\)"):
        check_weights_file(tmp_path / "inf.safetensors")


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(tmp_path, params, mask):
    old = os.umask(mask)
    try:
        paths = [save_state_dict(params, tmp_path / "m.safetensors"), save_state_dict(params, tmp_path / "m.pt")]
        paths.append(atomic_write_text(tmp_path / "r.json", "{}"))
    finally:
        os.umask(old)
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p


def test_missing_and_unknown_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_state_dict(tmp_path / "nope.pt")
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="suffix"):
        load_state_dict(tmp_path / "m.npz")


class Evil:
    """An arbitrary pickled object: weights_only loading must refuse it."""


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "obj.pt"
    torch.save({"w": torch.zeros(2), "obj": Evil()}, path)
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    msg = str(info.value)
    assert "holds pickled Python objects, not only tensors" in msg and "Evil" in msg
    assert "was not loaded" in msg and "can run code" in msg
    assert "weights_only" not in msg and "\n" not in msg  # no advice to switch the safety off


def test_non_tensor_entries(tmp_path):
    path = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="epoch"):
        load_state_dict(path)


def test_wrapped_state_dict(tmp_path, params):
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": params}, path)
    assert set(load_state_dict(path)) == set(params)


def test_nan_and_inf_named(tmp_path, params):
    bad = dict(params)
    bad["a.bias"] = bad["a.bias"].clone()
    bad["a.bias"][0] = float("nan")
    with pytest.raises(CheckpointError, match=r"a\.bias"):
        assert_finite(bad)
    path = tmp_path / "nan.pt"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="NaN"):
        load_state_dict(path)
    with pytest.raises(CheckpointError, match="non-finite"):
        save_state_dict(bad, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_compare_state_dicts(params):
    other = dict(params)
    other.pop("a.bias")
    other["extra"] = torch.zeros(1)
    other["a.weight"] = torch.zeros(5, 3)
    with pytest.raises(CheckpointError) as info:
        compare_state_dicts(params, other)
    msg = str(info.value)
    assert "a.bias" in msg and "extra" in msg and "(4, 3)" in msg
    compare_state_dicts(params, dict(params))


def test_compare_state_dicts_dtypes(params):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in params.items()}
    with pytest.raises(CheckpointError, match=r"different dtypes: a\.bias \(float32 vs float16\)"):
        compare_state_dicts(params, half)
    compare_state_dicts(half, dict(half))
