"""Experiment: which laws each optimizer keeps, and how drift scales with the learning rate.

Part 1: every named reference model x {SGD, SGD + weight decay, momentum, Adam}, 50 steps in float64 on the embedded
data: laws, worst relative residual against the exact SGD step, worst relative drift, worst Noether residual, verdicts.
Part 2: mlp-relu, total drift after k = 50 steps vs learning rate for SGD and Adam (log-log slope; the notes expect
about 2 for SGD and about 1 for Adam at fixed steps). Part 3: the same at fixed time eta * k (about 1 and 0).
Prints tables, writes experiments/results/laws_optimizers.json and .png.

Usage: .venv/bin/python experiments/laws_optimizers.py [--steps 50]
"""

from __future__ import annotations

import argparse
import math

import torch

from _common import RESULTS, quiet_logs, table, write_json
from symm.laws_verify import run_verify

MODELS = ("mlp-relu", "mlp-gelu", "swiglu", "attention-sinusoidal", "attention-rope", "attention-rope-interleaved", "moe-softmax", "moe-sigmoid")
OPTIMIZERS = (("sgd", 0.0), ("sgd", 0.01), ("momentum", 0.0), ("adam", 0.0))


def part1(steps: int) -> list[dict]:
    rows = []
    for model in MODELS:
        for opt, wd in OPTIMIZERS:
            report, _ = run_verify(model, opt, weight_decay=wd, steps=steps, progress=False)
            fams = report["families"]
            rows.append(
                {
                    "model": model,
                    "optimizer": opt + (f"+wd{wd}" if wd else ""),
                    "laws": report["n_laws"],
                    "max_residual": max((f["max_residual"] for f in fams), default=0.0),
                    "max_drift": max((f["max_relative_drift"] for f in fams), default=0.0),
                    "noether": max((f["noether"] for f in fams), default=0.0),
                    "verdicts": ", ".join(sorted({f["verdict"] for f in fams})) or "no laws",
                }
            )
            print(table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def part2(steps: int) -> dict:
    out = {}
    for opt, lrs in (("sgd", (0.0125, 0.025, 0.05, 0.1, 0.2)), ("adam", (1.25e-4, 2.5e-4, 5e-4, 1e-3, 2e-3))):
        drifts = []
        for lr in lrs:
            _, tracker = run_verify("mlp-relu", opt, lr=lr, steps=steps, progress=False)
            total = torch.stack([r.drift / r.scale for r in tracker.records]).sum(0).abs().max()
            drifts.append(float(total))
        xs, ys = [math.log(x) for x in lrs], [math.log(y) for y in drifts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out[opt] = {"lrs": list(lrs), "max_total_relative_drift": drifts, "loglog_slope": slope}
        print(f"{opt}: drift after {steps} steps vs lr: slope {slope:.2f} ({drifts})", flush=True)
    return out


def part3(time_total: float = 2.0) -> dict:
    """Drift at fixed time eta * k = ``time_total`` (k = time_total / eta steps): the notes expect slope ~1 for SGD
    (the discrete-step error vanishes with eta) and ~0 for Adam (its drift does not vanish as eta -> 0)."""
    out = {}
    for opt, lrs in (("sgd", (0.025, 0.05, 0.1, 0.2)), ("adam", (2.5e-4, 5e-4, 1e-3, 2e-3))):
        scale = time_total if opt == "sgd" else time_total / 100  # Adam's steps are about 100x smaller per unit lr
        drifts = []
        for lr in lrs:
            steps = max(1, round(scale / lr))
            _, tracker = run_verify("mlp-relu", opt, lr=lr, steps=steps, progress=False)
            drifts.append(float(torch.stack([r.drift / r.scale for r in tracker.records]).sum(0).abs().max()))
        xs, ys = [math.log(x) for x in lrs], [math.log(y) for y in drifts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out[opt] = {"lrs": list(lrs), "eta_times_k": scale, "max_total_relative_drift": drifts, "loglog_slope": slope}
        print(f"{opt}: drift at fixed eta*k = {scale} vs lr: slope {slope:.2f} ({drifts})", flush=True)
    return out


def plot(scaling: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for opt, r in scaling.items():
        ax.loglog(r["lrs"], r["max_total_relative_drift"], "o-", label=f"{opt} (slope {r['loglog_slope']:.2f})")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("worst |total drift| / ||touched||^2")
    ax.set_title("mlp-relu, drift of the scaling laws after a fixed number of steps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    quiet_logs()
    torch.set_num_threads(2)
    rows = part1(args.steps)
    print(table(rows, list(rows[0])))
    scaling = part2(args.steps)
    fixed_time = part3()
    plot(scaling, RESULTS / "laws_optimizers.png")
    write_json("laws_optimizers", {"steps": args.steps, "dtype": "float64", "rows": rows, "lr_scaling": scaling, "fixed_time": fixed_time})


if __name__ == "__main__":
    main()
