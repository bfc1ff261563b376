"""Conservation laws of a Hugging Face ``Trainer`` run: a ``TrainerCallback`` around :class:`LawTracker`.

``trainer.add_callback(LawTrackerCallback(out="laws_out"))`` builds the Spec from the model (``spec_from_hf``), hooks
the Trainer's optimizer at ``on_train_begin`` (the Trainer creates it inside ``train()``), adds a per-family summary
(worst residual and drift since the previous log) to the Trainer logs, and at ``on_train_end`` publishes
``report.json`` and ``laws.png`` into ``out`` all-or-nothing, as ``symm laws verify`` does.

The Trainer clips gradients by global norm (``max_grad_norm``) before ``optimizer.step()``, and steps its learning-rate
scheduler after it: the tracker's step hooks therefore see the clipped gradient and the learning rate the step used,
so plain SGD (``optim="sgd"``) is checked against the exact discrete identity whatever the schedule. The Trainer
exempts biases and norm weights from weight decay (two parameter groups): with ``weight_decay > 0`` the single-lambda
prediction is exact only for laws whose weights are all decayed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .errors import UsageError
from .law_tracker import LawTracker, control_report, tolerance_for
from .laws import law_families
from .laws_verify import _per_law, publish_report
from .spec import Spec

log = logging.getLogger(__name__)


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under accelerate's ``AcceleratedOptimizer`` (and similar wrappers)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def window_summary(tracker: LawTracker, start: int = 0) -> dict[str, float]:
    """Trainer log entries from the tracked steps ``records[start:]``: worst |residual| and |relative drift| per law
    family (``laws/<factor>/...``) and over all laws, and the worst Noether residual."""
    records = tracker.records[start:]
    if not records:
        return {}
    res = torch.stack([(r.drift - r.predicted) / r.scale for r in records]).abs()
    drift = torch.stack([r.drift / r.scale for r in records]).abs()
    out: dict[str, float] = {}
    begin = 0
    for fam in law_families(tracker.spec):
        sl = slice(begin, begin + fam.count)
        begin += fam.count
        out[f"laws/{fam.factor}/max_residual"] = float(res[:, sl].max())
        out[f"laws/{fam.factor}/max_drift"] = float(drift[:, sl].max())
    out["laws/max_residual"] = float(res.max()) if res.numel() else 0.0
    out["laws/max_drift"] = float(drift.max()) if drift.numel() else 0.0
    out["laws/noether"] = max(r.noether for r in records)
    return out


def write_report(out: str | Path, report: dict, tracker: LawTracker) -> None:
    """Publish ``report.json`` and ``laws.png`` into ``out`` all at once (staged, then renamed under a lock)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    publish_report(out, report, tracker, f"{report['model']}, {report['optimizer']} lr={report['lr']} (Trainer)")


class LawTrackerCallback(TrainerCallback):
    """Track every conservation law of the trained model through a ``Trainer`` run and report it.

    ``spec`` defaults to ``spec_from_hf(model)``; ``every`` tracks one optimizer step in N; ``controls`` also tracks
    quantities that are not laws; ``out`` (a folder) receives ``report.json`` and ``laws.png`` at the end of training;
    ``tol`` is the residual the verdicts accept (default 1e-9 for float64 weights, 1e-6 otherwise: a float32 step
    itself rounds at ~1e-7 relative). After training, ``report`` holds the report dict and ``tracker`` the tracker.
    """

    def __init__(self, spec: Spec | None = None, every: int = 1, controls: bool = False, out: str | Path | None = None,
                 tol: float | None = None) -> None:
        if every < 1:
            raise UsageError("every must be >= 1")
        self.spec, self.every, self.controls, self.tol = spec, int(every), controls, tol
        self.out = None if out is None else Path(out)
        self.tracker: LawTracker | None = None
        self.report: dict | None = None
        self._logged = 0
        self._dtype = "unknown"

    # ----- attaching ----------------------------------------------------------------------------
    def _attach(self, model: torch.nn.Module | None, optimizer: Any) -> None:
        if self.tracker is not None or model is None or optimizer is None:
            return
        if self.spec is None:
            from .adapters import spec_from_hf

            self.spec = spec_from_hf(model)
        self._dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if self._dtype != "float64":
            log.info("model weights are %s: laws are computed in float64, the step itself rounds at %s precision", self._dtype, self._dtype)
        self.tracker = LawTracker(model, self.spec, torch_optimizer(optimizer), every=self.every, controls=self.controls)
        self._logged = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Build the Spec and hook the optimizer (created by the Trainer inside ``train()``)."""
        if self.out is not None and self.out.exists() and not self.out.is_dir():
            raise UsageError(f"{self.out} is a file, not a folder")
        if self.tracker is not None:  # a second train() call: start afresh
            self.tracker.close()
            self.tracker = None
        self.report = None
        self._attach(kwargs.get("model"), kwargs.get("optimizer"))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Hook the optimizer here if it did not exist yet at ``on_train_begin`` (delayed creation)."""
        self._attach(kwargs.get("model"), kwargs.get("optimizer"))

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs) -> None:
        """Add the laws' summary since the previous log to ``logs`` and to the matching ``state.log_history`` entry."""
        if self.tracker is None or logs is None:
            return
        summary = window_summary(self.tracker, self._logged)
        self._logged = len(self.tracker.records)
        logs.update(summary)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(summary)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        """Close the hooks, build the report and publish it into ``out`` (if given)."""
        if self.tracker is None:
            log.warning("no optimizer was seen: no conservation-law report")
            return
        self.tracker.close()
        if not self.tracker.records:
            log.warning("no optimizer step was tracked (every=%d, %d steps): the report has no drift", self.every, state.global_step)
        self.report = self._build_report(args, state, kwargs.get("model"))
        if self.out is not None:
            write_report(self.out, self.report, self.tracker)
            log.info("wrote %s and %s", self.out / "report.json", self.out / "laws.png")

    # ----- report -------------------------------------------------------------------------------
    def _build_report(self, args: TrainingArguments, state: TrainerState, model: torch.nn.Module | None) -> dict:
        tracker = self.tracker
        tol = self.tol if self.tol is not None else tolerance_for(self._dtype)
        families = tracker.report(tol).families
        losses = [e["loss"] for e in state.log_history if "loss" in e]
        grad_norms = [float(e["grad_norm"]) for e in state.log_history if e.get("grad_norm") is not None]
        config = getattr(model, "config", None)
        report = {
            "model": getattr(config, "name_or_path", "") or getattr(config, "model_type", type(model).__name__),
            "spec": self.spec.name,
            "optimizer": type(tracker.optimizer).__name__,
            "trainer_optim": str(getattr(args.optim, "value", args.optim)),
            "lr": float(args.learning_rate),
            "lr_scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "weight_decay": float(args.weight_decay),
            "max_grad_norm": float(args.max_grad_norm),
            "max_grad_norm_before_clipping": max(grad_norms, default=None),
            "steps": int(state.global_step),
            "tracked_steps": len(tracker.records),
            "every": self.every,
            "dtype": self._dtype,
            "tol": tol,
            "n_laws": int(sum(f["laws"] for f in families)),
            "families": families,
            "laws": _per_law(tracker) if tracker.records else {},
            "final_loss": float(losses[-1]) if losses else None,
        }
        if self.controls:
            report["controls"] = control_report(tracker, tol)
        return report
