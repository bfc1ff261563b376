"""Weight matching over every factor of a Spec: find g with g . theta_B close to theta_A.

1. Starting point: ``s0`` holds the ``fixed`` values (kept exactly) and the ``init`` values (a warm start).
2. Scalings are fixed canonically (balanced forms, :mod:`aligners.canonical`), fixed scalings excepted.
3. Block-coordinate ascent: each sweep visits the permutation-like factors (the first sweep from the input side,
   :func:`aligners.solvers.anchored_order`; later ones in random order) and calls the solver
   of their kind (:mod:`aligners.solvers`, one per factor kind, dispatched on ``factor.kind``); solvers update
   the current B and the running element together. Then translations are re-centred.
4. Stop when a sweep changes no permutation, or when ``patience`` sweeps in a row do not raise the best objective
   sum <theta_A, g.theta_B> (steps matched on invariants, such as experts and heads, need not raise it and can
   cycle); the best element seen is returned.
Result: ``c_A^{-1} . g . c_B . s0``, applied with ``act(spec, params, g)`` like every element.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from symm.action import act_param
from symm.element import GroupElement
from symm.errors import SpecError
from symm.spec import Spec

from .canonical import balance_scalings
from .solvers import MatchState, plan, solver_for

log = logging.getLogger(__name__)

Values = Mapping[str, torch.Tensor] | GroupElement | None


@dataclass
class MatchInfo:
    """Diagnostics filled in by :func:`weight_matching`."""

    sweeps: int = 0
    objective: list[float] = field(default_factory=list)
    converged: bool = False


def _objective(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """sum over parameters of <a, b>, in the working dtype."""
    return float(sum(torch.dot(a[k].reshape(-1), b[k].reshape(-1)) for k in a if torch.is_floating_point(a[k])))


def _working_copy(params: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``params`` in the working dtype; tensors already in it are shared, not copied (never modified in place:
    solvers replace parameters)."""
    return {k: (v.detach().to(dtype) if torch.is_floating_point(v) else v) for k, v in params.items()}


def _act_where_moved(spec: Spec, params: Mapping[str, torch.Tensor], g: GroupElement) -> dict[str, torch.Tensor]:
    """``g . params``, sharing (not copying) every tensor on which ``g`` acts as the identity: the same values as
    :func:`act`, without a second copy of the untouched parameters."""
    moved = [n for n, v in g.values.items() if not spec.factors[n].is_identity(v, atol=0.0)]
    touched = {p for n in moved for p, *_ in spec.uses(n)} | {p for n in moved for p, _ in spec.shifts_of(n)}
    return {k: (act_param(spec, spec.params[k], v, g.values) if k in touched else v) for k, v in params.items()}


def _as_values(spec: Spec, given: Values, what: str) -> dict[str, torch.Tensor]:
    if given is None:
        return {}
    if isinstance(given, GroupElement):
        if given.spec != spec:
            raise SpecError(f"{what}: group element of a different spec")
        return dict(given.values)
    unknown = sorted(set(given) - set(spec.factors))
    if unknown:
        raise SpecError(f"{what} values for unknown factors: {unknown}")
    return dict(given)


def starting_element(spec: Spec, fixed: Values, init: Values) -> tuple[GroupElement, frozenset[str]]:
    """The element holding the ``fixed`` and ``init`` values (identity elsewhere), and the fixed names."""
    fixed_v, init_v = _as_values(spec, fixed, "fixed"), _as_values(spec, init, "init")
    if isinstance(init, GroupElement):  # a whole element: its values for fixed factors give way
        init_v = {k: v for k, v in init_v.items() if k not in fixed_v}
    both = sorted(set(fixed_v) & set(init_v))
    if both:
        raise SpecError(f"factors given both as fixed and as init: {both}")
    try:
        start = GroupElement.identity(spec).replace(**fixed_v, **init_v)
    except SpecError as exc:
        raise SpecError(f"fixed/init values are not group elements: {exc}") from None
    return start, frozenset(fixed_v)


def weight_matching(
    spec: Spec,
    params_a: Mapping[str, torch.Tensor],
    params_b: Mapping[str, torch.Tensor],
    *,
    max_sweeps: int = 100,
    seed: int = 0,
    backend: str = "auto",
    fixed: Values = None,
    init: Values = None,
    within_heads: bool = True,
    patience: int = 3,
    progress: bool = True,
    info: MatchInfo | None = None,
    device: torch.device | str | None = None,
) -> GroupElement:
    """The element g of ``spec``'s group with ``g . params_b`` matched to ``params_a``.

    ``fixed``: factor values decided elsewhere (activation matching, or the identity to switch a factor off);
    the result holds exactly these values. ``init``: a warm start (factor values or a whole element), e.g. the
    previous answer when re-aligning; every factor not fixed may still move. ``within_heads=False`` matches heads
    but skips the per-head GL / RoPE alignment. ``patience``: sweeps without a new best objective before stopping.
    ``device``: where the score matmuls run (``None``/``"cpu"``: the CPU; ``"cuda"``: a GPU); parameters, the
    assignments and the returned element stay on the CPU. Working copies share the input tensors where the dtype
    already agrees.
    """
    spec.check_params(params_a, what="checkpoint A")
    spec.check_params(params_b, what="checkpoint B")
    start, fixed_names = starting_element(spec, fixed, init)
    work = torch.float64 if any(v.dtype == torch.float64 for v in (*params_a.values(), *params_b.values())) else torch.float32
    a0 = _working_copy(params_a, work)
    b0 = _act_where_moved(spec, _working_copy(params_b, work), start)
    # a caller that passes its dicts without keeping them lets the tensors replaced below be freed
    del params_a, params_b
    tol = 1e-13 if work == torch.float64 else 1e-9  # log-step tolerance, far below the working precision
    canon_a = balance_scalings(spec, a0, tol=tol, exclude=fixed_names)
    canon_b = balance_scalings(spec, b0, tol=tol, exclude=fixed_names)
    a0, b0 = _act_where_moved(spec, a0, canon_a), _act_where_moved(spec, b0, canon_b)
    state = MatchState(spec, a0, b0, GroupElement.identity(spec), fixed_names, backend, work, device=torch.device(device or "cpu"))
    del a0, b0  # the state alone holds the working parameters (replaced, not copied, as B moves)
    steps = plan(spec, fixed_names)
    if not within_heads:
        from .solvers.heads import head_step

        heads = {n for n in steps.sweep if spec.factors[n].kind == "head-permutation"}
    info = info if info is not None else MatchInfo()
    gen = torch.Generator().manual_seed(seed)
    best: tuple[float, GroupElement] | None = None
    stale = 0
    rel_tol = 1e-12 if work == torch.float64 else 1e-6
    bar = tqdm(range(max_sweeps), desc="weight matching", unit="sweep", disable=not progress or not steps.sweep, leave=False)
    for sweep in bar:
        changed = 0
        order = steps.first if sweep == 0 else [steps.sweep[i] for i in torch.randperm(len(steps.sweep), generator=gen).tolist()]
        for name in order:
            if not within_heads and name in heads:
                changed += head_step(state, name, within=False)
            else:
                changed += solver_for(spec, name).step(state, name)
        for name in steps.after:
            solver_for(spec, name).step(state, name)
        objective = _objective(state.a, state.b)
        info.objective.append(objective)
        info.sweeps = sweep + 1
        bar.set_postfix(changed=changed, objective=f"{objective:.4g}")
        if best is None or objective > best[0] + rel_tol * abs(best[0]):
            best, stale = (objective, state.g), 0
        else:
            stale += 1
        if changed == 0 or stale >= patience:
            info.converged = True
            break
    log.info("weight matching: %d sweeps, converged=%s", info.sweeps, info.converged)
    g = best[1] if best is not None else state.g
    return canon_a.inverse().compose(g).compose(canon_b).compose(start)
