"""Benchmark: LawTracker overhead per training step on a ~1M-parameter transformer (RoPE, GQA, SwiGLU), every=1 and
every=10, plain SGD in float64 (the exact check) and float32 (typical training). Prints a table, writes
experiments/results/bench_laws.json. Goal: <= 10% overhead at every=1.

Usage: .venv/bin/python experiments/bench_laws.py [--steps 30]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from _common import table, write_json
from symm.law_tracker import LawTracker
from symm.laws import count_laws
from symm.models import TransformerConfig, build_model, spec_for

CONFIG = TransformerConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=8, n_kv_heads=4, pe="rope", ffn="swiglu", d_ff=352, max_len=64)


def _run(dtype: torch.dtype, every: int | None, steps: int) -> float:
    torch.manual_seed(0)
    model = build_model(CONFIG).to(dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = LawTracker(model, spec_for(model), opt, every=every) if every else None
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CONFIG.vocab_size, (16, 65), generator=gen) for _ in range(steps + 3)]
    for i, w in enumerate(batches):
        if i == 3:
            t0 = time.perf_counter()
        logits = model(w[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - t0) / steps
    if tracker:
        tracker.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model = build_model(CONFIG)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    for dtype in (torch.float32, torch.float64):
        base = _run(dtype, None, args.steps)
        for every in (1, 10):
            t = _run(dtype, every, args.steps)
            rows.append({"dtype": str(dtype).split(".")[-1], "every": every, "step_ms": 1e3 * base, "tracked_step_ms": 1e3 * t, "overhead_pct": 100 * (t / base - 1)})
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(f"model: {n_params} parameters, {count_laws(spec_for(model))} laws")
    print(table(rows, list(rows[0])))
    write_json("bench_laws", {"config": repr(CONFIG), "parameters": n_params, "laws": count_laws(spec_for(model)), "rows": rows})


if __name__ == "__main__":
    main()
