"""The LM training loop's learning-rate schedule (warm-up, constant or cosine) and its refusals."""

from __future__ import annotations

import math

import pytest
import torch

from symm.models import TransformerConfig, TransformerLM
from symm.train import lr_factor, train_lm


def test_lr_factor_warms_up_then_follows_the_schedule():
    assert [lr_factor(k, 100, 4, "constant") for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 100, 0, "cosine") == 1.0
    assert lr_factor(50, 100, 0, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 0, "cosine") == pytest.approx(0.0, abs=1e-15)
    cos = [lr_factor(k, 100, 10, "cosine") for k in range(100)]
    assert cos[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(0.0)))
    assert all(x > y for x, y in zip(cos[10:], cos[11:])), "decreasing after the warm-up"
    assert cos[-1] < 1e-3


def _tiny_lm() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=16, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_len=9, ffn="relu"))


def _windows() -> torch.Tensor:
    return torch.randint(0, 16, (32, 9), generator=torch.Generator().manual_seed(1))


def test_cosine_schedule_changes_training_and_is_deterministic():
    runs = [train_lm(_tiny_lm(), _windows(), steps=20, batch_size=4, lr=1e-2, warmup=5, schedule=s, progress=False) for s in ("cosine", "cosine", "constant")]
    a, b, c = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in runs)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c), "the schedule must reach the optimiser"


@pytest.mark.parametrize("kwargs, message", [({"schedule": "linear"}, "schedule must be one of"), ({"warmup": -1}, "warmup must be >= 0")])
def test_bad_schedule_is_refused_before_training(kwargs, message):
    model = _tiny_lm()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        train_lm(model, _windows(), steps=3, progress=False, **kwargs)
    assert all(torch.equal(x, p) for x, p in zip(before, model.parameters()))
