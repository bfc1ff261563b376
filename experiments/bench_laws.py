"""Benchmark: LawTracker overhead per training step on a ~1M-parameter transformer (RoPE, GQA, SwiGLU), every=1 and
every=10, plain SGD in float64 (the exact check) and float32 (typical training). Goal: <= 10% overhead at every=1.

The machine may be shared, so the measurement is paired: an untracked and a tracked copy of the model train on the
same batches, their steps interleaved (alternating which goes first), each step timed on its own, and each pair of
steps (run back to back, under one load) gives a ratio tracked / untracked. Per run, the overhead is estimated from
median ratios (robust to a step preempted by another process): every=1, median ratio - 1; every=N,
((N - 1) median ratio of the steps the tracker skips + median ratio of the tracked steps) / N - 1. Each configuration
(every=1; every=1 with two Gram passes per step, ``one_pass=False``; every=10; no tracker on either copy, the noise
floor) runs ``--repeats`` times; reported: the untracked step time (median), min and median overhead over the runs,
and the load average. Prints a table, writes experiments/results/bench_laws.json.

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
TRACKED = {"every=1": (1, True), "every=1, two passes": (1, False), "every=10": (10, True), "none (A/A control)": (None, True)}
WARMUP = 3


def _step(model: nn.Module, opt: torch.optim.Optimizer, w: torch.Tensor) -> float:
    t0 = time.perf_counter()
    logits = model(w[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return time.perf_counter() - t0


def _paired(dtype: torch.dtype, every: int | None, one_pass: bool, steps: int) -> dict:
    """One run: untracked and tracked training interleaved step by step; the overhead estimate. ``every=None``: the
    second copy is untracked too (the noise floor of the estimate)."""
    runs = []
    for tracked in (False, True):
        torch.manual_seed(0)
        model = build_model(CONFIG).to(dtype).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        tracker = LawTracker(model, spec_for(model), opt, every=every, one_pass=one_pass) if tracked and every else None
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
    if tracker is not None:
        tracker.close()
        assert len(tracker.records) == (WARMUP + steps) // every
    every = every or 1
    base, tracked_times = times
    ratio = [b / a for a, b in zip(base, tracked_times)]  # the two steps of a pair ran back to back, under one load
    hit = [ratio[j] for j in range(steps) if (WARMUP + j + 1) % every == 0]
    miss = [ratio[j] for j in range(steps) if (WARMUP + j + 1) % every != 0]
    per_step = statistics.median(hit) if every == 1 else ((every - 1) * statistics.median(miss) + statistics.median(hit)) / every
    return {"step": statistics.median(base), "overhead": per_step - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.steps < 10 or args.repeats < 1:
        parser.error("--steps must be at least 10 (every=10 needs a tracked step) and --repeats at least 1")
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
        "cpus": os.cpu_count(), "steps": args.steps, "repeats": args.repeats, "method": "paired, interleaved steps; median per-pair time ratio per run",
        "load_average_1min": {"before": load_before[0], "after": load_after[0]}, "rows": rows,
    })


if __name__ == "__main__":
    main()
