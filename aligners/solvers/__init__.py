"""One solver per factor kind, in a table: weight matching reads the Spec and dispatches on ``factor.kind``.

Roles: ``sweep`` solvers run once per sweep in random order (permutations of every kind); ``after`` solvers
run at the end of each sweep (translations; one-sided norm scales, set to A's unit norms); ``canonical`` kinds
are fixed before matching by a canonical form (positive scalings, balanced); ``parent`` kinds are solved by their
parent's solver, which lists them in ``children`` (sign flips with their permutation, GL / RoPE factors with their
heads). A new factor kind adds a row here; :func:`aligners.weight_matching` does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from symm.errors import SpecError
from symm.spec import Spec

from .heads import head_step
from .norm_scale import norm_scale_step
from .permutation import grouped_permutation_step, permutation_step
from .state import MatchState
from .translation import translation_step

Role = Literal["sweep", "after", "canonical", "parent"]


@dataclass(frozen=True)
class KindSolver:
    role: Role
    step: Callable[[MatchState, str], bool] | None = None
    children: frozenset[str] = frozenset()


SOLVERS: Mapping[str, KindSolver] = {
    "permutation": KindSolver("sweep", permutation_step, frozenset({"sign-flip"})),
    "grouped-permutation": KindSolver("sweep", grouped_permutation_step, frozenset({"sign-flip"})),
    "head-permutation": KindSolver("sweep", head_step, frozenset({"general-linear", "rotation-scaling"})),
    "translation": KindSolver("after", translation_step),
    "norm-scale": KindSolver("after", norm_scale_step),
    "positive-scaling": KindSolver("canonical"),
    "sign-flip": KindSolver("parent"),
    "general-linear": KindSolver("parent"),
    "rotation-scaling": KindSolver("parent"),
}


def solver_for(spec: Spec, name: str) -> KindSolver:
    kind = spec.factors[name].kind
    try:
        return SOLVERS[kind]
    except KeyError:
        raise SpecError(f"factor {name!r}: no weight-matching solver for factor kind {kind!r} (known: {', '.join(sorted(SOLVERS))})") from None


@dataclass(frozen=True)
class Plan:
    """Which factors a run visits: ``sweep`` each sweep (the first in ``first`` order, later ones in random order),
    then ``after``."""

    sweep: tuple[str, ...]
    after: tuple[str, ...]
    first: tuple[str, ...] = ()


def anchored_order(spec: Spec, names: tuple[str, ...]) -> tuple[str, ...]:
    """Greedy order in which each factor has as many already-placed neighbours as possible.

    A use of a factor is *anchored* when no other axis of its parameter carries a factor still to be visited
    (its features are in the same order in A and B). Visiting the most anchored factor first (the input layer of
    an MLP, then the next) gives the first sweep scores with signal instead of noise: easier assignments and
    fewer sweeps.
    """
    left, order = list(names), []
    while left:
        pending = set(left)

        def anchored(n: str) -> float:
            uses = spec.uses(n)
            free = sum(
                all(on.factor not in pending or on.factor == n for a, _, seg in spec.params[p].segments() if a != axis for on in seg.acts)
                for p, axis, _, _ in uses
            )
            return free / max(len(uses), 1)

        best = max(left, key=lambda n: (anchored(n), -left.index(n)))
        order.append(best)
        left.remove(best)
    return tuple(order)


def plan(spec: Spec, fixed: frozenset[str]) -> Plan:
    """Check every free factor has a solver (a parent-solved kind needs a parent whose solver handles it)."""
    needs_visit: set[str] = set()
    for name in spec.factor_order:
        solver = solver_for(spec, name)
        if solver.role != "parent" or name in fixed:
            continue
        parent = spec.factors[name].parent
        if parent is None or spec.factors[name].kind not in solver_for(spec, parent).children:
            where = f"its parent {parent!r} ({spec.factors[parent].kind})" if parent else "no parent"
            raise SpecError(f"factor {name!r} ({spec.factors[name].kind}) is solved by its parent's solver, but has {where} that does not solve it")
        needs_visit.add(parent)
    sweep = tuple(n for n in spec.factor_order if solver_for(spec, n).role == "sweep" and (n not in fixed or n in needs_visit))
    after = tuple(n for n in spec.factor_order if solver_for(spec, n).role == "after" and n not in fixed)
    return Plan(sweep, after, anchored_order(spec, sweep))


__all__ = ["SOLVERS", "KindSolver", "MatchState", "Plan", "anchored_order", "plan", "solver_for"]
