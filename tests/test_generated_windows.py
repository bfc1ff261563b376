"""Windows sampled from the models themselves (aligners.generated): shapes, determinism, each share drawn from
its own model, clear errors."""

from __future__ import annotations

import pytest
import torch

from aligners.generated import sample_windows
from planted import reference_params
from symm.errors import UsageError
from symm.evaluate import functional
from symm.models import TransformerConfig, build_model

CONFIG = TransformerConfig(norm="rms", pe="rope", vocab_size=12, d_model=16, n_heads=2, d_ff=24, n_layers=1, max_len=16)


def _model_and_params():
    model = build_model(CONFIG).double().eval()
    a, b = (reference_params(CONFIG, s) for s in (0, 1))
    peaked = lambda p: {k: 3 * v if v.dim() >= 2 else v for k, v in p.items()}  # noqa: E731
    return model, peaked(a), peaked(b)


def _mean_log_likelihood(model, params, windows) -> float:
    with torch.no_grad():
        logits = functional(model)(params, windows[:, :-1]).double()
    return float(torch.log_softmax(logits, -1).gather(-1, windows[:, 1:, None]).mean())


def test_shapes_vocabulary_and_determinism():
    model, a, b = _model_and_params()
    w = sample_windows(model, [a, b], 7, 9, seed=3, batch_size=2)
    assert w.shape == (7, 9) and w.dtype == torch.long
    assert int(w.min()) >= 0 and int(w.max()) < CONFIG.vocab_size
    assert torch.equal(w, sample_windows(model, [a, b], 7, 9, seed=3, batch_size=2))
    assert not torch.equal(w, sample_windows(model, [a, b], 7, 9, seed=4, batch_size=2))


def test_each_share_comes_from_its_own_model():
    """A's share is likelier under A than under B, and B's share under B (negative control: swapping the order of
    the models swaps which half is which)."""
    model, a, b = _model_and_params()
    w = sample_windows(model, [a, b], 64, 10, seed=0)
    from_a, from_b = w[:32], w[32:]
    assert _mean_log_likelihood(model, a, from_a) > _mean_log_likelihood(model, b, from_a) + 0.1
    assert _mean_log_likelihood(model, b, from_b) > _mean_log_likelihood(model, a, from_b) + 0.1
    swapped = sample_windows(model, [b, a], 64, 10, seed=0)
    assert _mean_log_likelihood(model, b, swapped[:32]) > _mean_log_likelihood(model, a, swapped[:32])


def test_temperature_sharpens():
    """Lower temperature: windows likelier under their model (the sampling really uses the model's logits)."""
    model, a, _ = _model_and_params()
    hot = sample_windows(model, [a], 64, 10, seed=0, temperature=2.0)
    cold = sample_windows(model, [a], 64, 10, seed=0, temperature=0.3)
    assert _mean_log_likelihood(model, a, cold) > _mean_log_likelihood(model, a, hot) + 0.1


@pytest.mark.parametrize("kwargs, message", [({"count": 1}, "one window per model"), ({"length": 1}, "2 tokens"),
                                             ({"temperature": 0.0}, "temperature"), ({"temperature": float("nan")}, "temperature")])
def test_bad_arguments(kwargs, message):
    model, a, b = _model_and_params()
    args = {"count": 4, "length": 5} | kwargs
    with pytest.raises(UsageError, match=message):
        sample_windows(model, [a, b], args.pop("count"), args.pop("length"), **args)


def test_non_finite_logits_refused():
    model, a, b = _model_and_params()
    bad = dict(a)
    name = next(k for k, v in a.items() if v.dim() >= 2)
    bad[name] = torch.full_like(a[name], float("nan"))
    with pytest.raises(UsageError, match="non-finite"):
        sample_windows(model, [bad, b], 4, 5)
