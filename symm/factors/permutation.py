"""Permutation factors: plain unit permutations and head permutations grouped by KV head.

Elements are gather indices: acting as ``out`` maps ``v -> v[perm]`` (new unit i is old unit perm[i]);
a permutation matrix is orthogonal, so the ``in`` side acts the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Factor, Side


def _check_perm_rows(element: torch.Tensor, name: str) -> None:
    n = element.shape[-1]
    rows = element.reshape(-1, n)
    expected = torch.arange(n, device=element.device)
    if element.dtype != torch.long or not bool((rows.sort(dim=-1).values == expected).all()):
        raise ValueError(f"factor {name!r}: element is not a permutation of range({n})")


def compose_indices(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gather index of ``P_a P_b`` (``b`` acts first): ``x[b][a] = x[b[a]]``."""
    return b.gather(-1, a)


def expand_index(index: torch.Tensor, k: int) -> torch.Tensor:
    """Index over ``n`` units -> index over ``n * k`` entries, each unit spanning ``k`` consecutive entries."""
    if k == 1:
        return index
    offsets = torch.arange(k, device=index.device)
    return (index.unsqueeze(-1) * k + offsets).reshape(*index.shape[:-1], index.shape[-1] * k)


def gather_last(x: torch.Tensor, index: torch.Tensor, n_batch: int) -> torch.Tensor:
    """``x[..., index]`` along the last axis; ``index`` may carry ``n_batch`` leading batch axes of ``x``."""
    if n_batch == 0:
        return x.index_select(-1, index)
    middle = x.dim() - n_batch - 1
    idx = index.reshape(*index.shape[:n_batch], *([1] * middle), index.shape[-1]).expand_as(x)
    return x.gather(-1, idx)


@dataclass(frozen=True)
class Permutation(Factor):
    """S_n acting on ``count`` units (one independent permutation per batch entry if batched)."""

    kind = "permutation"
    is_permutation = True

    def identity(self) -> torch.Tensor:
        return torch.arange(self.count).expand(*self.batch, self.count).clone()

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        rows = [torch.randperm(self.count, generator=generator) for _ in range(max(1, self.n_units // self.count))]
        return torch.stack(rows).reshape(self.element_shape)

    def testing_elements(self) -> list[torch.Tensor]:
        """Identity, a swap, a roll within each block and of whole blocks, the reversal: those this kind allows."""
        groups = getattr(self, "groups", 1)
        blocks = torch.arange(self.count).reshape(groups, self.count // groups)
        swap = torch.arange(self.count)
        if self.count >= 2:
            swap[[0, 1]] = swap[[1, 0]]
        candidates = [swap, blocks.roll(1, dims=1).reshape(-1), blocks.roll(1, dims=0).reshape(-1), torch.arange(self.count).flip(0)]
        out = [self.identity()]
        for c in candidates:
            element = c.expand(*self.batch, self.count).clone()
            try:
                self.check_element(element)
            except ValueError:
                continue
            if not any(torch.equal(element, e) for e in out):
                out.append(element)
        return out

    def compose(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return compose_indices(a, b)

    def inverse(self, a: torch.Tensor) -> torch.Tensor:
        return torch.argsort(a, dim=-1)

    def is_identity(self, a: torch.Tensor, atol: float = 0.0) -> bool:
        return bool((a == self.identity()).all())

    def check_element(self, element: torch.Tensor) -> None:
        super().check_element(element)
        _check_perm_rows(element, self.name)

    def flat_index(self, element: torch.Tensor) -> torch.Tensor:
        """Gather index over all ``n_units`` (batch entries laid out one after another)."""
        rows = element.reshape(-1, self.count)
        offsets = torch.arange(rows.shape[0]).unsqueeze(-1) * self.count
        return (rows + offsets).reshape(-1)

    def gather_index(self, element: torch.Tensor, n_units: int) -> torch.Tensor:
        """Gather index over ``n_units`` units, a multiple of this factor's units."""
        if n_units % self.n_units:
            raise ValueError(f"factor {self.name!r} ({self.n_units} units) cannot index {n_units} units")
        return expand_index(self.flat_index(element), n_units // self.n_units)

    def entry_index(self, element: torch.Tensor, entries: int, repeat: int, block: int) -> torch.Tensor:
        """Gather index over the ``entries`` entries of an axis segment (unbatched factors)."""
        return expand_index(element, repeat * block * self.unit_size)

    def apply(self, x: torch.Tensor, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        index = expand_index(element, repeat * block * self.unit_size)
        return gather_last(x, index, len(self.batch))


def sample_grouped(groups: int, per_group: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation of ``groups * per_group`` units mapping each block of ``per_group`` to a block."""
    group_perm = torch.randperm(groups, generator=generator)
    within = torch.stack([torch.randperm(per_group, generator=generator) for _ in range(groups)])
    return (group_perm.unsqueeze(-1) * per_group + within).reshape(-1)


def check_grouped(element: torch.Tensor, groups: int, per_group: int, name: str, what: str) -> None:
    """Raise ``ValueError`` unless ``element`` maps consecutive blocks of ``per_group`` units to blocks."""
    blocks = (element // per_group).reshape(groups, per_group)
    if not bool((blocks == blocks[:, :1]).all()):
        raise ValueError(f"factor {name!r}: element moves a {what} out of its group")


@dataclass(frozen=True)
class GroupedPermutation(Permutation):
    """Permutations of ``count`` channels in ``groups`` equal consecutive groups that map groups to groups.

    GroupNorm normalises each group by its own statistics: permuting channels within a group, or whole groups,
    keeps the function; moving one channel to another group does not. Acts on an axis like a plain permutation.
    """

    groups: int = 1

    kind = "grouped-permutation"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch:
            raise ValueError(f"factor {self.name!r}: grouped permutations cannot be batched")
        if self.groups < 1 or self.count % self.groups:
            raise ValueError(f"factor {self.name!r}: {self.count} channels do not split into {self.groups} groups")

    @property
    def per_group(self) -> int:
        return self.count // self.groups

    def _describe_extra(self) -> str:
        return f" channels in {self.groups} groups"

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return sample_grouped(self.groups, self.per_group, generator)

    def check_element(self, element: torch.Tensor) -> None:
        super().check_element(element)
        check_grouped(element, self.groups, self.per_group, self.name, "channel")


@dataclass(frozen=True)
class HeadPermutation(Permutation):
    """Permutations of ``count`` attention heads of size ``head_dim`` that map KV groups to KV groups.

    With ``groups`` KV heads, query head ``h`` belongs to group ``h // (count // groups)``; an element
    permutes the groups and the query heads within each group. On a KV-sized axis it acts by the induced
    permutation of groups. ``groups == count`` is ordinary multi-head attention.
    """

    groups: int = 1
    head_dim: int = 1

    kind = "head-permutation"
    is_permutation = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch:
            raise ValueError(f"factor {self.name!r}: head permutations cannot be batched")
        if self.groups < 1 or self.count % self.groups:
            raise ValueError(f"factor {self.name!r}: {self.count} heads do not split into {self.groups} KV groups")
        if self.head_dim < 1:
            raise ValueError(f"factor {self.name!r}: head_dim must be >= 1")

    @property
    def heads_per_group(self) -> int:
        return self.count // self.groups

    @property
    def unit_size(self) -> int:
        return self.head_dim

    def _describe_extra(self) -> str:
        size = f"head_dim {self.head_dim}" if self.head_dim > 1 else "head sizes per tensor block"
        return f" heads in {self.groups} KV groups, {size}"

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return sample_grouped(self.groups, self.heads_per_group, generator)

    def check_element(self, element: torch.Tensor) -> None:
        super().check_element(element)
        check_grouped(element, self.groups, self.heads_per_group, self.name, "query head")

    def group_permutation(self, element: torch.Tensor) -> torch.Tensor:
        """Induced permutation of the KV groups."""
        return element.reshape(self.groups, self.heads_per_group)[:, 0] // self.heads_per_group

    def gather_index(self, element: torch.Tensor, n_units: int) -> torch.Tensor:
        """Gather index over heads, over KV groups, or over a multiple of the heads."""
        if n_units == self.groups:
            return self.group_permutation(element)
        if n_units % self.count == 0:
            return expand_index(element, n_units // self.count)
        raise ValueError(f"factor {self.name!r}: cannot index {n_units} units ({self.count} heads, {self.groups} groups)")

    def level_units(self, entries: int) -> int:
        """Units (heads or groups) that an axis segment of ``entries`` entries holds."""
        for units in (self.count, self.groups):
            if entries == units * self.head_dim:
                return units
        raise ValueError(
            f"factor {self.name!r}: a segment of {entries} entries is neither {self.count} heads nor "
            f"{self.groups} KV groups of head_dim {self.head_dim}"
        )

    def entry_index(self, element: torch.Tensor, entries: int, repeat: int, block: int) -> torch.Tensor:
        units = self.level_units(entries // (repeat * block))
        return expand_index(self.gather_index(element, units), repeat * block * self.head_dim)

    def apply(self, x: torch.Tensor, element: torch.Tensor, side: Side, repeat: int, block: int) -> torch.Tensor:
        return gather_last(x, self.entry_index(element, x.shape[-1], repeat, block), 0)
