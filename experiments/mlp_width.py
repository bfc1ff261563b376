"""Barrier vs width for ReLU MLPs on digits and mnist1d: naive vs weight matching vs activation matching.

Usage: .venv/bin/python experiments/mlp_width.py [--widths 32 64 ...] [--datasets digits mnist1d]
Writes experiments/results/mlp_width.json and mlp_width.png.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import RESULTS, quiet_logs, table, write_json
from aligners import activation_matching, naive_vs_aligned, weight_matching
from symm.action import act
from symm.data import digits, mnist1d
from symm.evaluate import state_dict_of
from symm.models import MLP, MLPConfig, spec_for
from symm.train import evaluate_classifier, train_classifier

EPOCHS = {"digits": 30, "mnist1d": 60}


def run(dataset: str, width: int, seed: int = 0) -> dict:
    data = {"digits": digits, "mnist1d": mnist1d}[dataset]()
    config = MLPConfig((data.x_train.shape[1], width, width, data.n_classes), "relu")
    models = []
    t0 = time.perf_counter()
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        models.append(train_classifier(MLP(config), data.x_train, data.y_train, epochs=EPOCHS[dataset], seed=s, progress=False))
    t_train = time.perf_counter() - t0
    a, b = (state_dict_of(m) for m in models)
    spec = spec_for(models[0])
    evaluate = lambda p: evaluate_classifier(models[0], p, data.x_test, data.y_test)  # noqa: E731
    row = {"dataset": dataset, "width": width, "acc_A": evaluate(a)[1], "acc_B": evaluate(b)[1], "train_s": t_train}
    t1 = time.perf_counter()
    g_w = weight_matching(spec, a, b, progress=False, seed=seed)
    row["weights_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    g_a = activation_matching(spec, models[0], a, b, data.x_train, progress=False, seed=seed)
    row["activations_s"] = time.perf_counter() - t2
    weights = naive_vs_aligned(evaluate, a, b, act(spec, b, g_w), progress=False)
    acts = naive_vs_aligned(evaluate, a, b, act(spec, b, g_a), progress=False)
    row.update(
        loss_naive=weights.naive.loss_barrier,
        loss_weights=weights.aligned.loss_barrier,
        loss_activations=acts.aligned.loss_barrier,
        acc_naive=weights.naive.accuracy_barrier,
        acc_weights=weights.aligned.accuracy_barrier,
        acc_activations=acts.aligned.accuracy_barrier,
    )
    return row


def plot(rows: list[dict], path) -> None:
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        sub = sorted((r for r in rows if r["dataset"] == ds), key=lambda r: r["width"])
        w = [r["width"] for r in sub]
        for key, style in (("loss_naive", "r--o"), ("loss_weights", "b-o"), ("loss_activations", "g-s")):
            ax.plot(w, [r[key] for r in sub], style, label=key.replace("loss_", ""))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width")
        ax.set_ylabel("test loss barrier")
        ax.set_title(f"ReLU MLP, {ds}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist1d"])
    args = parser.parse_args()
    quiet_logs()
    rows = []
    for ds in args.datasets:
        for w in args.widths:
            rows.append(run(ds, w))
            print(table(rows[-1:], list(rows[-1])), flush=True)
    cols = ["dataset", "width", "acc_A", "acc_B", "loss_naive", "loss_weights", "loss_activations", "acc_naive", "acc_weights", "acc_activations", "weights_s"]
    print(table(rows, cols))
    write_json("mlp_width", {"rows": rows, "epochs": EPOCHS})
    plot(rows, RESULTS / "mlp_width.png")


if __name__ == "__main__":
    main()
