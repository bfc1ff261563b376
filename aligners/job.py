"""The align job: two checkpoints in, aligned B + barrier report + plot out (``symm align A B``).

Everything is validated before any work or any write: formats, architectures (same Spec, same keys and
shapes), finite weights, output paths (never an input, never an existing file unless ``overwrite``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from symm.adapters import infer_spec, is_hf_folder, load_hf, spec_from_hf
from symm.adapters.infer import DenseChain
from symm.data import Split, TokenSplit, byte_tokens, digits, mnist1d
from symm.errors import CheckpointError, SpecError
from symm.evaluate import functional
from symm.io import assert_finite, atomic_write_text, checkpoint_format, compare_state_dicts, load_state_dict, save_state_dict
from symm.spec import Spec
from symm.train import evaluate_classifier

from .activation_matching import activation_matching
from .barrier import has_batchnorm, naive_vs_aligned, reset_batchnorm
from .plot import plot_barrier
from .repair import repair
from .weight_matching import MatchInfo, weight_matching

log = logging.getLogger(__name__)

METHODS = ("weights", "activations")
DATASETS = ("digits", "mnist1d", "text")


@dataclass
class Checkpoint:
    path: Path
    fmt: str  # "safetensors" | "torch" | "hf"
    params: dict[str, torch.Tensor]
    model: nn.Module | None = None


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    if is_hf_folder(path):
        try:
            model = load_hf(path)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: cannot load the Hugging Face model ({type(exc).__name__}: {str(exc)[:200]})") from None
        params = {k: v.detach().clone() for k, v in model.state_dict().items()}
        assert_finite(params, what=str(path))
        return Checkpoint(path, "hf", params, model)
    if path.is_dir():
        raise CheckpointError(f"{path}: a folder without config.json is not a checkpoint")
    return Checkpoint(path, checkpoint_format(path), load_state_dict(path))


@dataclass
class Task:
    """What the barrier is measured on: a model skeleton, its inputs, and an evaluation ``params -> (loss, acc)``."""

    model: nn.Module
    data_name: str
    inputs: torch.Tensor  # training inputs (activations, BatchNorm reset)
    evaluate_fn: object = field(repr=False)

    def evaluate(self, params) -> tuple[float, float]:
        return self.evaluate_fn(params)


def _classifier_task(model: nn.Module, split: Split) -> Task:
    def evaluate(params):
        if has_batchnorm(model):
            params = reset_batchnorm(model, params, split.x_train)
        return evaluate_classifier(model, params, split.x_test, split.y_test)

    return Task(model, split.name, split.x_train, evaluate)


def lm_task(model: nn.Module, tokens: TokenSplit, hf: bool) -> Task:
    """Next-token cross-entropy and accuracy on held-out windows."""
    f = functional(model)
    x, y = tokens.test[:, :-1], tokens.test[:, 1:]

    @torch.no_grad()
    def logits_at(params):
        if hf:
            model.load_state_dict(params)
            return model(x).logits
        return f(params, x)

    def evaluate(params):
        logits = logits_at(params)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
        return loss, (logits.argmax(-1) == y).float().mean().item()

    return Task(model, tokens.name, tokens.train[:, :-1], evaluate)


def _split(name: str) -> Split:
    return {"digits": digits, "mnist1d": mnist1d}[name]()


def resolve(a: Checkpoint, b: Checkpoint, activation: str | None, data: str | None) -> tuple[Spec, Task, str]:
    """Spec and task for the pair, or a clear error if they are not the same architecture."""
    if a.fmt == "hf" or b.fmt == "hf":
        if a.fmt != b.fmt:
            raise CheckpointError(f"cannot align a Hugging Face folder with a bare state dict ({a.path} is {a.fmt}, {b.path} is {b.fmt})")
        spec = spec_from_hf(a.model)
        if spec_from_hf(b.model) != spec:
            raise SpecError(f"{a.path} and {b.path} have different architectures (their symmetry specs differ)")
        compare_state_dicts(a.params, b.params, (str(a.path), str(b.path)))
        if data not in (None, "text"):
            raise CheckpointError(f"language models are evaluated on --data text, not {data!r}")
        vocab = a.model.config.vocab_size
        kind = f"Hugging Face {a.model.config.model_type} causal LM ({spec.name})"
        return spec, lm_task(a.model, byte_tokens(vocab_size=min(vocab, 256), n_train=256, n_test=64), hf=True), kind
    compare_state_dicts(a.params, b.params, (str(a.path), str(b.path)))
    inferred = infer_spec(a.params, activation=activation or "relu")
    model = DenseChain(inferred).eval()
    d_in, d_out = inferred.sizes[0], inferred.sizes[-1]
    name = data or {64: "digits", 40: "mnist1d"}.get(d_in)
    if name is None or name not in ("digits", "mnist1d"):
        raise CheckpointError(f"no embedded dataset for a {d_in}->{d_out} dense model; pass --data digits|mnist1d with matching sizes")
    split = _split(name)
    if split.x_train.shape[1] != d_in or split.n_classes != d_out:
        raise CheckpointError(f"--data {name} has {split.x_train.shape[1]} inputs and {split.n_classes} classes; the model is {d_in}->{d_out}")
    explanation = inferred.explanation if activation else inferred.explanation.split(";")[0] + "; activation assumed 'relu' (pass --activation)"
    return inferred.spec, _classifier_task(model, split), explanation


def output_paths(b: Checkpoint, out_dir: Path) -> dict[str, Path]:
    aligned = out_dir / ("aligned_model" if b.fmt == "hf" else f"{b.path.stem}_aligned{b.path.suffix}")
    return {"aligned": aligned, "report": out_dir / "report.json", "plot": out_dir / "barrier.png"}


def check_outputs(paths: dict[str, Path], inputs: list[Path], overwrite: bool) -> None:
    for p in paths.values():
        for i in inputs:
            if p.resolve() == i.resolve():
                raise CheckpointError(f"output {p} would overwrite input {i}")
        if p.exists() and not overwrite:
            raise CheckpointError(f"output {p} already exists (pass --overwrite to replace outputs)")


def save_aligned(b: Checkpoint, params: dict[str, torch.Tensor], path: Path) -> None:
    if b.fmt != "hf":
        save_state_dict(params, path, overwrite=True, protect=[b.path])
        return
    assert b.model is not None
    b.model.load_state_dict(params)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        b.model.save_pretrained(tmp)
        for extra in b.path.iterdir():  # tokenizer and other side files travel with the weights
            if extra.is_file() and not (tmp / extra.name).exists() and not extra.name.endswith((".safetensors", ".bin")):
                shutil.copy2(extra, tmp / extra.name)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def align(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    method: str = "weights",
    data: str | None = None,
    activation: str | None = None,
    n_points: int = 25,
    seed: int = 0,
    backend: str = "auto",
    overwrite: bool = False,
    use_repair: bool = False,
    progress: bool = True,
) -> dict:
    """Align B onto A, measure naive vs aligned barriers, write aligned B, ``report.json`` and ``barrier.png``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    t0 = time.perf_counter()
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    spec, task, explanation = resolve(a, b, activation, data)
    out_dir = Path(out_dir)
    paths = output_paths(b, out_dir)
    check_outputs(paths, [a.path, b.path], overwrite)
    t_load = time.perf_counter() - t0
    info = MatchInfo()
    t1 = time.perf_counter()
    if method == "weights":
        g = weight_matching(spec, a.params, b.params, seed=seed, backend=backend, progress=progress, info=info)
    else:
        g = activation_matching(spec, task.model, a.params, b.params, task.inputs, seed=seed, backend=backend, progress=progress, info=info)
    t_align = time.perf_counter() - t1
    aligned = spec.act(b.params, g)
    t2 = time.perf_counter()
    correct = None
    if use_repair:
        correct = lambda mixed, t: repair(spec, task.model, a.params, aligned, mixed, t, task.inputs)  # noqa: E731
    barrier = naive_vs_aligned(task.evaluate, a.params, b.params, aligned, n_points, progress, correct)
    t_barrier = time.perf_counter() - t2
    out_dir.mkdir(parents=True, exist_ok=True)
    save_aligned(b, aligned, paths["aligned"])
    report = {
        "models": {"A": str(a.path), "B": str(b.path), "format": a.fmt, "architecture": explanation},
        "spec": {"name": spec.name, "factors": len(spec.factors), "parameters": len(spec.params), "continuous_dimension": spec.dimension},
        "method": method,
        "backend": backend,
        "repair": use_repair,
        "data": task.data_name,
        "sweeps": info.sweeps,
        "converged": info.converged,
        **barrier.to_dict(),
        "timings_s": {"load": t_load, "align": t_align, "barrier": t_barrier, "total": time.perf_counter() - t0},
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    atomic_write_text(paths["report"], json.dumps(report, indent=2) + "\n")
    plot_barrier(barrier, paths["plot"], f"{spec.name}: {method} matching on {task.data_name}")
    return report
