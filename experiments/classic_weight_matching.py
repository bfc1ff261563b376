"""Classic weight matching (Git Re-Basin, Ainsworth et al. 2023), restated plainly for ``nn.Sequential`` MLPs.

A baseline for ``bench_vs_peers.py``, written from the published description of the algorithm:

- a *permutation table* maps every parameter name to one permutation label (or ``None``) per axis;
- starting from identity permutations, repeat until a sweep changes no permutation: visit the labels in random
  order; for each label, sum over every (parameter, axis) carrying it the correlation matrix between A's and B's
  slices along that axis (B's other axes already permuted by the current permutations); solve one linear
  assignment (scipy ``linear_sum_assignment``, maximise) and keep the result as the label's new permutation.

Permutations only: no scalings, no sign flips. Permuting B by the result leaves B's function unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

Params = Mapping[str, torch.Tensor]
PermTable = dict[str, tuple[str | None, ...]]


def sequential_mlp_table(params: Params) -> PermTable:
    """Permutation table of an ``nn.Sequential`` of Linear layers (state-dict keys ``<i>.weight`` / ``<i>.bias``).

    Hidden layer k's units carry the label ``P<k>``: its weight rows and bias, and the next weight's columns.
    The input and output axes are unlabelled (not permutable).
    """
    prefixes: list[str] = []
    for key in params:
        prefix, _, leaf = key.rpartition(".")
        if leaf not in ("weight", "bias"):
            raise ValueError(f"not a Linear parameter: {key!r}")
        if prefix not in prefixes:
            prefixes.append(prefix)
    table: PermTable = {}
    for k, prefix in enumerate(prefixes):
        out_label = f"P{k}" if k < len(prefixes) - 1 else None
        in_label = f"P{k - 1}" if k > 0 else None
        table[f"{prefix}.weight"] = (out_label, in_label)
        if f"{prefix}.bias" in params:
            table[f"{prefix}.bias"] = (out_label,)
    return table


def permute_param(
    table: PermTable, perms: Mapping[str, torch.Tensor], name: str, value: torch.Tensor, except_axis: int | None = None
) -> torch.Tensor:
    """``value`` with every labelled axis (except ``except_axis``) reindexed by its label's permutation."""
    for axis, label in enumerate(table[name]):
        if label is not None and axis != except_axis:
            value = value.index_select(axis, perms[label])
    return value


def apply_permutations(table: PermTable, perms: Mapping[str, torch.Tensor], params: Params) -> dict[str, torch.Tensor]:
    """All parameters of ``params`` permuted (unit i of the result is unit ``perm[i]`` of the input)."""
    return {name: permute_param(table, perms, name, value) if name in table else value.clone() for name, value in params.items()}


def weight_matching(
    table: PermTable, params_a: Params, params_b: Params, *, max_iter: int = 100, seed: int = 0
) -> tuple[dict[str, torch.Tensor], int]:
    """Permutations mapping B onto A by coordinate ascent, and the number of sweeps run (the last changes nothing)."""
    sizes: dict[str, int] = {}
    for name, labels in table.items():
        for axis, label in enumerate(labels):
            if label is not None:
                sizes[label] = int(params_a[name].shape[axis])
    carriers: dict[str, list[tuple[str, int]]] = {label: [] for label in sizes}
    for name, labels in table.items():
        for axis, label in enumerate(labels):
            if label is not None:
                carriers[label].append((name, axis))
    perms = {label: torch.arange(n) for label, n in sizes.items()}
    labels = sorted(sizes)
    rng = np.random.default_rng(seed)
    sweeps = 0
    for _ in range(max_iter):
        sweeps += 1
        changed = False
        for i in rng.permutation(len(labels)):
            label = labels[i]
            n = sizes[label]
            corr = torch.zeros(n, n, dtype=torch.float64)
            for name, axis in carriers[label]:
                w_a = params_a[name].movedim(axis, 0).reshape(n, -1)
                w_b = permute_param(table, perms, name, params_b[name], except_axis=axis).movedim(axis, 0).reshape(n, -1)
                corr += (w_a @ w_b.T).double()
            _, cols = linear_sum_assignment(corr.numpy(), maximize=True)
            new = torch.from_numpy(cols).long()
            if not torch.equal(new, perms[label]):
                changed = True
            perms[label] = new
        if not changed:
            break
    return perms, sweeps
