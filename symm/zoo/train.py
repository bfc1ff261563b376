"""Train a chunk of runs of one architecture at once: ``torch.func.vmap`` over a stack of models.

Every run owns its randomness (initialisation, training subset, label noise, minibatch order and dropout masks
come from its own seed) and every operation is per model, so a run's weights are bit-identical whichever chunk,
worker or machine trains it. Optimisers (SGD, SGD with momentum 0.9, Adam) are one update rule with per-model
learning rate, L2 weight decay (added to the gradient) and kind; a run whose step budget is spent gets learning
rate 0, which leaves its weights exactly unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from ..errors import UsageError
from ..models import build_model
from .datasets import ZooData, load_dataset
from .space import Run

MOMENTUM = 0.9
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


@dataclass(frozen=True)
class ChunkTask:
    """Runs of one architecture, trained together."""

    arch: str  # architecture id (manifest key)
    config: object  # reference-model config
    dataset: str
    split_seed: int
    runs: tuple[Run, ...]
    checkpoint_epochs: tuple[int, ...]
    batch_size: int


@dataclass(frozen=True)
class ChunkResult:
    arch: str
    rows: list[dict[str, object]]  # sorted by run then epoch
    weights: dict[str, torch.Tensor]  # name -> [len(rows), *shape]


@lru_cache(maxsize=4)
def _dataset(name: str, split_seed: int) -> ZooData:
    return load_dataset(name, split_seed)


def checkpoint_steps(run: Run, n_train: int, batch_size: int, epochs: Sequence[int]) -> dict[int, int]:
    """Step -> epoch of each saved checkpoint: the listed epochs up to the run's budget, and its last epoch."""
    per_epoch = n_train / batch_size
    wanted = sorted({e for e in epochs if e <= run.epochs} | {run.epochs})
    return {round(e * per_epoch): e for e in wanted}


def train_chunk(task: ChunkTask) -> ChunkResult:
    """Train every run of ``task`` (single-threaded, so results do not depend on the thread count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():  # vmap runs attention per model (no batching rule for CPU SDPA): expected
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented the batching rule")
            return _train(task, _dataset(task.dataset, task.split_seed))
    finally:
        torch.set_num_threads(threads)


def _train(task: ChunkTask, data: ZooData) -> ChunkResult:
    model = build_model(task.config).train()
    runs, B = task.runs, task.batch_size
    M = len(runs)
    gens = [torch.Generator().manual_seed(r.seed) for r in runs]
    params = _init(task.config, runs)
    members, labels, streams, budgets = zip(*[_run_data(r, g, data, B) for r, g in zip(runs, gens)])
    member = torch.stack(members)  # [M, n_train] bool: the run's training subset
    y_run = torch.stack(labels)  # [M, n_train] the run's (noisy) labels
    total = max(budgets)
    stream = torch.stack([torch.cat([s, s[-1:].expand(total - len(s), B)]) if len(s) < total else s for s in streams])
    saves = [checkpoint_steps(r, int(m.sum()), B, task.checkpoint_epochs) for r, m in zip(runs, members)]
    hidden = model.hidden_shapes(B) if hasattr(model, "hidden_shapes") else None
    use_dropout = any(r.dropout > 0 for r in runs)
    if use_dropout and hidden is None:
        raise UsageError(f"{type(model).__name__} takes no dropout masks: use a search space with dropout (0.0,)")

    def loss(p, x, y, masks):
        logits = functional_call(model, p, (x,), {"dropout": masks} if masks is not None else {})
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    step_fn = vmap(grad_and_value(loss), in_dims=(0, 0, 0, 0 if use_dropout else None))
    opt = _Optimizer(runs, params, budgets)
    snaps: dict[tuple[int, int], tuple[dict[str, torch.Tensor], dict[str, float]]] = {}
    for t in range(total + 1):
        due = [m for m in range(M) if t in saves[m]]
        if due:
            metrics = _evaluate(model, params, due, data, y_run, member)
            for j, m in enumerate(due):
                snaps[(m, saves[m][t])] = ({k: v[m].clone() for k, v in params.items()}, {**metrics[j], "step": t})
        if t == total:
            break
        idx = stream[:, t]  # [M, B]
        x = data.x_train[idx]
        y = y_run[torch.arange(M)[:, None], idx]
        masks = _dropout_masks(runs, gens, hidden) if use_dropout else None
        grads, _ = step_fn(params, x, y, masks)
        params = opt.step(params, grads, t)
    return _collect(task, snaps)


def _init(config: object, runs: Sequence[Run]) -> dict[str, torch.Tensor]:
    """Each run's default PyTorch initialisation from its own seed, times its ``init_scale``."""
    per_run = []
    for r in runs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(r.seed)
            per_run.append({k: v.detach() * r.init_scale for k, v in build_model(config).named_parameters()})
    return {k: torch.stack([p[k] for p in per_run]) for k in per_run[0]}


def _run_data(run: Run, gen: torch.Generator, data: ZooData, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The run's training subset (mask), noisy labels, minibatch index stream ``[steps, B]`` and step budget."""
    n = len(data.y_train)
    size = max(B, round(run.train_fraction * n))
    subset = torch.randperm(n, generator=gen)[:size]
    member = torch.zeros(n, dtype=torch.bool)
    member[subset] = True
    y = data.y_train.clone()
    flip = torch.rand(y.shape, generator=gen) < run.label_noise  # per label (per token for text)
    y[flip] = torch.randint(0, data.n_classes, (int(flip.sum()),), generator=gen)
    steps = max(1, round(run.epochs * size / B))
    n_epochs = math.ceil(steps * B / size)
    order = torch.cat([subset[torch.randperm(size, generator=gen)] for _ in range(n_epochs)])
    return member, y, order[: steps * B].reshape(steps, B), steps


def _dropout_masks(runs: Sequence[Run], gens: Sequence[torch.Generator], shapes: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """Inverted-dropout masks per hidden layer, ``[M, *shape]``, each run from its own generator."""
    out = []
    for s in shapes:
        per_run = []
        for r, g in zip(runs, gens):
            if r.dropout > 0:
                per_run.append((torch.rand(s, generator=g) >= r.dropout).float() / (1 - r.dropout))
            else:
                per_run.append(torch.ones(s))
        out.append(torch.stack(per_run))
    return out


class _Optimizer:
    """SGD / momentum / Adam as one per-model update ``p <- p - lr_t * direction`` (lr_t = 0 past the budget)."""

    def __init__(self, runs: Sequence[Run], params: dict[str, torch.Tensor], budgets: Sequence[int]) -> None:
        self.lr = torch.tensor([r.learning_rate for r in runs], dtype=torch.float32)
        self.wd = torch.tensor([r.weight_decay for r in runs], dtype=torch.float32)
        self.adam = torch.tensor([r.optimizer == "adam" for r in runs])
        self.momentum = torch.tensor([r.optimizer == "momentum" for r in runs])
        self.budget = torch.tensor(list(budgets))
        self.state = {k: (torch.zeros_like(v), torch.zeros_like(v), torch.zeros_like(v)) for k, v in params.items()}

    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
        b1, b2 = ADAM_BETAS
        lr = torch.where(t < self.budget, self.lr, torch.zeros_like(self.lr))
        c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        out = {}
        for k, p in params.items():
            view = (-1,) + (1,) * (p.dim() - 1)
            g = grads[k] + self.wd.view(view) * p
            buf, m1, v = self.state[k]
            buf = MOMENTUM * buf + g
            m1 = b1 * m1 + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            adam_dir = (m1 / c1) / ((v / c2).sqrt() + ADAM_EPS)
            direction = torch.where(self.adam.view(view), adam_dir, torch.where(self.momentum.view(view), buf, g))
            self.state[k] = (buf, m1, v)
            out[k] = p - lr.view(view) * direction
        return out


@torch.no_grad()
def _evaluate(model, params, due, data, y_run, member) -> list[dict[str, float]]:
    """Loss and accuracy of the ``due`` runs on their own training subset and labels, on val and on test."""
    p = {k: v[due] for k, v in params.items()}
    forward = vmap(lambda q, x: functional_call(model, q, (x,)), in_dims=(0, None))
    results: list[dict[str, float]] = [{} for _ in due]
    splits = {
        "train": (data.x_train, y_run[due], member[due]),
        "val": (data.x_val, data.y_val.expand(len(due), *data.y_val.shape), None),
        "test": (data.x_test, data.y_test.expand(len(due), *data.y_test.shape), None),
    }
    for name, (x, y, keep) in splits.items():
        logits = forward(p, x)  # [m, n, (T,) C]
        loss = F.cross_entropy(logits.movedim(-1, 1), y, reduction="none")
        correct = (logits.argmax(-1) == y).float()
        if loss.dim() == 3:  # language modelling: per window, the mean over its tokens
            loss, correct = loss.mean(-1), correct.mean(-1)
        w = keep.float() if keep is not None else torch.ones_like(loss)
        mean_loss = (loss * w).sum(1) / w.sum(1)
        mean_acc = (correct * w).sum(1) / w.sum(1)
        for j in range(len(due)):
            results[j][f"{name}_loss"] = float(mean_loss[j])
            results[j][f"{name}_accuracy"] = float(mean_acc[j])
    return results


def _collect(task: ChunkTask, snaps) -> ChunkResult:
    rows, stacks = [], []
    for (m, epoch) in sorted(snaps, key=lambda key: (task.runs[key[0]].run_id, key[1])):
        weights, metrics = snaps[(m, epoch)]
        run = task.runs[m]
        finite = all(bool(torch.isfinite(w).all()) for w in weights.values())
        if not finite:  # a diverged run: its weights are kept as they are, its metrics are undefined
            metrics = {k: (v if k == "step" else float("nan")) for k, v in metrics.items()}
        rows.append({
            "model_id": f"r{run.run_id:06d}-e{epoch:03d}", "run_id": run.run_id, "arch": task.arch, "seed": run.seed,
            **run.hyperparameters(), "epoch": epoch, **metrics, "finite": int(finite),
        })
        stacks.append(weights)
    return ChunkResult(task.arch, rows, {k: torch.stack([s[k] for s in stacks]) for k in stacks[0]})
