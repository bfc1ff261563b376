"""The state one weight-matching run threads through its per-kind solvers."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from symm.action import act_param
from symm.element import GroupElement
from symm.spec import Spec


@dataclass
class MatchState:
    """Canonical A, the current B and the running element ``g`` with ``b == g . b_start``.

    Solvers read ``a`` and ``b``, and change ``b`` only through :meth:`apply`, which keeps ``g`` in step.
    ``fixed`` factors are never changed by a solver (their value was decided by the caller).
    """

    spec: Spec
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
    g: GroupElement
    fixed: frozenset[str] = frozenset()
    backend: str = "auto"
    score_dtype: torch.dtype = torch.float64
    cache: dict = field(default_factory=dict)
    #: per parameter, how many times :meth:`apply` changed it (lets caches skip unchanged parameters)
    versions: dict[str, int] = field(default_factory=dict)
    #: where score matmuls run (parameters stay on the CPU; scores come back to it for the assignment)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def apply(self, delta: GroupElement, names: Iterable[str]) -> None:
        """``b <- delta . b`` on the parameters that the factors ``names`` touch; ``g <- delta . g``."""
        spec = self.spec
        names = list(names)
        touched = {p for n in names for p, *_ in spec.uses(n)} | {p for n in names for p, _ in spec.shifts_of(n)}
        for p in touched:
            self.b[p] = act_param(spec, spec.params[p], self.b[p], delta.values)
            self.versions[p] = self.versions.get(p, 0) + 1
        self.g = delta.compose(self.g)

    def free(self, name: str) -> bool:
        return name not in self.fixed

    def children(self, name: str, kind: str | None = None) -> list[str]:
        """Direct children of factor ``name`` (of one ``kind`` if given)."""
        return [n for n, f in self.spec.factors.items() if f.parent == name and (kind is None or f.kind == kind)]
