"""Benchmark metanetworks: training throughput (networks/s), compile time, prediction throughput and peak memory per
model type (quasi, equivariant, statnn, mlp, hparams), plus the equivariant model on 2 forced host devices.

    .venv/bin/python experiments/bench_metanet.py [--models quasi equivariant statnn mlp hparams] [--batch-size 32]
        [--epochs 5] [--zoo DIR | --n-models 200] [--final] [--hidden 16] [--depth 2] [--head-hidden 64] [--no-two-devices]

Data: every checkpoint of one architecture of a zoo (``--final``: the last checkpoint of every run), split 80/10/10
by run. ``--zoo DIR`` reads an existing zoo (only read; the architecture with the most rows); otherwise a small
ReLU 64-32-32-10 digits zoo of ``--n-models`` runs (1-2 epochs each, checkpoints at epochs 0, 1, 2) is generated
into a temporary folder first and deleted at the end.

Every model type runs in its own child process (this script with ``--child``), so its peak RSS
(``ru_maxrss`` read in the child at its end: Python + JAX + torch, the zoo's arrays and the model) is that run's
alone. The child calls ``metanets.train.train`` unchanged (``--epochs`` epochs, patience 0, progress off) with three
of its module functions wrapped by timers (results blocked on): ``_train_epoch`` (wall and process CPU time of each
epoch), the jitted step returned by ``make_step`` (each step) and ``predict`` (each validation pass):

* compile (s): the first training step minus the median step (tracing + XLA compilation of the step);
* first epoch (s): epoch 0, compilation included; steady epoch (s): the median of epochs 1..E-1;
* train networks/s: training rows x steady epochs / their summed wall time (the optimizer loop with its batch
  assembly and host-to-device copies; the padded rows of the last batch are not counted); "best epoch": the same
  for the fastest steady epoch (the least disturbed by other processes on a shared machine); "per CPU-s": training
  rows per CPU-second of the process (all threads) over the steady epochs, the least sensitive to load;
* predict networks/s: ``metanets.train.predict`` over every row of the view (split by split, batches of 256),
  median of 3 timed passes after a warm-up pass;
* train() (s, JSON only): the whole ``train()`` call (normalisation fit, E epochs with validation, best-epoch restore).

The equivariant model runs once more with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` in the child's
environment (set before JAX is imported), so the training loop shards each batch over 2 host devices. The machine
may be shared: the 1-minute load average is recorded before and after every child. Benchmarks are not tests:
nothing asserts on time. Prints a table and writes experiments/results/bench_metanet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import table, write_json

MODELS = ("quasi", "equivariant", "statnn", "mlp", "hparams")
TWO_DEVICES = "equivariant"
FRACTIONS = (0.8, 0.1, 0.1)
SEED = 0
PREDICT_REPEATS = 3
METHOD = ("one child process per row; metanets.train.train with patience 0, its _train_epoch (wall + process CPU), "
          "make_step's step and validation predict wrapped and timed (results blocked on); compile = first step - median "
          "step; steady state = epochs 1..E-1; peak RSS = ru_maxrss of the child")
COLUMNS = ["model", "devices", "params", "batch", "compile_s", "first_epoch_s", "steady_epoch_s", "train_nets_per_s",
           "train_nets_per_s_best_epoch", "train_nets_per_cpu_s", "predict_nets_per_s", "peak_rss_mb", "load_1min"]


def display(row: dict) -> dict:
    """A row rounded for the printed table (throughputs and MB to integers, seconds to 2 decimals)."""
    out = dict(row)
    for key in ("train_nets_per_s", "train_nets_per_s_best_epoch", "train_nets_per_cpu_s", "predict_nets_per_s", "peak_rss_mb"):
        if isinstance(out.get(key), float):
            out[key] = int(round(out[key]))
    for key in ("first_epoch_s", "compile_s", "steady_epoch_s", "train_total_s", "load_1min"):
        if isinstance(out.get(key), float):
            out[key] = round(out[key], 3 if abs(out[key]) < 0.1 else 2)
    return out


# ----- child: one model type in its own process -----------------------------------------------------------------
def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (Linux reports KB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, wall: list[float], cpu: list[float] | None = None):
    """``fn`` whose wall time (results blocked on) is appended to ``wall`` at every call, its process CPU time to ``cpu``."""
    import jax

    def wrapper(*args, **kwargs):
        c0, t0 = time.process_time(), time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kwargs))
        wall.append(time.perf_counter() - t0)
        if cpu is not None:
            cpu.append(time.process_time() - c0)
        return out

    return wrapper


def child(kind: str, zoo_dir: Path, final: bool, batch_size: int, epochs: int, hidden: int, depth: int, head_hidden: int) -> dict:
    """Train and time one model type on the zoo view; runs in a fresh process (see :func:`run_child`)."""
    t_start = time.perf_counter()
    import importlib

    import jax
    import numpy as np
    from flax import nnx

    from metanets.cli import build_model
    from metanets.data import load_splits
    from symm.zoo import load

    mt = importlib.import_module("metanets.train")  # the module (the package re-exports its function ``train``)
    zoo = load(zoo_dir)
    view = zoo.final() if final else zoo
    archs, counts = np.unique(np.asarray([str(a) for a in view.table["arch"]]), return_counts=True)
    arch = str(archs[int(np.argmax(counts))])
    view = view.select(arch=arch)
    splits = load_splits(view, FRACTIONS, SEED)
    rss_data = _rss_mb()
    model = build_model(kind, view, splits, SEED, hidden=hidden, depth=depth, head_hidden=head_hidden)
    n_params = int(sum(np.size(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))

    epoch_s: list[float] = []
    epoch_cpu_s: list[float] = []
    step_s: list[float] = []
    val_s: list[float] = []
    original = (mt._train_epoch, mt.make_step, mt.predict)
    mt._train_epoch = _timed(original[0], epoch_s, epoch_cpu_s)
    mt.make_step = lambda graphdef, tx: _timed(original[1](graphdef, tx), step_s)
    mt.predict = _timed(original[2], val_s)
    try:
        config = mt.TrainConfig(epochs=epochs, batch_size=batch_size, patience=0, seed=SEED)
        t0 = time.perf_counter()
        result = mt.train(model, splits["train"], splits["val"], config, progress=False)
        train_total = time.perf_counter() - t0
    finally:
        mt._train_epoch, mt.make_step, mt.predict = original

    for d in splits.values():  # warm-up (the eval step is compiled for batches of 256 already; kept for safety)
        mt.predict(model, d)
    predict_s = []  # one pass over every row of the view, split by split (no concatenated copy of the weights)
    for _ in range(PREDICT_REPEATS):
        t0 = time.perf_counter()
        n_pred = sum(len(mt.predict(model, d)) for d in splits.values())
        predict_s.append(time.perf_counter() - t0)
    n_view = sum(len(d) for d in splits.values())
    assert n_pred == n_view

    n_train = len(splits["train"])
    steps = -(-n_train // batch_size)
    steady, steady_val = epoch_s[1:], val_s[1:]
    return {
        "model": kind, "devices": jax.device_count(), "shard_rows": list(result.shard_rows), "platform": jax.devices()[0].platform,
        "class": type(model).__name__, "arch": arch, "params": n_params, "batch": batch_size, "epochs": len(epoch_s),
        "train_rows": n_train, "val_rows": len(splits["val"]), "view_rows": n_view, "steps_per_epoch": steps,
        "compile_s": step_s[0] - statistics.median(step_s[1:]), "first_step_s": step_s[0],
        "median_step_s": statistics.median(step_s[1:]),
        "first_epoch_s": epoch_s[0], "steady_epoch_s": statistics.median(steady),
        "train_nets_per_s": n_train * len(steady) / sum(steady),
        "train_nets_per_s_best_epoch": n_train / min(steady),
        "train_nets_per_cpu_s": n_train * len(steady) / sum(epoch_cpu_s[1:]),
        "train_nets_per_s_incl_val": n_train * len(steady) / (sum(steady) + sum(steady_val)),
        "predict_nets_per_s": n_view / statistics.median(predict_s),
        "epoch_s": [round(t, 4) for t in epoch_s], "epoch_cpu_s": [round(t, 4) for t in epoch_cpu_s],
        "val_predict_s": [round(t, 4) for t in val_s], "predict_s": [round(t, 4) for t in predict_s],
        "train_total_s": train_total, "best_epoch": result.best_epoch, "best_val_tau": result.best_value,
        "rss_after_data_mb": rss_data, "peak_rss_mb": _rss_mb(), "child_s": time.perf_counter() - t_start,
    }


# ----- parent ---------------------------------------------------------------------------------------------------
def run_child(kind: str, devices: int, zoo_dir: Path, args: argparse.Namespace) -> dict:
    """Run :func:`child` in a fresh interpreter (``devices`` > 1: forced host devices) and read its JSON."""
    env = dict(os.environ)
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    cmd = [sys.executable, __file__, "--child", kind, "--zoo", str(zoo_dir), "--batch-size", str(args.batch_size),
           "--epochs", str(args.epochs), "--hidden", str(args.hidden), "--depth", str(args.depth),
           "--head-hidden", str(args.head_hidden), *(["--final"] if args.final else [])]
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    load_after = os.getloadavg()[0]
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        print(f"{kind} ({devices} devices) failed with exit code {proc.returncode}:\n  " + "\n  ".join(tail), file=sys.stderr)
        return {"model": kind, "devices": devices, "error": "\n".join(tail), "load_1min": load_before}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if row["devices"] != devices:
        print(f"warning: {kind} asked for {devices} devices, JAX saw {row['devices']}", file=sys.stderr)
    return {**row, "process_s": wall, "load_1min": load_before, "load_1min_after": load_after}


def make_small_zoo(out: Path, n_models: int) -> float:
    """A ReLU 64-32-32-10 digits zoo of ``n_models`` short runs (1 or 2 epochs); returns the seconds it took."""
    from symm.zoo import SearchSpace, ZooPlan, make_zoo

    space = SearchSpace(widths=(32,), depths=(2,), activations=("relu",), epochs=(1, 2))
    start = time.perf_counter()
    make_zoo(out, ZooPlan("mlp", "digits", n_models, space=space), progress=False)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per model (>= 2: epoch 0 compiles, the rest are steady state)")
    ap.add_argument("--zoo", type=Path, help="existing zoo folder (only read); default: generate a small one")
    ap.add_argument("--n-models", type=int, default=200, help="runs of the generated zoo (without --zoo)")
    ap.add_argument("--final", action="store_true", help="only the last checkpoint of every run (default: every checkpoint)")
    ap.add_argument("--hidden", type=int, default=16, help="equivariant/quasi channels (default 16, as symm metanet train)")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--head-hidden", type=int, default=64)
    ap.add_argument("--no-two-devices", action="store_true", help="skip the 2-forced-host-device equivariant row")
    ap.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.epochs < 2 or args.batch_size < 1 or args.n_models < 10:
        ap.error("--epochs must be at least 2, --batch-size positive and --n-models at least 10")
    if args.child:
        print(json.dumps(child(args.child, args.zoo, args.final, args.batch_size, args.epochs, args.hidden, args.depth,
                               args.head_hidden)))
        return

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    tmp = None
    try:
        if args.zoo is None:
            tmp = Path(tempfile.mkdtemp(prefix="bench_metanet-"))
            zoo_dir = tmp / "zoo"
            gen_s = make_small_zoo(zoo_dir, args.n_models)
            zoo_info = {"generated": True, "n_models": args.n_models, "seconds": round(gen_s, 1),
                        "space": "mlp digits, width 32, depth 2, relu, 1-2 epochs"}
            print(f"generated a {args.n_models}-run zoo in {gen_s:.1f} s", flush=True)
        else:
            zoo_dir = args.zoo
            zoo_info = {"generated": False, "path": str(args.zoo.resolve())}
        jobs = [(m, 1) for m in args.models]
        if TWO_DEVICES in args.models and not args.no_two_devices and args.batch_size % 2 == 0:
            jobs.append((TWO_DEVICES, 2))
        rows = []
        for kind, devices in jobs:
            rows.append(run_child(kind, devices, zoo_dir, args))
            print(table([display(rows[-1])], COLUMNS), flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    total = time.perf_counter() - t0
    load_end = os.getloadavg()
    ok = [r for r in rows if "error" not in r]
    if ok:
        r = ok[0]
        print(f"\nview: {r['arch']}, {'final checkpoints' if args.final else 'every checkpoint'}, {r['view_rows']} networks "
              f"({r['train_rows']} train, {r['steps_per_epoch']} steps of {args.batch_size} per epoch); {args.epochs} epochs; "
              f"{os.cpu_count()} CPUs; load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end; total {total:.0f} s")
    print(table([display(r) for r in rows], COLUMNS))
    write_json("bench_metanet", {
        "zoo": zoo_info, "final_only": args.final, "fractions": list(FRACTIONS), "seed": SEED, "epochs": args.epochs,
        "batch_size": args.batch_size, "hidden": args.hidden, "depth": args.depth, "head_hidden": args.head_hidden,
        "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "load_average": {"start": list(load_start), "end": list(load_end)}, "total_s": round(total, 1),
        "method": METHOD,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
