"""MoE LMs (dense softmax, top-2 softmax, sigmoid gating), byte-level: barrier naive vs weight matching with
and without expert-order matching (without: experts stay in index order, units matched inside each pair).

Usage: .venv/bin/python experiments/moe_experts.py [--steps 300]. Writes results/moe_experts.json and .png.
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import RESULTS, quiet_logs, table, write_json
from aligners import naive_vs_aligned, weight_matching
from aligners.job import lm_task
from symm.action import act
from symm.data import byte_tokens
from symm.evaluate import state_dict_of
from symm.factors import Permutation
from symm.models import TransformerConfig, TransformerLM, spec_for
from symm.train import train_lm

VOCAB, SEQ = 128, 64


def run(gating: str, tokens, steps: int) -> dict:
    config = TransformerConfig(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, pe="rope", ffn="moe", gating=gating, top_k=2, n_experts=4, d_ff=64, max_len=SEQ)
    models = []
    t0 = time.perf_counter()
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(train_lm(TransformerLM(config), tokens.train, steps=steps, seed=seed, progress=False))
    a, b = (state_dict_of(m) for m in models)
    spec = spec_for(models[0])
    task = lm_task(models[0], tokens, hf=False)
    row = {"gating": gating, "loss_A": task.evaluate(a)[0], "loss_B": task.evaluate(b)[0], "train_s": time.perf_counter() - t0}
    experts = {n: spec.factors[n].identity() for n in spec.factors if n.endswith(".experts") and isinstance(spec.factors[n], Permutation)}
    curves = {}
    for method, kwargs in (("no-expert-order", {"fixed": experts}), ("expert-order", {})):
        g = weight_matching(spec, a, b, progress=False, **kwargs)
        rep = naive_vs_aligned(task.evaluate, a, b, act(spec, b, g), n_points=11, progress=False)
        row["barrier_naive"] = rep.naive.loss_barrier
        row[f"barrier_{method}"] = rep.aligned.loss_barrier
        if method == "expert-order":
            row["experts_moved"] = sum(int(not spec.factors[n].is_identity(g.values[n])) for n in experts)
        curves["naive"], curves[method] = rep.naive.loss, rep.aligned.loss
    row["curves"] = curves
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    quiet_logs()
    tokens = byte_tokens(vocab_size=VOCAB, seq_len=SEQ, n_train=4096, n_test=128)
    rows = []
    for gating in ("dense", "topk", "sigmoid"):
        rows.append(run(gating, tokens, args.steps))
        print(table(rows[-1:], [k for k in rows[-1] if k != "curves"]), flush=True)
    print(table(rows, ["gating", "loss_A", "loss_B", "barrier_naive", "barrier_no-expert-order", "barrier_expert-order", "experts_moved"]))
    write_json("moe_experts", {"rows": rows, "steps": args.steps, "data": tokens.name})
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5), squeeze=False)
    alphas = [i / 10 for i in range(11)]
    for ax, r in zip(axes[0], rows):
        for key, style in (("naive", "r--"), ("no-expert-order", "m-."), ("expert-order", "b-")):
            ax.plot(alphas, r["curves"][key], style, marker="o", markersize=3, label=f"{key} ({r['barrier_' + key]:.3f})")
        ax.set_title(f"MoE, {r['gating']} gating")
        ax.set_xlabel("alpha")
        ax.set_ylabel("test loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "moe_experts.png", dpi=110)
    print(f"wrote {RESULTS / 'moe_experts.png'}")


if __name__ == "__main__":
    main()
