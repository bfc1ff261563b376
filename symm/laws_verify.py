"""``symm laws verify``: train a small reference model on embedded data and report how each conservation law moved.

Dense models train on scikit-learn's digits, language models on byte windows of the bundled Shakespeare plays; all
in float64 so the exact discrete-step identity is checked at round-off. Outputs ``report.json`` and ``laws.png``
appear all-or-nothing in ``--out`` (staged, then published under a lock).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .data import byte_tokens, digits
from .errors import UsageError
from .law_tracker import LawTracker, control_report, tolerance_for
from .laws import law_families
from .models import TransformerConfig, build_model, spec_for
from .models.named import named_config
from .publish import publish, staged_output

log = logging.getLogger(__name__)

OPTIMIZERS = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "adamw": 1e-3}  # name -> default learning rate


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def load_model(model_name: str) -> tuple[nn.Module, "Spec", int | None, str]:  # noqa: F821
    """``(model, spec, vocab or None, dtype name)``: a named reference model, or ``hf:FOLDER`` (a save_pretrained
    causal LM). float64 unless the model's own code refuses it (then float32, and the report says so)."""
    if model_name.startswith("hf:"):
        from .adapters import is_hf_folder, load_hf, spec_from_hf

        folder = Path(model_name[3:])
        if not is_hf_folder(folder):
            raise UsageError(f"{folder}: not a Hugging Face model folder (no config.json)")
        model = load_hf(folder)
        spec = spec_from_hf(model)
        vocab = min(int(model.config.vocab_size), 256)
        try:
            model = model.double()
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.long))
            return model.train(), spec, vocab, "float64"
        except (RuntimeError, TypeError) as exc:
            log.warning("%s does not run in float64 (%s): tracking in float32", folder, str(exc)[:80])
            return model.float().train(), spec, vocab, "float32"
    config = named_config(model_name)
    model = build_model(config).double().train()
    # the model trains with batch statistics: track the laws of its training-mode group (BatchNorm filter scales)
    return model, spec_for(model, mode="train"), (config.vocab_size if isinstance(config, TransformerConfig) else None), "float64"


def _logits(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def _batches(vocab: int | None, steps: int, seed: int):
    """``steps`` minibatches ``(inputs, loss_fn)`` of the model's embedded data (bytes for LMs, digits otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    if vocab is not None:
        windows = byte_tokens(vocab_size=vocab, seq_len=32, n_train=512, n_test=8).train
        for _ in range(steps):
            w = windows[torch.randint(0, len(windows), (16,), generator=gen)]
            yield w[:, :-1], lambda logits, w=w: nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        return
    split = digits()
    x, y = split.x_train.double(), split.y_train
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        yield x[idx], lambda logits, idx=idx: nn.functional.cross_entropy(logits, y[idx])


def run_verify(model_name: str = "mlp-relu", optimizer: str = "sgd", lr: float | None = None, weight_decay: float = 0.0,
               steps: int = 100, every: int = 1, seed: int = 0, progress: bool = True, controls: bool = False) -> tuple[dict, LawTracker]:
    """Train and track; returns the report dict and the tracker (for plotting)."""
    if steps < 1 or every < 1:
        raise UsageError("--steps and --every must be >= 1")
    lr = OPTIMIZERS.get(optimizer, 0.0) if lr is None else lr
    torch.manual_seed(seed)
    model, spec, vocab, dtype = load_model(model_name)
    opt = make_optimizer(optimizer, model.parameters(), lr, weight_decay)
    tracker = LawTracker(model, spec, opt, every=every, controls=controls)
    bar = tqdm(_batches(vocab, steps, seed), total=steps, desc=f"laws: {model_name} / {optimizer}", unit="step", disable=not progress, leave=False)
    for inputs, loss_fn in bar:
        loss = loss_fn(_logits(model, inputs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tracker.close()
    tol = tolerance_for(dtype)
    families = tracker.report(tol).families
    laws = _per_law(tracker)
    report = {
        "model": model_name,
        "spec": spec.name,
        "optimizer": optimizer,
        "lr": lr,
        "weight_decay": weight_decay,
        "steps": steps,
        "every": every,
        "dtype": dtype,
        "tolerance": tol,
        "n_laws": int(sum(f["laws"] for f in families)),
        "families": families,
        "laws": laws,
        "final_loss": float(loss.item()),
    }
    if controls:
        report["controls"] = control_report(tracker, tol)
    return report, tracker


def _per_law(tracker: LawTracker) -> dict[str, dict[str, list[float]]]:
    """Per family and law: initial value, total drift, total predicted drift, worst residual, worst Noether residual."""
    drift = torch.stack([r.drift for r in tracker.records]).sum(0)
    predicted = torch.stack([r.predicted for r in tracker.records]).sum(0)
    residual = tracker.residuals().abs().max(0).values
    noether = max(r.noether for r in tracker.records)
    out, start = {}, 0
    for fam in law_families(tracker.spec):
        sl = slice(start, start + fam.count)
        start += fam.count
        out[fam.factor] = {
            "initial": tracker.initial[sl].tolist(),
            "drift": drift[sl].tolist(),
            "predicted": predicted[sl].tolist(),
            "residual": residual[sl].tolist(),
            "noether": noether,
        }
    return out


def plot_laws(tracker: LawTracker, path: Path, title: str) -> None:
    """Two panels per run: worst |relative drift| and worst |residual| per law family over the tracked steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r.step for r in tracker.records]
    res, drift = tracker.residuals().abs(), tracker.relative_drifts().abs()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    start = 0
    for fam in law_families(tracker.spec):
        sl = slice(start, start + fam.count)
        start += fam.count
        label = f"{fam.factor} ({fam.kind}, {fam.count})"
        axes[0].semilogy(steps, drift[:, sl].max(1).values.clamp_min(1e-20), label=label)
        axes[1].semilogy(steps, res[:, sl].max(1).values.clamp_min(1e-20), label=label)
    axes[0].set_title("worst |drift| per step / ||touched||^2")
    axes[1].set_title("worst |drift - exact SGD prediction| / ||touched||^2")
    for ax in axes:
        ax.set_xlabel("step")
    if law_families(tracker.spec):
        axes[1].legend(fontsize=6, loc="best")
    else:
        axes[0].text(0.5, 0.5, "no conservation laws", ha="center", transform=axes[0].transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verify(out: str | Path, **kwargs) -> dict:
    """Run :func:`run_verify` and publish ``report.json`` and ``laws.png`` into ``out`` all at once."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    report, tracker = run_verify(**kwargs)
    publish_report(out, report, tracker, f"{report['model']}, {report['optimizer']} lr={report['lr']} wd={report['weight_decay']}")
    return report


def publish_report(out: Path, report: dict, tracker: LawTracker, title: str) -> None:
    """Write ``report.json`` and ``laws.png`` into ``out`` all at once (staged, then renamed under a lock)."""
    with staged_output(out, lambda: None) as stage:
        (stage / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        plot_laws(tracker, stage / "laws.png", title)
        publish(stage, out, ["laws.png", "report.json"])
