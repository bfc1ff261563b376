"""Transformer LMs with sinusoidal vs RoPE positional encoding, byte-level on the offline Shakespeare corpus:
barrier naive vs heads-only vs full (heads + within-head GL / RoPE rotation-scaling) weight matching.

Models: our reference TransformerLM (sinusoidal, rope) and tiny HF XGLM (sinusoidal) / Llama (RoPE, GQA) built
from configs. Usage: .venv/bin/python experiments/lm_pe.py [--steps 300]. Writes results/lm_pe.json and .png.
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
from symm.adapters import spec_from_hf
from symm.data import byte_tokens
from symm.evaluate import state_dict_of
from symm.models import TransformerConfig, TransformerLM, spec_for
from symm.train import train_lm

VOCAB, D, LAYERS, HEADS, FF, SEQ = 128, 64, 2, 4, 128, 64


def builders():
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig, XGLMConfig

    transformers.logging.set_verbosity_error()
    ours = lambda pe: (lambda: TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=D, n_layers=LAYERS, n_heads=HEADS, pe=pe, ffn="swiglu", d_ff=FF, max_len=SEQ)))  # noqa: E731
    llama = LlamaConfig(vocab_size=VOCAB, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=2, intermediate_size=FF, max_position_embeddings=SEQ)
    xglm = XGLMConfig(vocab_size=VOCAB, d_model=D, num_layers=LAYERS, attention_heads=HEADS, ffn_dim=FF, max_position_embeddings=SEQ, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return {
        "ours-sinusoidal": ("sinusoidal", ours("sinusoidal"), False),
        "ours-rope": ("rope", ours("rope"), False),
        "hf-xglm": ("sinusoidal", lambda: AutoModelForCausalLM.from_config(xglm), True),
        "hf-llama": ("rope", lambda: AutoModelForCausalLM.from_config(llama), True),
    }


def run(name: str, pe: str, build, hf: bool, tokens, steps: int) -> dict:
    models = []
    t0 = time.perf_counter()
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(train_lm(build(), tokens.train, steps=steps, seed=seed, progress=False))
    t_train = time.perf_counter() - t0
    a, b = (state_dict_of(m) for m in models)
    spec = spec_from_hf(models[0]) if hf else spec_for(models[0])
    task = lm_task(models[0], tokens, hf=hf)
    row = {"model": name, "pe": pe, "loss_A": task.evaluate(a)[0], "loss_B": task.evaluate(b)[0], "train_s": t_train}
    curves = {}
    for method, kwargs in (("heads-only", {"within_heads": False}), ("full", {})):
        g = weight_matching(spec, a, b, progress=False, **kwargs)
        rep = naive_vs_aligned(task.evaluate, a, b, act(spec, b, g), n_points=11, progress=False)
        row["barrier_naive"] = rep.naive.loss_barrier
        row[f"barrier_{method}"] = rep.aligned.loss_barrier
        curves["naive"], curves[method] = rep.naive.loss, rep.aligned.loss
    row["curves"] = curves
    return row


def plot(rows, path) -> None:
    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.5), squeeze=False)
    alphas = [i / 10 for i in range(11)]
    for ax, r in zip(axes[0], rows):
        for key, style in (("naive", "r--"), ("heads-only", "m-."), ("full", "b-")):
            ax.plot(alphas, r["curves"][key], style, marker="o", markersize=3, label=f"{key} ({r['barrier_' + key]:.3f})")
        ax.set_title(f"{r['model']} ({r['pe']})")
        ax.set_xlabel("alpha")
        ax.set_ylabel("test loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", nargs="+", default=None)
    args = parser.parse_args()
    quiet_logs()
    tokens = byte_tokens(vocab_size=VOCAB, seq_len=SEQ, n_train=4096, n_test=128)
    rows = []
    for name, (pe, build, hf) in builders().items():
        if args.models and name not in args.models:
            continue
        rows.append(run(name, pe, build, hf, tokens, args.steps))
        print(table(rows[-1:], [k for k in rows[-1] if k != "curves"]), flush=True)
    print(table(rows, ["model", "pe", "loss_A", "loss_B", "barrier_naive", "barrier_heads-only", "barrier_full"]))
    write_json("lm_pe", {"rows": rows, "steps": args.steps, "data": tokens.name, "sizes": dict(vocab=VOCAB, d=D, layers=LAYERS, heads=HEADS, ff=FF, seq=SEQ)})
    plot(rows, RESULTS / "lm_pe.png")


if __name__ == "__main__":
    main()
