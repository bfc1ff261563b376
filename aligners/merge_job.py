"""The merge job: N checkpoints in, their MergeMany average + every aligned input + report + plot out
(``symm merge A B C ...``; ``--method weights|activations|ste``).

Same discipline as ``symm align`` (:mod:`aligners.job`): arguments and outputs are checked before any work, the
output folder is locked, every input is loaded and validated against the first (format, architecture, keys,
shapes, finite weights), the models are aligned into the first one's frame (:func:`aligners.merge.merge_many`),
every aligned copy is checked to compute its input's function, the merged model, the naive average and every
input are evaluated, and the whole result set is staged and published at once. Inputs are never written.

Outputs in ``--out``: ``merged.safetensors`` / ``merged.pt`` (state dicts, the first input's format) or
``merged_model/`` (Hugging Face folders, via ``save_pretrained``), ``aligned-<i>-<name>`` for every input,
``merge.png`` and ``report.json`` (written last).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from symm.action import act
from symm.adapters import is_hf_folder
from symm.checkpoint import Checkpoint, load_checkpoint
from symm.errors import CheckpointError, FunctionMismatch, OutputError, UsageError
from symm.io import atomic_write_text, save_state_dict
from symm.publish import fault_point, publish, staged_output

from .activation_matching import activation_matching
from .job import ACTIVATIONS, DATASETS, Task, _check_input_kind, cast, eval_dtype, resolve, storage_dtype
from .merge import MergeResult, merge_many, normalise_weights, weighted_average
from .outputs import check_same_function, disk_size, make_parents, preflight, remove_empty, save_aligned

log = logging.getLogger(__name__)

MERGE_METHODS = ("weights", "activations", "ste")


@dataclass(frozen=True)
class MergePlan:
    """The result set: the merged model, one aligned copy per input, ``merge.png`` and ``report.json``."""

    out: Path
    real: Path
    merged: str
    aligned_copies: tuple[str, ...]
    plot: str = "merge.png"
    report: str = "report.json"

    @property
    def names(self) -> list[str]:
        """Publication order: the report last (its presence means the set is complete)."""
        return [self.merged, *self.aligned_copies, self.plot, self.report]

    @property
    def aligned(self) -> str:  # the longest name, for the path-length check of :func:`preflight`
        return max(self.names, key=len)

    def shown(self) -> dict:
        return {"merged": str(self.out / self.merged), "aligned": [str(self.out / n) for n in self.aligned_copies],
                "report": str(self.out / self.report), "plot": str(self.out / self.plot)}


def plan_merge(paths: Sequence[Path], hf: bool, out: str | os.PathLike) -> MergePlan:
    if hf:
        merged, copies = "merged_model", tuple(f"aligned-{i}-{p.name}" for i, p in enumerate(paths))
    else:
        suffix = ".pt" if paths[0].suffix in (".pt", ".pth", ".bin") else ".safetensors"
        merged, copies = f"merged{suffix}", tuple(f"aligned-{i}-{p.stem}{p.suffix}" for i, p in enumerate(paths))
    return MergePlan(Path(out), Path(os.path.realpath(os.path.abspath(out))), merged, copies)


def check_merge_arguments(paths: Sequence, method: str, weights: Sequence[float] | None, activation: str | None, data: str | None,
                          ste_steps: int = 100) -> None:
    """Argument checks made before anything is read or written."""
    if ste_steps < 0:
        raise UsageError(f"--ste-steps must be >= 0, got {ste_steps}")
    if len(paths) < 2:
        raise UsageError(f"symm merge needs at least 2 checkpoints, got {len(paths)}")
    if method not in MERGE_METHODS:
        raise UsageError(f"--method must be one of {', '.join(MERGE_METHODS)}, got {method!r}")
    normalise_weights(weights, len(paths))
    if activation is not None and activation not in ACTIVATIONS:
        raise UsageError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if data is not None and data not in DATASETS:
        raise UsageError(f"--data must be one of {', '.join(DATASETS)}, got {data!r}")


def merge(
    paths: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    method: str = "weights",
    weights: Sequence[float] | None = None,
    data: str | None = None,
    activation: str | None = None,
    max_rounds: int = 20,
    ste_steps: int = 100,
    seed: int = 0,
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Merge the checkpoints at ``paths`` (see the module docstring); returns the report."""
    check_merge_arguments(paths, method, weights, activation, data, ste_steps)
    paths = [Path(p) for p in paths]
    for p in paths:
        _check_input_kind(p)
    kinds = {is_hf_folder(p) for p in paths}
    if len(kinds) > 1:
        raise CheckpointError("cannot merge Hugging Face folders with bare state dicts: give inputs of one kind")
    hf = kinds.pop()
    if hf and method == "ste":
        raise UsageError("--method ste needs a differentiable loss on training data: supported for state-dict classifiers "
                         "(digits / mnist1d), not yet for Hugging Face folders; use --method weights or activations")
    plan = plan_merge(paths, hf, out_dir)
    need = int(1.1 * sum(disk_size(p) for p in paths) + 1.1 * disk_size(paths[0])) + 1_000_000
    preflight(plan, paths, None, need_bytes=need)
    created = make_parents(plan.real.parent)
    try:
        with staged_output(plan.real, lambda: preflight(plan, paths, overwrite)) as stage:
            report = _run(paths, plan, stage, method, weights, data, activation, max_rounds, ste_steps, seed, backend, progress)
            publish(stage, plan.real, plan.names)
            return report
    except OSError as exc:
        where = exc.filename or plan.out
        raise OutputError(f"{exc.strerror or exc} ({where}) while writing the results to {plan.out}; nothing was written") from None
    finally:
        remove_empty(created)


def _run(paths, plan: MergePlan, stage: Path, method, weights, data, activation, max_rounds, ste_steps, seed, backend, progress) -> dict:
    t0 = time.perf_counter()
    ckpts = [load_checkpoint(p) for p in paths]
    spec, task, explanation = resolve(ckpts[0], ckpts[1], activation, data)
    for c in ckpts[2:]:
        resolve(ckpts[0], c, activation, data)  # same architecture, keys, shapes as the first (raises otherwise)
    dtypes = {storage_dtype(c.params) for c in ckpts}
    if len(dtypes) > 1:
        raise CheckpointError(f"the checkpoints are stored in different dtypes {sorted(str(d)[6:] for d in dtypes)}; convert them to one first")
    stored = dtypes.pop()
    dtype = eval_dtype(ckpts[0].params)
    params = [cast(c.params, dtype) for c in ckpts]
    t_load = time.perf_counter() - t0
    fault_point("loaded")

    t1 = time.perf_counter()
    matcher = None
    if method == "activations":
        def matcher(target, p, init):  # noqa: E306 - activation correlations against the current target
            return activation_matching(spec, task.model, target, p, task.inputs, seed=seed, backend=backend, progress=False)
    elif method == "ste":
        matcher = _ste_matcher(spec, task, dtype, ste_steps, seed, backend)
    result = merge_many(spec, params, weights=weights, max_rounds=max_rounds, seed=seed, backend=backend, matcher=matcher,
                        progress=progress, names=[str(p) for p in paths])
    t_align = time.perf_counter() - t1
    aligned_stored = [act(spec, c.params, g) for c, g in zip(ckpts, result.elements)]
    errors = [check_same_function(task.probe, p, cast(a, dtype), stored, f"the aligned copy of {path}")
              for p, a, path in zip(params, aligned_stored, paths)]
    fault_point("matched")

    t2 = time.perf_counter()
    models = [{**_scores(task, p), "aligned": _scores(task, cast(a, dtype))} for p, a in zip(params, aligned_stored)]
    naive = _scores(task, weighted_average(params, result.weights))
    merged = _scores(task, result.merged)
    t_eval = time.perf_counter() - t2
    report = {
        "models": [{"path": str(p), **m, "function_check": {"max_relative_error": e}} for p, m, e in zip(paths, models, errors)],
        "format": ckpts[0].fmt,
        "dtype": str(stored)[6:],
        "architecture": explanation,
        "spec": {"name": spec.name, "factors": len(spec.factors), "parameters": len(spec.params)},
        "method": method,
        **({"ste_steps": ste_steps} if method == "ste" else {}),
        "weights": list(result.weights),
        "data": task.data_name,
        "rounds": result.info.rounds,
        "converged": result.info.converged,
        "changed_per_round": result.info.changed,
        "agreement_per_round": result.info.objective,
        "best_round": result.info.best_round,
        "naive_average": naive,
        "merged": merged,
        "timings_s": {"load": t_load, "align": t_align, "evaluate": t_eval, "total": time.perf_counter() - t0},
        "outputs": plan.shown(),
    }
    _write(stage, plan, ckpts, aligned_stored, result, stored, report)
    return report


def _ste_matcher(spec, task: Task, dtype: torch.dtype, steps: int, seed: int, backend: str):
    """STE of each model against its MergeMany target, on the classifier's training split."""
    from .job import _split
    from .ste import classifier_ste_matcher

    split = _split(task.data_name)
    return classifier_ste_matcher(spec, task.model, split.x_train.to(dtype), split.y_train, steps=steps, seed=seed, backend=backend)


def _scores(task: Task, params) -> dict[str, float]:
    loss, acc = task.evaluate(params)
    return {"loss": float(loss), "accuracy": float(acc)}


def _save(ckpt: Checkpoint, params, path: Path, stored: torch.dtype) -> None:
    """A model in its input's format and dtype (an HF model is saved in the stored dtype, then put back)."""
    if ckpt.fmt == "hf":
        before = next(ckpt.model.parameters()).dtype  # the first input's model is the evaluation model
        ckpt.model.to(stored)
        try:
            save_aligned(ckpt, cast(params, stored), path)
        finally:
            ckpt.model.to(before)
        return
    save_state_dict(cast(params, stored), path)


def _write(stage: Path, plan: MergePlan, ckpts, aligned, result: MergeResult, stored, report) -> None:
    """Stage every output, read the merged model back, write the report last."""
    merged_stored = cast(result.merged, stored)
    _save(ckpts[0], merged_stored, stage / plan.merged, stored)
    fault_point("staged-model")
    for c, a, name in zip(ckpts, aligned, plan.aligned_copies):
        _save(c, a, stage / name, stored)
    back = load_checkpoint(stage / plan.merged)
    bad = [k for k, v in merged_stored.items() if k in back.params and not torch.equal(back.params[k].to(v.dtype), v)]
    if bad:
        raise FunctionMismatch(f"the written {plan.merged} does not read back as the merged weights ({', '.join(bad[:4])}); nothing was written")
    plot_merge(report, stage / plan.plot)
    fault_point("staged-plot")
    atomic_write_text(stage / plan.report, json.dumps(report, indent=2) + "\n")
    fault_point("staged")


def plot_merge(report: dict, path: Path) -> None:
    """Loss and accuracy of every input, their naive average and the merged model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"input {i}" for i in range(len(report["models"]))] + ["naive average", "merged"]
    rows = [*report["models"], report["naive_average"], report["merged"]]
    colors = ["0.6"] * len(report["models"]) + ["tab:red", "tab:blue"]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.6 * len(labels), 3.4))
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.bar(range(len(labels)), [r[key] for r in rows], color=colors)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(key, fontsize=9)
    fig.suptitle(f"{report['spec']['name']}: {report['method']} matching (MergeMany), {len(report['models'])} models on {report['data']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["MERGE_METHODS", "MergePlan", "check_merge_arguments", "merge", "plan_merge", "plot_merge"]
