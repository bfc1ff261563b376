"""Straight-through estimation (STE) of the group element (Ainsworth et al. 2023, Git Re-Basin, Sec. 3.3).

A continuous proxy ``W`` (shaped like the weights) is trained so that the midpoint of A and the **projection** of B
onto ``W`` has low loss. The projection is weight matching of B against ``W`` (a linear assignment per permutation,
the continuous factors set canonically): ``g(W) = argmax_g <W, g.theta_B>``. Forward pass: the midpoint
``(theta_A + g(W).theta_B) / 2``. Backward pass: straight through, as if ``g(W).theta_B`` were ``W``
(``g.theta_B + W - stopgrad(W)``), so the loss gradient reaches ``W``. ``W`` starts at the weight-matching answer
``g_0.theta_B`` (warm start: the first projection is ``g_0``), and each projection is warm-started from the last.
Any Spec whose factors weight matching handles works; the caller supplies the loss on its own data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from symm.action import act
from symm.element import GroupElement
from symm.errors import UsageError
from symm.spec import Spec

from .weight_matching import Values, weight_matching

log = logging.getLogger(__name__)

Params = Mapping[str, torch.Tensor]
#: ``loss_fn(params, batch) -> scalar tensor`` (differentiable in the floating parameters)
LossFn = Callable[[dict[str, torch.Tensor], object], torch.Tensor]


@dataclass
class STEInfo:
    """Per step the midpoint loss of the projected element; the step whose projection is returned."""

    losses: list[float] = field(default_factory=list)
    changes: int = 0  # steps whose projection differed from the previous one
    best_step: int = -1


def _discrete_equal(spec: Spec, g: GroupElement, h: GroupElement) -> bool:
    return all(torch.equal(g.values[n], h.values[n]) for n in spec.permutation_factors)


def ste_matching(
    spec: Spec,
    loss_fn: LossFn,
    params_a: Params,
    params_b: Params,
    batches: Callable[[], Iterator[object]] | Iterator[object],
    *,
    steps: int = 200,
    lr: float = 1e-2,
    init: Values = None,
    seed: int = 0,
    backend: str = "auto",
    eval_batch: object | None = None,
    progress: bool = True,
    info: STEInfo | None = None,
) -> GroupElement:
    """The element g with ``g . params_b`` whose midpoint with A has low loss (see the module docstring).

    ``batches``: an iterator of batches for ``loss_fn`` (or a callable returning a fresh one; restarted when
    exhausted). ``eval_batch``: if given, the projection with the lowest midpoint loss on it is returned (the
    warm start included), else the last projection. ``init``: warm start of the first weight matching.
    """
    if steps < 0 or not lr > 0:
        raise UsageError(f"STE needs steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    info = info if info is not None else STEInfo()
    g = weight_matching(spec, params_a, params_b, init=init, seed=seed, backend=backend, progress=False)
    floats = [k for k, v in params_a.items() if torch.is_floating_point(v)]
    a = {k: v.detach() for k, v in params_a.items()}
    proxy = {k: v.detach().clone().requires_grad_(True) for k, v in act(spec, params_b, g).items() if k in floats}
    opt = torch.optim.Adam(proxy.values(), lr=lr)

    def midpoint_loss(element: GroupElement, batch) -> float:
        moved = act(spec, params_b, element)
        with torch.no_grad():
            return float(loss_fn({k: (0.5 * (a[k] + moved[k]) if k in proxy else a[k]) for k in a}, batch))

    best = (midpoint_loss(g, eval_batch), g, 0) if eval_batch is not None else None
    make = batches if callable(batches) else None
    it = make() if make is not None else batches
    bar = tqdm(range(steps), desc="STE", unit="step", disable=not progress, leave=False)
    for step in bar:
        try:
            batch = next(it)
        except StopIteration:
            if make is None:
                break
            it = make()
            batch = next(it)
        moved = act(spec, params_b, g)
        mid = {k: (0.5 * (a[k] + moved[k].detach() + proxy[k] - proxy[k].detach()) if k in proxy else a[k]) for k in a}
        loss = loss_fn(mid, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = float(loss.detach())
        info.losses.append(value)
        with torch.no_grad():
            target = {k: (proxy[k].detach() if k in proxy else v) for k, v in params_a.items()}
        new = weight_matching(spec, target, params_b, init=g, seed=seed, backend=backend, progress=False)
        info.changes += not _discrete_equal(spec, new, g)
        g = new
        if best is not None:
            held = midpoint_loss(g, eval_batch)
            if held < best[0]:
                best = (held, g, step + 1)
        bar.set_postfix(loss=f"{value:.4f}")
    if best is not None:
        info.best_step = best[2]
        g = best[1]
    else:
        info.best_step = len(info.losses)
    log.info("STE: %d steps, %d projection changes, returned step %d", len(info.losses), info.changes, info.best_step)
    return g


def classifier_ste_matcher(spec: Spec, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int = 100,
                           lr: float = 1e-2, batch_size: int = 128, select: int = 512, seed: int = 0, backend: str = "auto"):
    """A MergeMany matcher ``(target, params, init) -> element``: STE of ``params`` against ``target`` on a classifier's
    training data (cross-entropy of the midpoint, shuffled batches of ``batch_size``; the projection with the lowest
    midpoint loss on the first ``select`` samples is kept)."""
    from symm.evaluate import functional

    f = functional(model)

    def loss_fn(params, batch):
        return torch.nn.functional.cross_entropy(f(params, batch[0]), batch[1])

    def batches():
        gen = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(x), generator=gen).split(batch_size):
                yield x[idx], y[idx]

    def match(target, params, init):
        return ste_matching(spec, loss_fn, target, params, batches, steps=steps, lr=lr, init=init, seed=seed, backend=backend,
                            eval_batch=(x[:select], y[:select]), progress=False)

    return match


__all__ = ["LossFn", "STEInfo", "classifier_ste_matcher", "ste_matching"]
