"""Benchmark: symm weight matching vs the `rebasin` package vs a plain classic (Git Re-Basin) weight matching.

Recipe (../shared/notes/peers.md): ReLU MLPs 64-w-w-w-10 (``nn.Sequential``) on scikit-learn digits (inputs / 16,
``train_test_split(test_size=0.3, random_state=0)``), SGD lr 0.05 momentum 0.9, batch 64, 40 epochs, seeds 0 and 1.
For each width and method: matching time (state dicts in memory -> aligned B; not training or loading), sweeps,
naive and aligned test cross-entropy barriers (25 points), and a check that aligned B computes B's function.

`rebasin==0.0.47` is pip-installed at run time into a temporary folder (never a project dependency); if that fails
it is reported as unavailable. Trained checkpoints are cached in experiments/results/bench_ckpt/ (git-ignored by a
``.gitignore`` inside it). One timed run per method and width: compare only numbers from the same run.

Usage: .venv/bin/python experiments/bench_vs_peers.py [--widths 128 512 1024 2048] [--epochs 40] [--quick]
Writes experiments/results/bench_vs_peers.json (``--quick``: bench_vs_peers_quick.json).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import classic_weight_matching as classic
from _common import RESULTS, quiet_logs, table, write_json

Params = Mapping[str, torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

CKPT = RESULTS / "bench_ckpt"
WIDTHS = (128, 512, 1024, 2048)
N_POINTS = 25
FUNCTION_RTOL = 1e-5
REBASIN_PINS = ("rebasin==0.0.47", "torchview==0.2.7", "graphviz==0.21")
RECIPE = {"lr": 0.05, "momentum": 0.9, "batch_size": 64, "test_size": 0.3, "split_random_state": 0, "seeds": [0, 1]}


def load_data() -> Data:
    """Digits per the recipe: pixels / 16, unstratified 70/30 split with random_state 0."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data / 16.0, d.target, test_size=RECIPE["test_size"], random_state=RECIPE["split_random_state"])
    f32, i64 = (lambda a: torch.tensor(a, dtype=torch.float32)), (lambda a: torch.tensor(a, dtype=torch.int64))
    return f32(x_tr), i64(y_tr), f32(x_te), i64(y_te)


def build(width: int) -> nn.Sequential:
    """64-w-w-w-10 ReLU MLP."""
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))


def train(width: int, seed: int, epochs: int, data: Data) -> dict[str, torch.Tensor]:
    """Train one MLP by the recipe; returns its state dict."""
    x, y = data[0], data[1]
    torch.manual_seed(seed)
    model = build(width)
    opt = torch.optim.SGD(model.parameters(), lr=RECIPE["lr"], momentum=RECIPE["momentum"])
    gen = torch.Generator().manual_seed(seed)
    bs = RECIPE["batch_size"]
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), bs):
            idx = order[start : start + bs]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trained(width: int, seed: int, epochs: int, data: Data) -> tuple[dict[str, torch.Tensor], float | None, bool]:
    """Cached checkpoint (or train and cache it); then the training seconds (as measured when trained) and whether cached."""
    CKPT.mkdir(parents=True, exist_ok=True)
    ignore = CKPT / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# trained checkpoints of bench_vs_peers.py: a cache, never committed\n*\n")
    path = CKPT / f"digits_mlp3_w{width}_e{epochs}_s{seed}.pt"
    meta = path.with_suffix(".json")
    if path.exists():
        train_s = json.loads(meta.read_text()).get("train_s") if meta.exists() else None
        return torch.load(path, weights_only=True), train_s, True
    t0 = time.perf_counter()
    sd = train(width, seed, epochs, data)
    seconds = time.perf_counter() - t0
    tmp = path.with_suffix(".pt.tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    meta.write_text(json.dumps({"train_s": seconds, "torch_threads": torch.get_num_threads()}) + "\n")
    return sd, seconds, False


def evaluator(width: int, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[Params], tuple[float, float]], Callable[[Params], torch.Tensor]]:
    """``evaluate(params) -> (test cross-entropy, accuracy)`` and ``logits(params)`` in float64."""
    model = build(width).eval()

    @torch.no_grad()
    def evaluate(params: Params) -> tuple[float, float]:
        out = torch.func.functional_call(model, dict(params), (x.to(next(iter(params.values())).dtype),))
        return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())

    model64 = build(width).double().eval()

    @torch.no_grad()
    def logits64(params: Params) -> torch.Tensor:
        return torch.func.functional_call(model64, {k: v.double() for k, v in params.items()}, (x.double(),))

    return evaluate, logits64


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|out - ref| / max|ref|`` (the definition used by symm.testing)."""
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def barrier_curve(evaluate: Callable[[Params], tuple[float, float]], a: Params, b: Params, n_points: int = N_POINTS) -> dict:
    """Loss/accuracy along (1-t) A + t B at ``n_points`` evenly spaced t, and the barriers (as in aligners.barrier).

    Loss barrier: max_t L(t) - [(1-t) L(A) + t L(B)]; accuracy barrier: max_t [(1-t) acc(A) + t acc(B)] - acc(t).
    Kept local so the peers still run while symm's aligners package is being edited.
    """
    alphas = [i / (n_points - 1) for i in range(n_points)]
    loss, acc = zip(*(evaluate({k: torch.lerp(a[k], b[k], t) for k in a}) for t in alphas))
    return {
        "alphas": alphas,
        "loss": list(loss),
        "accuracy": list(acc),
        "loss_barrier": max(l - ((1 - t) * loss[0] + t * loss[-1]) for t, l in zip(alphas, loss)),
        "accuracy_barrier": max(((1 - t) * acc[0] + t * acc[-1]) - x for t, x in zip(alphas, acc)),
    }


# ---------------------------------------------------------------------------------------------- methods
# Each method: (A, B, width, batch) -> (aligned B, sweeps, extra timings). The caller times the whole call.


def run_symm(a: Params, b: Params, width: int, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, dict]:
    """symm: inferred ReLU-MLP spec (permutations x positive scalings), public weight_matching API."""
    from aligners import MatchInfo, weight_matching
    from symm.action import act
    from symm.adapters import infer_spec

    t0 = time.perf_counter()
    spec = infer_spec(a, activation="relu").spec
    info = MatchInfo()
    t1 = time.perf_counter()
    g = weight_matching(spec, a, b, progress=False, info=info)
    t2 = time.perf_counter()
    aligned = act(spec, b, g)
    t3 = time.perf_counter()
    return dict(aligned), info.sweeps, {"spec_s": t1 - t0, "weight_matching_s": t2 - t1, "act_s": t3 - t2}


def run_classic(a: Params, b: Params, width: int, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, dict]:
    """Plain Git Re-Basin weight matching (experiments/classic_weight_matching.py), permutations only."""
    t0 = time.perf_counter()
    tab = classic.sequential_mlp_table(a)
    perms, sweeps = classic.weight_matching(tab, a, b, seed=0)
    t1 = time.perf_counter()
    aligned = classic.apply_permutations(tab, perms, b)
    t2 = time.perf_counter()
    return aligned, sweeps, {"weight_matching_s": t1 - t0, "apply_s": t2 - t1}


def run_rebasin(a: Params, b: Params, width: int, batch: torch.Tensor) -> tuple[dict[str, torch.Tensor], int, dict]:
    """rebasin's PermutationCoordinateDescent (traces the models with ``batch``; permutes model B in place)."""
    from rebasin import PermutationCoordinateDescent

    model_a, model_b = build(width), build(width)
    model_a.load_state_dict(a)
    model_b.load_state_dict(b)
    torch.manual_seed(0)  # rebasin draws its label order from torch's global generator
    t0 = time.perf_counter()
    pcd = PermutationCoordinateDescent(model_a, model_b, batch)
    t1 = time.perf_counter()
    steps = [0]
    step = pcd._calculate_permutations_step  # count sweeps (calls of the private per-sweep method)

    def counted(*args, **kwargs):
        steps[0] += 1
        return step(*args, **kwargs)

    pcd._calculate_permutations_step = counted
    pcd.rebasin()
    t2 = time.perf_counter()
    a_after = model_a.state_dict()
    a_untouched = all(torch.equal(a[k], a_after[k]) for k in a)
    aligned = {k: v.detach().clone() for k, v in model_b.state_dict().items()}
    return aligned, steps[0], {"init_trace_s": t1 - t0, "rebasin_s": t2 - t1, "model_a_untouched": a_untouched}


METHODS: dict[str, Callable[..., tuple[dict[str, torch.Tensor], int, dict]]] = {
    "symm": run_symm,
    "rebasin 0.0.47": run_rebasin,
    "classic (ours)": run_classic,
}


def install_rebasin(folder: str) -> tuple[bool, str]:
    """pip install the pinned rebasin (no deps) into ``folder`` and import it; (available, version or reason)."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "--target", folder, *REBASIN_PINS]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"pip install failed: {e}"
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return False, f"pip install failed (exit {proc.returncode}): {last}"
    sys.path.insert(0, folder)
    try:
        import rebasin  # noqa: F401
        from rebasin import PermutationCoordinateDescent  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable"
        return False, f"import failed: {type(e).__name__}: {e}"
    return True, importlib.metadata.version("rebasin") if _has_dist("rebasin") else "0.0.47"


def _has_dist(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "scipy", "scikit-learn", "symm", "lapx", "rebasin", "torchview", "graphviz"):
        out[name] = importlib.metadata.version(name) if _has_dist(name) else "not installed"
    return out


def git_head() -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
        return r.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def warm_up(methods: dict[str, Callable], batch: torch.Tensor) -> None:
    """One untimed run of every method on tiny random MLPs (imports, first-call overheads)."""
    a, b = ({k: v.detach().clone() for k, v in (torch.manual_seed(s), build(16))[1].state_dict().items()} for s in (100, 101))
    for name, fn in methods.items():
        try:
            fn(a, b, 16, batch)
        except Exception:  # noqa: BLE001 - reported again in the timed run
            print(f"warm-up of {name} failed:\n{traceback.format_exc()}", flush=True)


def bench_width(width: int, epochs: int, data: Data, methods: dict[str, Callable], unavailable: dict[str, str]) -> tuple[dict, list[dict]]:
    """Train (or load) both seeds, then time and evaluate every method at one width."""
    x_tr, _, x_te, y_te = data
    (a, train_a, cached_a), (b, train_b, cached_b) = (trained(width, s, epochs, data) for s in RECIPE["seeds"])
    evaluate, logits64 = evaluator(width, x_te, y_te)
    loss_a, acc_a = evaluate(a)
    loss_b, acc_b = evaluate(b)
    naive = barrier_curve(evaluate, a, b)
    ref = logits64(b)
    batch = x_tr[:64]
    info = {"width": width, "loss_A": loss_a, "loss_B": loss_b, "acc_A": acc_a, "acc_B": acc_b, "train_s": [train_a, train_b], "checkpoints_cached": [cached_a, cached_b], "naive": naive}
    rows = []
    for name in METHODS:
        row: dict = {"width": width, "method": name, "naive_barrier": naive["loss_barrier"], "naive_acc_barrier": naive["accuracy_barrier"]}
        if name in unavailable:
            rows.append({**row, "status": f"unavailable: {unavailable[name]}"})
            continue
        gc.collect()
        try:
            t0 = time.perf_counter()
            aligned, sweeps, extra = methods[name](a, b, width, batch)
            seconds = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one failing method must not sink the benchmark
            print(f"{name} failed at width {width}:\n{traceback.format_exc()}", flush=True)
            rows.append({**row, "status": f"error: {type(e).__name__}: {e}"})
            continue
        aligned = {k: v.to(torch.float32) for k, v in aligned.items()}
        err = relative_error(logits64(aligned), ref)
        curve = barrier_curve(evaluate, a, aligned)
        dist = float(sum(((a[k] - aligned[k]) ** 2).sum() for k in a) ** 0.5 / sum((a[k] ** 2).sum() for k in a) ** 0.5)
        rows.append(
            {
                **row,
                "status": "ok",
                "match_s": seconds,
                "sweeps": sweeps,
                "aligned_barrier": curve["loss_barrier"],
                "aligned_acc_barrier": curve["accuracy_barrier"],
                "function_rel_err": err,
                "function_ok": err < FUNCTION_RTOL,
                "rel_dist_to_A": dist,
                "timings": extra,
                "aligned_curve": curve,
            }
        )
        print(f"  w={width} {name}: {seconds:.2f} s, {sweeps} sweeps, barrier {naive['loss_barrier']:.4f} -> {curve['loss_barrier']:.4f}, rel err {err:.1e}", flush=True)
    return info, rows


COLUMNS = ["width", "method", "match_s", "sweeps", "naive_barrier", "aligned_barrier", "function_check"]


def printable(row: dict) -> dict:
    if row["status"] != "ok":
        return {"width": row["width"], "method": row["method"], "match_s": "-", "sweeps": "-", "naive_barrier": row["naive_barrier"], "aligned_barrier": "-", "function_check": row["status"]}
    check = f"{'ok' if row['function_ok'] else 'FAIL'} ({row['function_rel_err']:.1e})"
    return {**{c: row.get(c) for c in COLUMNS[:-1]}, "function_check": check}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS), help="hidden widths (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke check: width 128 only, 3 epochs")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.epochs = [128], 3
    t_start = time.perf_counter()
    quiet_logs()
    torch.set_num_threads(2)
    load_start = os.getloadavg()
    data = load_data()
    unavailable: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="rebasin_") as folder:
        t0 = time.perf_counter()
        ok, rebasin_version = install_rebasin(folder)
        install_s = time.perf_counter() - t0
        print(f"rebasin: {'installed ' + rebasin_version if ok else 'UNAVAILABLE (' + rebasin_version + ')'} ({install_s:.1f} s)", flush=True)
        if not ok:
            unavailable["rebasin 0.0.47"] = rebasin_version
        methods = {k: v for k, v in METHODS.items() if k not in unavailable}
        warm_up(methods, data[0][:64])
        infos, rows = [], []
        for width in args.widths:
            print(f"width {width}", flush=True)
            info, width_rows = bench_width(width, args.epochs, data, methods, unavailable)
            infos.append(info)
            rows += width_rows
        machine = {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
            "versions": versions(),
        }
    print()
    print(table([printable(r) for r in rows], COLUMNS))
    wall = time.perf_counter() - t_start
    print(f"\nwhole script: {wall:.1f} s; load average start {load_start[0]:.2f}, end {machine['loadavg_end'][0]:.2f} (2 cores: timings are noisy)")
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_head": git_head(),
        "machine": machine,
        "recipe": {**RECIPE, "epochs": args.epochs, "widths": args.widths, "arch": "64-w-w-w-10 ReLU nn.Sequential", "data": "sklearn digits / 16", "barrier_points": N_POINTS},
        "rebasin": {"available": ok, "detail": rebasin_version, "install_s": install_s, "pins": list(REBASIN_PINS)},
        "notes": (
            "match_s: one timed run per method and width, from state dicts in memory to aligned B weights "
            "(symm: infer_spec + weight_matching + act; rebasin: PermutationCoordinateDescent init (tracing) + rebasin(); "
            "classic: table + weight_matching + apply). sweeps: symm MatchInfo.sweeps; rebasin and classic count every sweep "
            "including the final one that changes nothing. symm also fixes ReLU positive scalings (balanced point); "
            "rebasin and classic are permutation-only. function check: max|f_aligned - f_B| / max|f_B| on the test inputs "
            f"(float64 forward), ok if < {FUNCTION_RTOL:g}. Barriers: test cross-entropy, {N_POINTS} points. "
            "The machine is shared (other jobs running): compare only numbers from the same run."
        ),
        "models": infos,
        "rows": rows,
        "wall_s": wall,
    }
    write_json("bench_vs_peers_quick" if args.quick else "bench_vs_peers", payload)


if __name__ == "__main__":
    main()
