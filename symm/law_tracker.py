"""Track conservation laws during real PyTorch training, step by step, against their exact discrete prediction.

For plain SGD with weight decay lambda (coupled or decoupled), theta' = (1 - eta lambda) theta - eta g, and a law h
with <grad h, g> = 0 moves exactly as
    quadratic: h(theta') = (1 - eta lambda)^2 h(theta) + eta^2 h(g),      linear: h(theta') = (1 - eta lambda) h(theta).
The tracker evaluates every law in float64 before and after each tracked step (optimizer step hooks), subtracts the
prediction, and reports the residual relative to the squared norm of what each law touches. Momentum and Adam have
no such identity: their residual measures how much they break the law. The instantaneous Noether residual
<grad h, g> / (||grad h|| ||g||) on the step's minibatch gradient tells a broken *model* symmetry from a broken
*optimizer* identity.

Cost: the laws are evaluated by a :class:`symm.laws.LawPlan` (the layers stacked, one batched Gram of theta and g per
use). When consecutive steps are tracked (``every=1``) there is one Gram pass per step: h(theta') of step k is
h(theta) of step k+1, so the post-step hook only loads theta' (and keeps a copy of it) and the next pre-step hook
evaluates both. That holds only if nothing changed the weights in between: the pre-step hook compares them with the
copy, exactly (a ``p.data`` edit included, which autograd's version counters do not see), and otherwise evaluates
the pending step on its own first, so no edit between steps is attributed to a step. A step still pending when
``records`` is read (or at ``close()``) is evaluated then.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import math
from dataclasses import dataclass, field

import torch

from .law_controls import control_families, control_terms
from .laws import LawPlan, law_families, law_vector
from .spec import Spec

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step: int
    drift: torch.Tensor  # h(theta') - h(theta), per law
    predicted: torch.Tensor  # predicted drift, per law
    scale: torch.Tensor  # squared norm of what each law touches
    noether: float  # worst over laws of |<grad h, g>| / (||grad h|| ||g||) on the step's minibatch gradient
    noether_per_law: torch.Tensor | None = None  # the same, per law
    # plain SGD only: the drift the gradient's own component along the symmetry causes, -eta (1 - eta lambda) <grad h, g>
    # (linear laws: -eta <grad h, g>); zero for an exact gradient. None for optimizers without the identity.
    gradient_part: torch.Tensor | None = None


@dataclass
class LawReport:
    """Per law family: initial values, accumulated drift and prediction, worst relative residual, verdict."""

    families: list[dict] = field(default_factory=list)


def _attribute_getters(model: torch.nn.Module, names: list[str]) -> dict[str, tuple[dict, str]] | None:
    """``name -> (the module's _parameters or _buffers, key)`` for state-dict names, so each step reads the current
    tensors without building the state dict; None if a name does not resolve to the state dict's own tensor (then
    the state dict is used)."""
    state = model.state_dict(keep_vars=True)
    out = {}
    for name in names:
        path, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            return None
        table = next((t for t in (module._parameters, module._buffers) if t.get(attr) is not None), None)
        if name not in state or table is None or table[attr] is not state[name]:
            return None
        out[name] = (table, attr)
    return out


def _copy_into(snap: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``snap`` (reusing its buffers)."""
    with torch.no_grad():
        for k, x in tensors.items():
            buf = snap.get(k)
            if buf is None or buf.shape != x.shape or buf.dtype != x.dtype or buf.device != x.device:
                snap[k] = buf = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            buf.copy_(x)


def _libc_memcmp():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        memcmp = libc.memcmp
    except (OSError, AttributeError, TypeError):
        return None
    memcmp.restype = ctypes.c_int
    memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_MEMCMP = _libc_memcmp()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal: identical bytes (contiguous CPU tensors of one dtype, compared with memcmp) or torch.equal."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if _MEMCMP is not None and a.device.type == b.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
        if _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0:
            return True
    return bool(torch.equal(a, b))


def _unchanged(snap: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> bool:
    """Whether ``tensors`` still hold exactly the snapshot's values (any change, ``p.data`` edits included)."""
    return snap.keys() == tensors.keys() and all(_same(snap[k], x) for k, x in tensors.items())


def _linear_mask(spec: Spec) -> torch.Tensor:
    return torch.cat([torch.full((fam.count,), fam.linear) for fam in law_families(spec)]) if law_families(spec) else torch.zeros(0, dtype=torch.bool)


class LawTracker:
    """Attach to ``optimizer``; every ``every`` steps record each law's drift and its exact SGD prediction.

    ``model``'s ``named_parameters`` must be the Spec's parameter names (buffers are read from the state dict).
    Prediction uses each parameter group's ``lr`` and ``weight_decay`` (plain-SGD identity; for other optimizers
    the residual measures how far they are from it). ``one_pass=False`` evaluates theta' in the post-step hook
    itself (two Gram passes per tracked step; the same numbers).
    """

    def __init__(self, model: torch.nn.Module, spec: Spec, optimizer: torch.optim.Optimizer, every: int = 1, controls: bool = False,
                 one_pass: bool = True) -> None:
        self.model, self.spec, self.optimizer, self.every = model, spec, optimizer, max(1, int(every))
        self._records: list[StepRecord] = []
        self.controls = control_families(spec) if controls else []
        self.control_records: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.linear = _linear_mask(spec)
        self.one_pass = one_pass
        self._step = 0
        self._before: tuple | None = None
        self._pending: tuple | None = None  # a step whose h(theta') the next pre-hook evaluates (one pass per step)
        self._theta_after: dict[str, torch.Tensor] = {}  # theta' of the pending step: to check against, and to fall back to
        self._names = {id(p): n for n, p in model.named_parameters()}
        fams = law_families(spec)
        self._touched = {p for fam in fams for p, *_ in spec.uses(fam.factor)} | {p for fam in fams for p, _ in spec.shifts_of(fam.factor)}
        if controls:  # controls read weights no law touches
            self._touched = set(spec.params)
        self._plan = LawPlan(spec)
        self._getters = _attribute_getters(model, self._plan.names)
        self.initial = law_vector(spec, self._params())
        self._handles = [optimizer.register_step_pre_hook(self._pre), optimizer.register_step_post_hook(self._post)]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._finish_pending()

    @property
    def records(self) -> list[StepRecord]:
        """One record per tracked step (a step whose h(theta') is still pending is evaluated first)."""
        self._finish_pending()
        return self._records

    def _params(self) -> dict[str, torch.Tensor]:
        """The weights the laws touch, in float64."""
        state = self.model.state_dict(keep_vars=True)
        return {k: state[k].detach().to(torch.float64) for k in self._touched}

    def _live(self) -> dict[str, torch.Tensor]:
        """The tensors the laws read, by name, as they are (no copy, any dtype; they may require grad)."""
        if self._getters is None:
            state = self.model.state_dict(keep_vars=True)
            return {k: state[k].detach() for k in self._plan.names}
        return {k: table[attr] for k, (table, attr) in self._getters.items()}  # read under no_grad only

    def _lr_wd(self) -> tuple[float, float]:
        groups = self.optimizer.param_groups
        lrs, wds = {float(g["lr"]) for g in groups}, {float(g.get("weight_decay", 0.0)) for g in groups}
        if len(lrs) > 1 or len(wds) > 1:
            log.warning("several learning rates / weight decays: predictions use the first group's")
        return float(groups[0]["lr"]), float(groups[0].get("weight_decay", 0.0))

    # ----- hooks --------------------------------------------------------------------------------
    def _pre(self, optimizer, args, kwargs) -> None:
        self._step += 1
        tracked = self._step % self.every == 0
        live = self._live() if tracked or self._pending is not None else {}
        # one pass per step: theta before this step is theta' of the pending one, unless something changed the
        # weights in between (checked exactly against the copy; then the pending step is evaluated on its own first)
        reuse = tracked and self._pending is not None and _unchanged(self._theta_after, live)
        if not reuse:
            self._finish_pending()
        if not tracked:
            self._before = None
            return
        grads = {
            self._names[id(p)]: p.grad.detach()
            for g in optimizer.param_groups
            for p in g["params"]
            if p.grad is not None and self._names.get(id(p)) in self._touched
        }
        if not reuse:  # (reused: slot 0 already holds these weights, loaded by the post-step hook)
            self._plan.load(live, 0)
        self._plan.load(grads, 1)
        terms = self._plan.terms()
        if reuse:
            self._finish_pending(terms.value)
        # ||g|| over the touched weights: the Grams' diagonals give it for the weights the laws read evenly
        rest = (float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for k, g in grads.items() if k not in self._plan.grad_names)
        g_norm = math.sqrt(self._plan.grad_square + sum(rest))
        noether = terms.cross.abs() / (terms.grad_norm2.sqrt() * g_norm).clamp_min(1e-300)
        self._before = (terms.value, terms.of_grad, terms.scale, noether, terms.cross)
        if self.controls:
            params = self._params()
            grads64 = {k: v.to(torch.float64) for k, v in grads.items()}
            ct = control_terms(self.spec, params, grads64)
            self._controls_before = (ct.value, ct.of_grad, ct.scale, ct.cross.abs() / (ct.grad_norm2.sqrt() * g_norm).clamp_min(1e-300))

    def _post(self, optimizer, args, kwargs) -> None:
        if self._before is None:
            return
        h0, h_g, scale, noether, cross = self._before
        self._before = None
        lr, wd = self._lr_wd()
        decay = 1.0 - lr * wd
        predicted = torch.where(self.linear, (decay - 1.0) * h0, (decay**2 - 1.0) * h0 + lr**2 * h_g)
        gradient_part = torch.where(self.linear, -lr * cross, -lr * decay * cross) if plain_sgd(optimizer) else None
        live = self._live()
        self._plan.load(live, 0)  # theta' (loaded here, where the step has just written it to cache)
        self._pending = (self._step, h0, predicted, scale, noether, gradient_part)
        if self.one_pass and (self._step + 1) % self.every == 0:
            _copy_into(self._theta_after, live)  # the next pre-hook evaluates theta' once for both steps
        else:
            self._finish_pending()
        if self.controls:
            c0, c_g, c_scale, c_noether = self._controls_before
            c1 = control_terms(self.spec, self._params(), {}).value
            linear = torch.cat([torch.full((c.count,), c.linear) for c in self.controls])
            c_pred = torch.where(linear, (decay - 1.0) * c0, (decay**2 - 1.0) * c0 + lr**2 * c_g)
            self.control_records.append((self._step, c1 - c0, c_pred, c_scale, c_noether))

    def _finish_pending(self, h1: torch.Tensor | None = None) -> None:
        """Record the pending step with h(theta') = ``h1`` (default: evaluated from the plan's slot 0, which holds
        theta' from the post-step hook until the next pre-step hook loads other weights)."""
        if self._pending is None:
            return
        step, h0, predicted, scale, noether, gradient_part = self._pending
        self._pending = None
        if h1 is None:
            h1 = self._plan.values()
        worst = float(noether.max()) if len(noether) else 0.0
        self._records.append(StepRecord(step, h1 - h0, predicted, scale, worst, noether, gradient_part))

    # ----- results -----------------------------------------------------------------------------
    def residuals(self) -> torch.Tensor:
        """``(records, laws)``: (drift - predicted) / scale per tracked step."""
        if not self.records:
            return torch.zeros(0, len(self.initial), dtype=torch.float64)
        return torch.stack([(r.drift - r.predicted) / r.scale for r in self.records])

    def gradient_corrected_residuals(self) -> torch.Tensor | None:
        """``(records, laws)``: the residual less the drift the gradient's component along the symmetry causes
        (plain SGD: exact algebra, so what remains is float64 rounding); None without that identity."""
        if not self.records or any(r.gradient_part is None for r in self.records):
            return None
        return torch.stack([(r.drift - r.predicted - r.gradient_part) / r.scale for r in self.records])

    def relative_drifts(self) -> torch.Tensor:
        if not self.records:
            return torch.zeros(0, len(self.initial), dtype=torch.float64)
        return torch.stack([r.drift / r.scale for r in self.records])

    def report(self, tol: float = 1e-9) -> LawReport:
        """Per family: worst |residual|, worst |relative drift|, worst Noether residual and a verdict from them."""
        res, drift = self.residuals().abs(), self.relative_drifts().abs()
        corrected = self.gradient_corrected_residuals()
        per_law = torch.stack([r.noether_per_law for r in self.records]) if self.records else None
        lr, wd = self._lr_wd()
        out, start = LawReport(), 0
        for fam in law_families(self.spec):
            sl = slice(start, start + fam.count)
            start += fam.count
            worst_res = float(res[:, sl].max()) if len(res) else 0.0
            worst_drift = float(drift[:, sl].max()) if len(drift) else 0.0
            noether = float(per_law[:, sl].max()) if per_law is not None and fam.count else 0.0
            rest = float(corrected[:, sl].abs().max()) if corrected is not None and len(corrected) else None
            eps = getattr(self.spec.factors[fam.factor], "eps", 0.0)
            out.families.append(
                {
                    "factor": fam.factor,
                    "kind": fam.kind,
                    "laws": fam.count,
                    "initial_max_abs": float(self.initial[sl].abs().max()),
                    "max_relative_drift": worst_drift,
                    "max_residual": worst_res,
                    "noether": noether,
                    **({"residual_less_gradient_part": rest} if rest is not None else {}),
                    "verdict": verdict(worst_res, worst_drift, noether, wd, tol, approximate_eps=eps, gradient_corrected=rest),
                }
            )
        return out


def control_report(tracker: LawTracker, tol: float = 1e-9) -> list[dict]:
    """Per control family (quantities that are not laws): the same numbers and verdicts as for laws."""
    if not tracker.control_records:
        return []
    res = torch.stack([(d - p) / s for _, d, p, s, _ in tracker.control_records]).abs()
    drift = torch.stack([d / s for _, d, _, s, _ in tracker.control_records]).abs()
    noe = torch.stack([n for *_, n in tracker.control_records])
    _, wd = tracker._lr_wd()
    out, start = [], 0
    for fam in tracker.controls:
        sl = slice(start, start + fam.count)
        start += fam.count
        r, d, n = float(res[:, sl].max()), float(drift[:, sl].max()), float(noe[:, sl].max())
        out.append({"control": fam.name, "count": fam.count, "max_relative_drift": d, "max_residual": r, "noether": n, "verdict": verdict(r, d, n, wd, tol)})
    return out


def tolerance_for(dtype: str | torch.dtype) -> float:
    """Residual tolerance of a verdict for weights stored in ``dtype``: 1e-9 in float64; in float32 each step's
    rounding of theta' alone moves a law by ~1e-8 of its scale (worst case ~1e-7), so 1e-6."""
    return 1e-9 if str(dtype).replace("torch.", "") == "float64" else 1e-6


def plain_sgd(optimizer) -> bool:
    """``torch.optim.SGD`` without momentum: the update is -eta (g + lambda theta), whose effect on a law is exact algebra."""
    return isinstance(optimizer, torch.optim.SGD) and all(
        float(g.get("momentum", 0.0)) == 0.0 and not g.get("maximize", False) for g in optimizer.param_groups
    )


def verdict(
    residual: float, drift: float, noether: float, weight_decay: float, tol: float = 1e-9, approximate_eps: float = 0.0,
    gradient_corrected: float | None = None,
) -> str:
    """A verdict computed from the measured numbers (never assumed from the optimizer's name).

    ``approximate_eps > 0``: the symmetry itself holds only up to a normalisation's eps (QK-norm, BatchNorm), so a
    residual above ``tol`` is reported as that, not blamed on the optimizer. ``gradient_corrected`` (plain SGD): the
    residual less the drift caused by the gradient's own component along the symmetry; when only that component
    explains the residual, the gradient is inexact (Noether residual above float64 rounding: the model computes part
    of its forward in reduced precision, e.g. a float32 router softmax), and the optimizer is not to blame."""
    if approximate_eps > 0 and residual > tol:
        return f"approximate (normalisation eps={approximate_eps:g})"
    if noether > 1e3 * max(tol, 1e-12) and residual > tol:
        return "broken by the model"
    if residual > tol and gradient_corrected is not None and gradient_corrected <= tol:
        return f"broken by an inexact gradient (Noether residual {noether:.1e}: reduced-precision forward), not by the optimizer"
    if residual > tol:
        return "broken by the optimizer"
    if drift <= tol:
        return "conserved"
    if weight_decay > 0:
        return "broken by weight decay (exactly as predicted)"
    return "drift explained by discrete steps"
