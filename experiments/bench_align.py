"""Benchmark: seconds per weight-matching sweep and peak memory, per linear-assignment backend (jv = ours, warm
started; scipy; lapx).

Cases: ReLU MLPs 64-w-w-10 for w in 512/1024/2048/4096 and one Llama-like block (d=1024, ffn=2816, 16 heads, 4 KV heads),
aligning two independent random initialisations. Each case runs in a fresh process so its peak RSS is its own.
Usage: .venv/bin/python experiments/bench_align.py [--quick]. Writes experiments/results/bench_align.json.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time

from _common import table, write_json


def _case(kind: str, size: int, backend: str, queue) -> None:
    import torch

    from aligners import MatchInfo, weight_matching
    from symm.evaluate import state_dict_of

    torch.set_num_threads(2)
    if kind == "mlp":
        from symm.models import MLP, MLPConfig, spec_for

        build = lambda s: (torch.manual_seed(s), MLP(MLPConfig((64, size, size, 10), "relu")))[1]  # noqa: E731
    else:
        from symm.models import TransformerConfig, TransformerLM, spec_for

        config = TransformerConfig(vocab_size=256, d_model=1024, n_layers=1, n_heads=16, n_kv_heads=4, pe="rope", ffn="swiglu", d_ff=2816, max_len=16)
        build = lambda s: (torch.manual_seed(s), TransformerLM(config))[1]  # noqa: E731
    a_model, b_model = build(0), build(1)
    spec = spec_for(a_model)
    a, b = state_dict_of(a_model), state_dict_of(b_model)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info = MatchInfo()
    t0 = time.perf_counter()
    weight_matching(spec, a, b, backend=backend, progress=False, info=info, max_sweeps=20)
    seconds = time.perf_counter() - t0
    queue.put(
        {
            "case": f"mlp w={size}" if kind == "mlp" else "llama block d=1024 (16 heads, 4 KV)",
            "backend": backend,
            "sweeps": info.sweeps,
            "seconds": seconds,
            "s_per_sweep": seconds / max(info.sweeps, 1),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": rss_before / 1024,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="only the two smallest MLPs")
    args = parser.parse_args()
    cases = [("mlp", w) for w in ((512, 1024) if args.quick else (512, 1024, 2048, 4096))]
    if not args.quick:
        cases.append(("llama", 1024))
    ctx = mp.get_context("spawn")
    rows = []
    for kind, size in cases:
        for backend in ("jv", "scipy", "lapx"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_case, args=(kind, size, backend, queue))
            proc.start()
            rows.append(queue.get())
            proc.join()
            print(table(rows[-1:], list(rows[-1])), flush=True)
    print(table(rows, ["case", "backend", "sweeps", "seconds", "s_per_sweep", "peak_rss_mb"]))
    write_json("bench_align", {"rows": rows, "note": "two random initialisations; max 20 sweeps; 2 CPU threads"})


if __name__ == "__main__":
    main()
