"""Benchmark: LawTracker overhead per training step on a ~1M-parameter transformer (RoPE, GQA, SwiGLU), every=1 and
every=10, plain SGD in float64 (the exact check) and float32 (typical training). Goal: <= 10% overhead at every=1.

The machine may be shared, so the measurement is paired: an untracked and a tracked copy of the model train on the
same batches, their steps interleaved (alternating which goes first), each step timed on its own. Per run, the
overhead is estimated from medians (robust to a step preempted by another process): every=1, median tracked step /
median untracked step - 1; every=N, ((N - 1) median untracked-by-the-tracker step + median tracked step) / (N median
untracked step) - 1. Each configuration (every=1; every=1 with two Gram passes per step, ``one_pass=False``; every=10)
runs ``--repeats`` times; reported: min and median over the runs, and the load average. Prints a table, writes
experiments/results/bench_laws.json.

Usage: .venv/bin/python experiments/bench_laws.py [--steps 40] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

from _common import table, write_json
from symm.law_tracker import LawTracker
from symm.laws import count_laws
from symm.models import TransformerConfig, build_model, spec_for

CONFIG = TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=8, n_kv_heads=4, pe="rope", ffn="swiglu", d_ff=352, max_len=64)
TRACKED = {"every=1": (1, True), "every=1, two passes": (1, False), "every=10": (10, True)}
WARMUP = 3


def _step(model: nn.Module, opt: torch.optim.Optimizer, w: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits = model(w[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def _paired(dtype: torch.dtype, every: int, one_pass: bool, steps: int) -> dict:
    """One run: untracked and tracked training interleaved step by step; per-step times and the overhead estimate."""
    runs = []
    for tracked in (False, True):
        torch.manual_seed(0)
        model = build_model(CONFIG).to(dtype).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tracker = LawTracker(model, spec_for(model), opt, every=every, one_pass=one_pass) if tracked else None
        runs.append((model, opt, tracker))
    gen = torch.Generator().manual_seed(1)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(WARMUP + steps):
        w = torch.randint(0, CONFIG.vocab_size, (16, 65), generator=gen)
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for r in order:
            t = _step(runs[r][0], runs[r][1], w)
            if i >= WARMUP:
                times[r].append(t)
    tracker = runs[1][2]
    tracker.close()
    assert len(tracker.records) == (WARMUP + steps) // every
    base, tracked_times = times
    hit = [tracked_times[j] for j in range(steps) if (WARMUP + j + 1) % every == 0]
    miss = [tracked_times[j] for j in range(steps) if (WARMUP + j + 1) % every != 0]
    base_med = statistics.median(base)
    per_step = statistics.median(hit) if every == 1 else ((every - 1) * statistics.median(miss) + statistics.median(hit)) / every
    return {"step": base_med, "tracked_step": per_step, "overhead": per_step / base_med - 1, "tracked_step_only": statistics.median(hit)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    load_before = os.getloadavg()
    rows = []
    for dtype in (torch.float32, torch.float64):
        for name, (every, one_pass) in TRACKED.items():
            runs = [_paired(dtype, every, one_pass, args.steps) for _ in range(args.repeats)]
            overheads = sorted(100 * r["overhead"] for r in runs)
            rows.append({
                "dtype": str(dtype).split(".")[-1], "tracker": name, "every": every, "one_pass": one_pass,
                "step_ms_median": 1e3 * statistics.median(r["step"] for r in runs),
                "tracked_step_ms_median": 1e3 * statistics.median(r["tracked_step"] for r in runs),
                "overhead_pct_min": overheads[0], "overhead_pct_median": statistics.median(overheads),
                "overhead_pct_runs": [round(o, 2) for o in overheads],
                "load_average_1min": round(os.getloadavg()[0], 2),
            })
            print(table(rows[-1:], list(rows[-1])), flush=True)
    load_after = os.getloadavg()
    print(f"model: {n_params} parameters, {count_laws(spec_for(model))} laws; {args.threads} threads, {os.cpu_count()} CPUs; "
          f"{args.repeats} runs of {args.steps} steps each; load average before {load_before[0]:.2f}, after {load_after[0]:.2f}")
    print(table(rows, list(rows[0])))
    write_json("bench_laws", {
        "config": repr(CONFIG), "parameters": n_params, "laws": count_laws(spec_for(model)), "threads": args.threads,
        "cpus": os.cpu_count(), "steps": args.steps, "repeats": args.repeats, "method": "paired, interleaved steps; medians per run",
        "load_average_1min": {"before": load_before[0], "after": load_after[0]}, "rows": rows,
    })


if __name__ == "__main__":
    main()
