"""The command line: demo (embedded default job) and describe, including clear errors on bad input."""

from __future__ import annotations

import json

import torch
from torch import nn

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
