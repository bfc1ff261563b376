"""The command line: demo (embedded default job) and describe, including clear errors on bad input."""

from __future__ import annotations

import json

import torch
from torch import nn

from symm.cli import main


def test_demo_runs_and_preserves_function(tmp_path, capsys):
    rc = main(["demo", "--width", "32", "--epochs", "5", "--quiet", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "logits unchanged" in out
    report = json.loads((tmp_path / "demo.json").read_text())
    assert report["logit_relative_error"] < 1e-5
    assert report["accuracy_transformed"] == report["accuracy_a"]
    assert report["weight_change_relative"] > 0.1
    assert report["one_sided_accuracy"] < report["accuracy_a"]


def test_describe_state_dict(tmp_path, capsys):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    assert main(["describe", str(path), "--activation", "relu"]) == 0
    out = capsys.readouterr().out
    assert "0.units.scale" in out and "dense chain 4-8-2" in out


def test_describe_corrupt_file_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"garbage")
    assert main(["describe", str(path)]) == 2
    assert "cannot read" in capsys.readouterr().err
