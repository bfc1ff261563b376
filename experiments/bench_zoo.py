"""Benchmark model zoos: generation throughput (models/s, local, 1 and 2 workers) of the default digits-MLP zoo,
and the seconds to open a 10k-model zoo and read its weights.

    .venv/bin/python experiments/bench_zoo.py [--n-models 1000] [--workers 1 2] [--load-models 10000]

Prints a table and writes experiments/results/bench_zoo.json. The 10k-model zoo for the load timing is written
directly in the zoo format with random weights (loading does not depend on the values; generating 10k real runs
would take most of an hour here).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from symm.zoo import ZooPlan, draw_run, load, make_zoo
from symm.zoo.datasets import load_dataset
from symm.zoo.make import _Index, _prepare
from symm.zoo.manifest import SHARDS, arch_id
from symm.zoo.shards import write_shard
from symm.models import build_model

RESULTS = Path(__file__).parent / "results"


def bench_generation(n_models: int, workers: int, root: Path) -> dict:
    out = root / f"gen-w{workers}"
    start = time.perf_counter()
    make_zoo(out, ZooPlan("mlp", "digits", n_models), workers=workers, progress=True)
    seconds = time.perf_counter() - start
    zoo = load(out).final()
    acc = np.asarray(zoo.table["test_accuracy"], dtype=float)
    q = np.nanquantile(acc, [0, 0.25, 0.5, 0.75, 1]).round(3).tolist()
    shutil.rmtree(out)
    return {"n_models": n_models, "workers": workers, "seconds": round(seconds, 1), "models_per_s": round(n_models / seconds, 2),
            "final_test_accuracy_quantiles": q}


def synthetic_zoo(out: Path, n_models: int, checkpoints: int = 6, chunk: int = 64) -> None:
    """A zoo of ``n_models`` random-weight runs in the real format (default digits-MLP space)."""
    plan = ZooPlan("mlp", "digits", n_models)
    _prepare(out, plan)
    data = load_dataset("digits", 0)
    runs = [draw_run(plan.space, 0, i) for i in range(n_models)]
    groups: dict[str, list] = {}
    for r in runs:
        groups.setdefault(arch_id(plan.config(r, data.n_features, data.n_classes)), []).append(r)
    index = _Index(out, every=1e9)
    for aid, members in groups.items():
        cfg = plan.config(members[0], data.n_features, data.n_classes)
        shapes = {k: v.shape for k, v in build_model(cfg).named_parameters()}
        (out / SHARDS / aid).mkdir(exist_ok=True)
        for i in range(0, len(members), chunk):
            part = members[i : i + chunk]
            rows = [{"model_id": f"r{r.run_id:06d}-e{e:03d}", "run_id": r.run_id, "arch": aid, "seed": r.seed, **r.hyperparameters(),
                     "epoch": e, "step": e, "train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5,
                     "test_loss": 1.0, "test_accuracy": float(np.random.rand()), "finite": 1} for r in part for e in range(checkpoints)]
            weights = {k: torch.randn(len(rows), *s) for k, s in shapes.items()}
            path = out / SHARDS / aid / f"runs-{part[0].run_id:06d}-{part[-1].run_id:06d}-n{len(part)}.safetensors"
            write_shard(path, weights, rows, {"arch": aid})
            index.add(path, rows)
    index.flush()


def bench_load(n_models: int, root: Path) -> dict:
    out = root / "load"
    synthetic_zoo(out, n_models)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    t0 = time.perf_counter()
    zoo = load(out)
    t1 = time.perf_counter()
    final = zoo.final()
    biggest = max(np.unique(final.table["arch"]), key=lambda a: int((final.table["arch"] == a).sum()))
    view = final.select(arch=biggest)
    t2 = time.perf_counter()
    w = view.weights()
    t3 = time.perf_counter()
    every = {a: zoo.select(arch=a).weights() for a in np.unique(zoo.table["arch"])}
    t4 = time.perf_counter()
    n_ckpt = len(zoo)
    del every, w
    shutil.rmtree(out)
    return {"n_models": n_models, "checkpoints": n_ckpt, "bytes": size, "open_s": round(t1 - t0, 3),
            "final_select_s": round(t2 - t1, 3), "read_one_arch_final_s": round(t3 - t2, 3), "rows_one_arch": len(view),
            "read_all_checkpoints_s": round(t4 - t3, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-models", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--load-models", type=int, default=10_000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_zoo-"))
    try:
        gen = [bench_generation(args.n_models, w, root) for w in args.workers]
        ld = bench_load(args.load_models, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'workers':>8} {'models':>7} {'seconds':>8} {'models/s':>9}  final test accuracy (min q1 median q3 max)")
    for g in gen:
        print(f"{g['workers']:>8} {g['n_models']:>7} {g['seconds']:>8} {g['models_per_s']:>9}  {g['final_test_accuracy_quantiles']}")
    print(f"load {ld['n_models']} models ({ld['checkpoints']} checkpoints, {ld['bytes'] / 1e6:.0f} MB): open {ld['open_s']} s, "
          f"final() {ld['final_select_s']} s, read {ld['rows_one_arch']} final checkpoints of one arch {ld['read_one_arch_final_s']} s, "
          f"read every checkpoint {ld['read_all_checkpoints_s']} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bench_zoo.json").write_text(json.dumps({"generation": gen, "load": ld}, indent=1) + "\n")


if __name__ == "__main__":
    main()
