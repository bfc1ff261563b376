"""Merging N = 2..5 independently trained MLPs: naive averaging vs MergeMany with weight matching, activation
matching and straight-through estimation (STE), and the singular-vector alignment each one reaches.

Question (issue 15, item 5): does weight matching beat STE when merging three or more models, as Ito, Yamada &
Kumagai (arXiv 2402.04051) report?

Protocol: per dataset (digits, mnist1d) five 64|40-w-w-10 ReLU MLPs, seeds 0..4 (initialisation and minibatch
order), Adam lr 1e-3, batch 64 (symm.train.train_classifier; digits 30 epochs, mnist1d 60 epochs). For each N the
first N models (seeds 0..N-1) are merged:
- naive: the uniform average of the raw weights;
- weights: MergeMany (aligners.merge.merge_many, init="first", max_rounds 20, seed 0) with weight matching;
- activations: MergeMany whose matcher is activation matching on the whole training split against the current
  target (the mean of the other aligned models);
- ste: MergeMany whose matcher is STE against the current target (aligners.ste.classifier_ste_matcher, as symm merge --method ste: training
  batches of 128, Adam on the proxy, lr 1e-2, ``--ste-steps`` steps, the projection with the lowest midpoint
  loss on the first 512 training samples kept), at most ``--ste-rounds`` rounds (each STE match costs
  ``--ste-steps`` weight matchings);
- weights_short: the control for STE's round budget, weight-matching MergeMany capped at ``--ste-rounds`` rounds.
The merged model is the uniform average of the aligned models in model 0's frame; reported: its test cross-entropy
and accuracy, the inputs' mean, the rounds and the wall time of the merge. Singular vectors
(aligners.analysis.singular_report, k=8): per weight matrix the top-k left / right subspace overlap between model
0 and aligned model i, averaged over i = 1..N-1.

Torch runs on one thread (``--threads``): on the shared 2-core machine two threads were ~5-10x slower.
Trained checkpoints are cached in experiments/results/merge_many_cache/ (git-ignored). Rows of an existing
merge_many.json made with the same epochs, rounds and STE settings are reused (``--fresh`` recomputes them); the
JSON lists every run's wall time.

Usage: .venv/bin/python experiments/merge_many.py [--widths 256] [--ns 2 3 4 5] [--datasets digits mnist1d]
       [--ste-steps 100] [--ste-rounds 3] [--fresh] [--quick]
Writes experiments/results/merge_many.json, merge_many.png and merge_many_singular.png (``--quick``: the same
names with ``_quick`` inside the cache folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import RESULTS, quiet_logs, table, write_json
from aligners.activation_matching import activation_matching
from aligners.analysis import SingularAlignment, plot_singular, singular_report
from aligners.merge import merge_many, weighted_average
from aligners.ste import classifier_ste_matcher
from symm.data import digits, mnist1d
from symm.evaluate import state_dict_of
from symm.io import atomic_write_text
from symm.models import MLP, MLPConfig, spec_for
from symm.train import evaluate_classifier, train_classifier

CACHE = RESULTS / "merge_many_cache"
EPOCHS = {"digits": 30, "mnist1d": 60}
#: weights_short: weight-matching MergeMany capped at --ste-rounds rounds, the control for STE's round budget
METHODS = ("naive", "weights", "weights_short", "activations", "ste")
PLOTTED = ("naive", "weights", "activations", "ste")  # the singular-vector plot
ROW_KEYS = ("epochs", "max_rounds", "ste")  # protocol entries a stored row depends on
LOADERS = {"digits": digits, "mnist1d": mnist1d}
K = 8


def trained(dataset: str, data, width: int, seed: int, epochs: int) -> tuple[MLP, dict, float | None]:
    """The cached checkpoint (or train and cache it): model, state dict, training seconds when trained."""
    CACHE.mkdir(parents=True, exist_ok=True)
    ignore = CACHE / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# trained checkpoints of merge_many.py: a cache, never committed\n*\n")
    config = MLPConfig((data.x_train.shape[1], width, width, data.n_classes), "relu")
    path = CACHE / f"{dataset}_mlp_w{width}_e{epochs}_s{seed}.pt"
    meta = path.with_suffix(".json")
    model = MLP(config)
    if path.exists():
        sd = torch.load(path, weights_only=True)
        model.load_state_dict(sd)
        model.eval()
        train_s = json.loads(meta.read_text()).get("train_s") if meta.exists() else None
        return model, sd, train_s
    torch.manual_seed(seed)
    model = MLP(config)
    t0 = time.perf_counter()
    train_classifier(model, data.x_train, data.y_train, epochs=epochs, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    sd = state_dict_of(model)
    tmp = path.with_suffix(".pt.tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    atomic_write_text(meta, json.dumps({"train_s": seconds, "threads": torch.get_num_threads()}) + "\n")
    return model, sd, seconds


def ste_matcher(spec, model, data, steps: int, lr: float, seed: int = 0):
    """STE of one model against its MergeMany target (the recipe ``symm merge --method ste`` uses)."""
    return classifier_ste_matcher(spec, model, data.x_train, data.y_train, steps=steps, lr=lr, seed=seed)


def singular_summary(spec, aligned) -> dict:
    """Per weight matrix: mean over i >= 1 of the top-k subspace overlaps of model 0 and aligned model i."""
    reports = [singular_report(aligned[0], a, k=K, spec=spec) for a in aligned[1:]]
    return {layer: {"overlap_u": sum(r[layer].overlap_u for r in reports) / len(reports),
                    "overlap_v": sum(r[layer].overlap_v for r in reports) / len(reports)}
            for layer in reports[0]}


def run_one(dataset, data, width, n, method, models, params, spec, args) -> tuple[dict, tuple]:
    """Merge the first n models with one method; the row and the aligned models."""
    ps = params[:n]
    evaluate = lambda p: evaluate_classifier(models[0], p, data.x_test, data.y_test)  # noqa: E731
    inputs = [evaluate(p) for p in ps]
    t0 = time.perf_counter()
    rounds, converged, changed = 0, None, []
    if method == "naive":
        aligned = tuple(ps)
        merged = weighted_average(ps, [1.0 / n] * n)
    else:
        matcher, max_rounds = None, args.max_rounds
        if method == "activations":
            def matcher(target, p, init):  # noqa: E306
                return activation_matching(spec, models[0], target, p, data.x_train, progress=False)
        elif method == "weights_short":
            max_rounds = args.ste_rounds
        elif method == "ste":
            matcher, max_rounds = ste_matcher(spec, models[0], data, args.ste_steps, args.ste_lr), args.ste_rounds
        result = merge_many(spec, ps, max_rounds=max_rounds, seed=0, matcher=matcher, progress=False)
        aligned, merged = result.aligned, result.merged
        rounds, converged, changed = result.info.rounds, result.info.converged, result.info.changed
    seconds = time.perf_counter() - t0
    loss, acc = evaluate(merged)
    row = {
        "dataset": dataset, "width": width, "N": n, "method": method,
        "acc": acc, "loss": loss,
        "inputs_acc": sum(a for _, a in inputs) / n, "inputs_loss": sum(lo for lo, _ in inputs) / n,
        "inputs_acc_each": [a for _, a in inputs],
        "rounds": rounds, "converged": converged, "changed_per_round": changed, "seconds": seconds,
        "singular": singular_summary(spec, aligned),
    }
    return row, aligned


def save_fig(fig, path: Path) -> None:
    """Save atomically: a temporary file in the same folder, then os.replace."""
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are shared files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {path}")


def plot(rows: list[dict], path: Path) -> None:
    panels = sorted({(r["dataset"], r["width"]) for r in rows})
    styles = {"naive": "r--o", "weights": "b-o", "weights_short": "c:x", "activations": "g-s", "ste": "m-^"}
    fig, axes = plt.subplots(2, len(panels), figsize=(4.8 * len(panels), 7), squeeze=False)
    for col, (ds, w) in enumerate(panels):
        sub = [r for r in rows if r["dataset"] == ds and r["width"] == w]
        ns = sorted({r["N"] for r in sub})
        for row_i, (key, label) in enumerate((("acc", "test accuracy"), ("loss", "test cross-entropy"))):
            ax = axes[row_i][col]
            for m in METHODS:
                pts = sorted((r["N"], r[key]) for r in sub if r["method"] == m)
                if pts:
                    ax.plot(*zip(*pts), styles[m], label=m if m != "weights_short" else "weights, <= STE's rounds", lw=1 if m == "weights_short" else 1.5)
            ref = {r["N"]: r[f"inputs_{key}"] for r in sub}
            ax.plot(ns, [ref[x] for x in ns], color="0.5", ls=":", label="mean of inputs")
            ax.set_xticks(ns)
            ax.set_xlabel("N models merged")
            ax.set_ylabel(f"merged {label}")
            if key == "loss":
                ax.set_yscale("log")
            ax.set_title(f"{ds}, ReLU MLP width {w}", fontsize=9)
            ax.grid(alpha=0.3)
            if key == "acc":  # one legend per column (the loss panel's would hide points)
                ax.legend(fontsize=7)
    fig.tight_layout()
    save_fig(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256])
    parser.add_argument("--ns", type=int, nargs="+", default=[2, 3, 4, 5])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"], choices=list(LOADERS))
    parser.add_argument("--ste-steps", type=int, default=100)
    parser.add_argument("--ste-lr", type=float, default=1e-2)
    parser.add_argument("--ste-rounds", type=int, default=3, help="max MergeMany rounds with the STE matcher")
    parser.add_argument("--max-rounds", type=int, default=20, help="max MergeMany rounds for weights / activations")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="recompute every row (default: reuse rows of the existing JSON "
                        "made with the same epochs, rounds and STE settings)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (outputs in the cache folder)")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.ns, args.datasets = [32], [2, 3], ["digits"]
        args.ste_steps, args.ste_rounds, args.max_rounds = 5, 1, 3
    torch.set_num_threads(args.threads)
    quiet_logs()
    epochs = {ds: (3 if args.quick else EPOCHS[ds]) for ds in LOADERS}
    out_dir = CACHE if args.quick else RESULTS
    name = "merge_many_quick" if args.quick else "merge_many"
    CACHE.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    payload = {
        "protocol": {
            "models": "ReLU MLP in-w-w-10, symm.train.train_classifier (Adam lr 1e-3, batch 64), seeds 0..N-1",
            "epochs": epochs, "widths": args.widths, "ns": args.ns, "datasets": args.datasets,
            "merge": "aligners.merge.merge_many, init='first', seed 0, uniform weights",
            "max_rounds": args.max_rounds, "ste": {"steps": args.ste_steps, "lr": args.ste_lr, "max_rounds": args.ste_rounds,
                                                   "batch": 128, "eval_batch": "first 512 training samples"},
            "activations": "activation_matching on the whole training split against the current target",
            "singular": f"top-{K} subspace overlap of model 0 and aligned model i, mean over i >= 1",
            "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        },
        "models": [], "rows": [], "quick": args.quick,
    }
    def save(doc: dict) -> None:  # atomic, after every row
        if args.quick:
            atomic_write_text(out_dir / f"{name}.json", json.dumps(doc, indent=2) + "\n")
        else:
            write_json(name, doc)

    old = None if args.fresh else _load(out_dir / f"{name}.json")
    reusable = {}
    if old is not None and all(old.get("protocol", {}).get(k) == payload["protocol"][k] for k in ROW_KEYS):
        reusable = {(r["dataset"], r["width"], r["N"], r["method"]): r for r in old.get("rows", [])}
        payload["runs"] = old.get("runs") or [{"wall_s": old.get("wall_s"), "computed_rows": len(old.get("rows", [])), "reused_rows": 0}]
    elif old is not None:
        print("existing results were made with another protocol: recomputing everything", flush=True)
    run_log = {"wall_s": 0.0, "computed_rows": 0, "reused_rows": 0}
    payload.setdefault("runs", []).append(run_log)
    old_singular = (old or {}).get("singular_plot", {}) if reusable else {}
    singular_n = 3 if 3 in args.ns else args.ns[0]
    singular_at = ("digits", args.widths[0], singular_n)
    payload["singular_plot_at"] = dict(zip(("dataset", "width", "N"), singular_at))
    payload["singular_plot"] = {}
    for ds in args.datasets:
        data = LOADERS[ds]()
        for width in args.widths:
            models, params = [], []
            for seed in range(max(args.ns)):
                model, sd, train_s = trained(ds, data, width, seed, epochs[ds])
                loss, acc = evaluate_classifier(model, sd, data.x_test, data.y_test)
                models.append(model)
                params.append(sd)
                payload["models"].append({"dataset": ds, "width": width, "seed": seed, "acc": acc, "loss": loss, "train_s": train_s})
                print(f"{ds} w={width} seed={seed}: test acc {acc:.4f} loss {loss:.4f} (train {train_s if train_s is None else round(train_s, 1)} s)", flush=True)
            spec = spec_for(models[0])
            for n in args.ns:
                for method in METHODS:
                    key = (ds, width, n, method)
                    singular_here = key[:3] == singular_at and method in PLOTTED
                    if key in reusable and (not singular_here or method in old_singular):
                        row = reusable[key]
                        run_log["reused_rows"] += 1
                        if singular_here:
                            payload["singular_plot"][method] = old_singular[method]
                        tag = "(reused)"
                    else:
                        row, aligned = run_one(ds, data, width, n, method, models, params, spec, args)
                        run_log["computed_rows"] += 1
                        if singular_here:
                            rep = singular_report(aligned[0], aligned[1], k=K, spec=spec)
                            payload["singular_plot"][method] = {lay: r.to_dict() for lay, r in rep.items()}
                        tag = ""
                    payload["rows"].append(row)
                    run_log["wall_s"] = time.perf_counter() - t_start
                    save(payload)
                    print(f"  N={n} {method:13s} acc {row['acc']:.4f} loss {row['loss']:.4f} (inputs {row['inputs_acc']:.4f}) "
                          f"rounds {row['rounds']} {row['changed_per_round']} {row['seconds']:.1f} s {tag}", flush=True)
    run_log["wall_s"] = time.perf_counter() - t_start
    payload["wall_s"] = sum(r["wall_s"] or 0.0 for r in payload["runs"])
    save(payload)
    if payload["singular_plot"]:
        reports = {m: {lay: SingularAlignment(**{**d, "shape": tuple(d["shape"])}) for lay, d in payload["singular_plot"][m].items()}
                   for m in PLOTTED if m in payload["singular_plot"]}
        fig_path = out_dir / f"{name}_singular.png"
        tmp = fig_path.with_name(f".{fig_path.stem}.tmp.png")
        plot_singular(reports, tmp, title=f"digits, width {singular_at[1]}, N={singular_n}: model 0 vs aligned model 1, top-{K} "
                                          "singular vectors of each matrix's larger (hidden) side (dotted: singular values of model 0)")
        os.replace(tmp, fig_path)
        print(f"wrote {fig_path}")
    plot(payload["rows"], out_dir / f"{name}.png")
    cols = ["dataset", "width", "N", "method", "acc", "loss", "inputs_acc", "rounds", "seconds"]
    print(table(payload["rows"], cols))
    print(f"wall time of this run {run_log['wall_s']:.0f} s; all runs {payload['wall_s']:.0f} s")


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    main()
