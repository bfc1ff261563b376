"""Learned matching: the continuous part of the group fitted to the data by gradient descent on the midpoint loss.

Start from weight matching (``init``: an element g0, and for an orthogonal stream the O0 found by
:mod:`aligners.orthogonal_stream`). Permutations and signs stay where weight matching put them (discrete). Every
continuous factor becomes ``compose(g0_f, exp(xi_f))`` with ``xi_f`` in its Lie algebra (GL per head, RoPE
rotation-scalings, scalings, router translations), and the stream ``O = O0 exp(Z - Z^T)`` (on 1^perp for a
LayerNorm stream, so O 1 = 1). Each step draws lambda ~ U(lo, hi) and minimises the next-token cross-entropy of
``(1 - lambda) fold(A) + lambda g.O.fold(B)`` on a batch of training windows (Theus et al. 2025: lambda ~ U(0.4, 0.6),
initialised from weight matching). The element with the lowest midpoint loss on held-out windows (part of the
training windows, never the test split) is kept, the start included, so learning never makes the fit worse there.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from symm.action import act, act_differentiable
from symm.element import GroupElement
from symm.errors import SpecError
from symm.evaluate import functional
from symm.folding import StreamLayout, complement_basis, fold, gains_of
from symm.spec import Spec

from .orthogonal_stream import OrthogonalMatch

log = logging.getLogger(__name__)

Params = Mapping[str, torch.Tensor]


@dataclass
class LearnedMatch:
    """The learned element ``g`` (and stream ``O``); call it on B to get the aligned B (B's dtypes)."""

    spec: Spec
    g: GroupElement
    O: torch.Tensor | None = None
    layout: StreamLayout | None = None
    gains: dict[str, torch.Tensor] | None = None  # A's norm gains (orthogonal stream only)
    history: list[dict] = field(default_factory=list)  # per evaluation: step, train loss, held-out midpoint loss
    start_loss: float = math.nan  # held-out midpoint loss of the weight-matching start
    best_loss: float = math.nan
    best_step: int = 0

    def __call__(self, params_b: Params) -> dict[str, torch.Tensor]:
        if self.O is None:
            return act(self.spec, params_b, self.g)
        assert self.layout is not None and self.gains is not None
        return OrthogonalMatch(self.spec, self.layout, self.O, self.g, self.gains)(params_b)

    def summary(self) -> dict:
        return {"start_midpoint_loss": self.start_loss, "best_midpoint_loss": self.best_loss, "best_step": self.best_step,
                "history": self.history}


def _rotate(params: Params, layout: StreamLayout, O: torch.Tensor) -> dict[str, torch.Tensor]:
    """Differentiable :func:`symm.folding.act_orthogonal` on folded float64 params: stream rows v -> O v."""
    out = dict(params)
    for t in layout.tensors:
        x = params[t.name].movedim(t.axis, -1)
        out[t.name] = (x @ O.T).movedim(-1, t.axis)
    return out


class _Stream(nn.Module):
    """O = O0 exp(Z - Z^T); on a centred stream the rotation acts on 1^perp only (O 1 = 1)."""

    def __init__(self, O0: torch.Tensor, centred: bool):
        super().__init__()
        d = O0.shape[0]
        self.O0, self.centred = O0.to(torch.float64), centred
        self.basis = complement_basis(d) if centred else torch.eye(d, dtype=torch.float64)
        n = self.basis.shape[1]
        self.z = nn.Parameter(torch.zeros(n, n, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        r = torch.linalg.matrix_exp(self.z - self.z.T)
        q = self.basis
        step = q @ r @ q.T + (torch.full_like(self.O0, 1.0 / self.O0.shape[0]) if self.centred else 0.0)
        return self.O0 @ step


def _continuous(spec: Spec, skip: set[str]) -> list[str]:
    return [n for n in spec.factor_order if spec.factors[n].is_continuous and spec.factors[n].dimension > 0 and n not in skip]


def _lm_loss(f: Callable, params: Params, windows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    x, y = windows[:, :-1], windows[:, 1:]
    out = f({k: v.to(dtype) for k, v in params.items()}, x)
    logits = getattr(out, "logits", out)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(torch.float64), y.reshape(-1))


def learned_matching(
    spec: Spec,
    model: nn.Module,
    params_a: Params,
    params_b: Params,
    windows: torch.Tensor,
    *,
    init: GroupElement,
    layout: StreamLayout | None = None,
    O: torch.Tensor | None = None,
    steps: int = 1000,
    lr: float = 3e-3,
    batch_size: int = 16,
    lam: tuple[float, float] = (0.4, 0.6),
    held_out: float = 0.2,
    eval_every: int = 25,
    patience: int = 6,
    seed: int = 0,
    progress: bool = False,
) -> LearnedMatch:
    """Fit the continuous factors (and ``O`` when ``layout`` is given) to the midpoint loss; see the module doc.

    ``windows``: (n, seq + 1) training token windows (inputs and next-token targets); the last ``held_out`` share
    decides which step is kept, and learning stops after ``patience`` evaluations in a row without a better
    held-out loss. ``model``: a module whose forward reads these params (``logits`` or a tensor)."""
    if steps < 0 or batch_size < 1 or eval_every < 1 or patience < 1:
        raise SpecError(
            f"learned matching needs steps >= 0, batch_size >= 1, eval_every >= 1, patience >= 1 (got {steps}, {batch_size}, {eval_every}, {patience})"
        )
    if not 0.0 <= lam[0] <= lam[1] <= 1.0:
        raise SpecError(f"lambda range must satisfy 0 <= lo <= hi <= 1, got {lam}")
    if (layout is None) != (O is None):
        raise SpecError("learned matching: give both the stream layout and its starting O, or neither")
    if windows.dim() != 2 or windows.shape[0] < 2 or windows.shape[1] < 2:
        raise SpecError(f"learned matching needs (n >= 2, seq + 1 >= 2) token windows, got shape {tuple(windows.shape)}")
    n_val = max(1, int(round(held_out * windows.shape[0])))
    train, val = windows[:-n_val], windows[-n_val:]
    if train.shape[0] < 1:
        raise SpecError(f"learned matching: {windows.shape[0]} windows leave none to train on after holding out {n_val}")
    dtype = next(iter(v for v in params_a.values() if torch.is_floating_point(v))).dtype
    dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    f = functional(model)
    a64 = {k: v.detach().to(torch.float64) for k, v in params_a.items()}
    b64 = {k: v.detach().to(torch.float64) for k, v in params_b.items()}
    if layout is not None:
        a64, b64 = fold(a64, layout), fold(b64, layout)
    skip: set[str] = set()
    names = _continuous(spec, skip)
    xi = nn.ParameterDict({n.replace(".", "__"): nn.Parameter(torch.zeros_like(spec.factors[n].identity())) for n in names})
    stream = _Stream(O, layout.centred) if layout is not None else None
    opt = torch.optim.Adam(list(xi.parameters()) + (list(stream.parameters()) if stream else []), lr=lr)
    g0 = {n: v.to(torch.float64) if torch.is_floating_point(v) else v for n, v in init.values.items()}

    def element() -> dict[str, torch.Tensor]:
        values = dict(g0)
        for n in names:
            factor = spec.factors[n]
            values[n] = factor.compose(g0[n], factor.exp(xi[n.replace(".", "__")]))
        return values

    def b_params(values) -> dict[str, torch.Tensor]:
        base = _rotate(b64, layout, stream()) if stream is not None else b64
        return act_differentiable(spec, base, values)

    def midpoint(t: float, batch: torch.Tensor) -> torch.Tensor:
        b = b_params(element())
        return _lm_loss(f, {k: (1 - t) * a64[k] + t * b[k] for k in a64}, batch, dtype)

    def snapshot():
        with torch.no_grad():
            values = {n: v.detach().clone() for n, v in element().items()}
            return values, (stream().detach().clone() if stream is not None else None)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(midpoint(0.5, val))

    gen = torch.Generator().manual_seed(seed)
    start = held_out_loss()
    best = (start, 0, snapshot())
    history = [{"step": 0, "train_loss": math.nan, "held_out_midpoint_loss": start}]
    bar = _progress(steps, progress)
    running = math.nan
    for step in range(1, steps + 1):
        idx = torch.randint(0, train.shape[0], (min(batch_size, train.shape[0]),), generator=gen)
        t = lam[0] + (lam[1] - lam[0]) * float(torch.rand((), generator=gen, dtype=torch.float64))
        loss = midpoint(t, train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        value = float(loss.detach())
        running = value if math.isnan(running) else 0.9 * running + 0.1 * value
        if step % eval_every == 0 or step == steps:
            val_loss = held_out_loss()
            history.append({"step": step, "train_loss": running, "held_out_midpoint_loss": val_loss})
            log.info("learned matching: step %d, train %.4f, held-out midpoint %.4f", step, running, val_loss)
            if val_loss < best[0]:
                best = (val_loss, step, snapshot())
            if bar is not None:
                bar.set_postfix(midpoint=f"{val_loss:.4f}")
            if (step - best[1]) // eval_every >= patience:
                log.info("learned matching: no better held-out loss in %d evaluations, stopping at step %d", patience, step)
                break
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    values, O_best = best[2]
    g = GroupElement(spec, {n: (v.to(init.values[n].dtype) if n in names else init.values[n]) for n, v in values.items()})
    gains = gains_of(params_a, layout) if layout is not None else None
    return LearnedMatch(spec, g, O_best, layout, gains, history, start, best[0], best[1])


def _progress(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="learned matching", unit="step", leave=False)


__all__ = ["LearnedMatch", "learned_matching"]
