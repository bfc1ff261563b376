"""Straight-through estimation: planted elements recovered (MLP and a RoPE/GQA transformer), and on two trained
digits MLPs the midpoint found is no worse than weight matching's on the selection batch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from aligners import weight_matching
from aligners.ste import STEInfo, ste_matching
from planted import reference_params, rel_distance
from symm.action import act
from symm.data import digits
from symm.element import GroupElement
from symm.errors import UsageError
from symm.evaluate import functional, state_dict_of
from symm.models import MLP, MLPConfig, TransformerConfig, build_model, spec_for
from symm.train import train_classifier


def _batches(x, y, size=64, seed=0):
    def make():
        gen = torch.Generator().manual_seed(seed)
        while True:
            idx = torch.randperm(len(x), generator=gen)[:size]
            yield x[idx], y[idx]

    return make


@pytest.mark.parametrize("config", [MLPConfig((64, 32, 32, 10), "relu"), TransformerConfig(pe="rope", n_kv_heads=2, norm="rms")],
                         ids=["mlp-relu", "lm-rope-gqa"])
def test_planted_element_is_recovered(config):
    spec = spec_for(config)
    a = reference_params(config, 0)
    h = GroupElement.sample(spec, 7)
    b = act(spec, a, h)
    model = build_model(config).double()
    f = functional(model)
    if isinstance(config, TransformerConfig):
        x = torch.randint(0, config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
        target = f(a, x).detach()
    else:
        x = torch.randn(64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        target = f(a, x).detach()
    loss_fn = lambda p, batch: (f(p, batch) - target).pow(2).mean()  # noqa: E731 - the midpoint should compute A's function
    info = STEInfo()
    g = ste_matching(spec, loss_fn, a, b, iter([x] * 5), steps=5, lr=1e-3, eval_batch=x, progress=False, info=info)
    assert len(info.losses) == 5 and all(v == v for v in info.losses)
    assert rel_distance(act(spec, b, g), a) <= 1e-6
    for name in spec.permutation_factors:
        assert torch.equal(g.values[name], h.inverse().values[name])


def test_trained_digits_midpoint_not_worse_than_weight_matching():
    data = digits()
    config = MLPConfig((64, 64, 64, 10), "relu")
    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        models.append(train_classifier(MLP(config), data.x_train, data.y_train, epochs=8, seed=seed, progress=False))
    a, b = state_dict_of(models[0]), state_dict_of(models[1])
    spec = spec_for(models[0])
    f = functional(models[0])
    loss_fn = lambda p, batch: nn.functional.cross_entropy(f(p, batch[0]), batch[1])  # noqa: E731
    select = (data.x_train[:400], data.y_train[:400])

    def midpoint(g):
        moved = act(spec, b, g)
        with torch.no_grad():
            return float(loss_fn({k: 0.5 * (a[k] + moved[k]) for k in a}, select))

    info = STEInfo()
    g = ste_matching(spec, loss_fn, a, b, _batches(data.x_train, data.y_train), steps=25, lr=1e-2, eval_batch=select,
                     progress=False, info=info)
    wm = weight_matching(spec, a, b, progress=False)
    assert midpoint(g) <= midpoint(wm) + 1e-7
    assert midpoint(g) < 0.5 * midpoint(GroupElement.identity(spec))  # far better than the naive midpoint
    assert len(info.losses) == 25 and 0 <= info.best_step <= 25


def test_bad_arguments():
    config = MLPConfig((8, 4, 3), "relu")
    spec = spec_for(config)
    a = reference_params(config, 0)
    with pytest.raises(UsageError, match="lr > 0"):
        ste_matching(spec, lambda p, x: torch.zeros(()), a, a, iter([]), lr=0.0, progress=False)
