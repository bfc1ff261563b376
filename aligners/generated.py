"""Token windows sampled from the models themselves: data for learned matching when the user has none.

Each model writes an equal share of the windows by ancestral sampling at temperature 1 (x_t ~ softmax(logits_t / T)),
starting from a first token drawn uniformly from the vocabulary. The midpoint loss on these windows asks the
interpolated model to predict what A and B predict, on text from A's and B's own distributions: no corpus is read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from symm.errors import UsageError
from symm.evaluate import functional

Params = Mapping[str, torch.Tensor]


def _logits(out) -> torch.Tensor:
    """The logits of a forward's output (a transformers ``ModelOutput`` or a tensor)."""
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def sample_windows(
    model: nn.Module,
    params: Sequence[Params],
    count: int,
    length: int,
    *,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 64,
    progress: bool = False,
) -> torch.Tensor:
    """``(count, length)`` token windows, the i-th share sampled from ``params[i]`` (shares differ by at most one).

    Autoregressive, without a cache (each step re-reads the window; fine for the short windows of learned matching).
    """
    if count < len(params) or length < 2:
        raise UsageError(f"need at least one window per model and 2 tokens per window, got {count} windows of {length}")
    if not temperature > 0:
        raise UsageError(f"temperature must be > 0, got {temperature}")
    f = functional(model)
    gen = torch.Generator().manual_seed(seed)
    shares = [count // len(params) + (i < count % len(params)) for i in range(len(params))]
    out = []
    steps = sum((s + batch_size - 1) // batch_size for s in shares) * (length - 1)
    bar = tqdm(total=steps, desc="sampling windows", unit="token", disable=not progress, leave=False)
    vocab = _logits(f(dict(params[0]), torch.zeros(1, 1, dtype=torch.long))).shape[-1]
    for p, share in zip(params, shares):
        p = dict(p)
        for start in range(0, share, batch_size):
            n = min(batch_size, share - start)
            x = torch.randint(0, vocab, (n, 1), generator=gen)
            for _ in range(length - 1):
                logits = _logits(f(p, x))[:, -1].to(torch.float64)
                if not torch.isfinite(logits).all():
                    raise UsageError("a model produced non-finite logits while sampling windows; learned matching needs data (--data)")
                probs = torch.softmax(logits / temperature, -1)
                x = torch.cat([x, torch.multinomial(probs, 1, generator=gen)], 1)
                bar.update(1)
            out.append(x)
    bar.close()
    return torch.cat(out)


__all__ = ["sample_windows"]
