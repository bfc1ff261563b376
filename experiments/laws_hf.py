"""Experiment: conservation laws of Hugging Face models trained by ``transformers.Trainer`` (LawTrackerCallback).

Tiny random-init (default HF init) Llama (GQA, RoPE, SwiGLU), GPT-2 (learned PE, GELU) and Mixtral (softmax top-2
router over SwiGLU experts), each trained by the ``Trainer`` on byte windows of the bundled Shakespeare plays with
plain SGD and with AdamW (weight decay 0), a linear schedule with warmup and global-norm clipping, on CPU with
nothing downloaded. float64 where the model's code allows it; Mixtral's grouped expert matmul refuses float64, so it
trains in float32 (laws are still computed in float64, but each float32 step rounds at ~1e-7 relative).
Prints a table, writes experiments/results/laws_hf.json and .png.

Usage: .venv/bin/python experiments/laws_hf.py [--steps 300] [--models llama,gpt2,mixtral]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from _common import RESULTS, quiet_logs, table, write_json  # noqa: E402
from symm.data import byte_tokens  # noqa: E402
from symm.laws_hf import LawTrackerCallback  # noqa: E402

VOCAB, SEQ, BATCH = 256, 64, 16
OPTIMIZERS = {"sgd": 0.5, "adamw_torch": 3e-3}  # Trainer optim name -> peak learning rate
MAX_GRAD_NORM = 1.0


def configs() -> dict:
    from transformers import GPT2Config, LlamaConfig, MixtralConfig

    llama = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, max_position_embeddings=SEQ, tie_word_embeddings=False)
    return {
        "llama-gqa": LlamaConfig(**llama),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=SEQ, bos_token_id=0, eos_token_id=0),
        "mixtral": MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **{**llama, "intermediate_size": 64}),
    }


class Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A default-initialised model in float64, or float32 if its forward refuses float64."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs()[name]).double().train()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.long))
        return model, "float64"
    except (RuntimeError, TypeError) as exc:
        print(f"{name}: float64 refused ({str(exc)[:70]}...): float32")
        return model.float(), "float32"


def run(name: str, optim: str, steps: int, windows: torch.Tensor) -> dict:
    from transformers import PrinterCallback, Trainer, TrainingArguments

    model, dtype = build(name)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, use_cpu=True, report_to=[], save_strategy="no", optim=optim, learning_rate=OPTIMIZERS[optim],
            lr_scheduler_type="linear", warmup_steps=max(1, steps // 10), max_grad_norm=MAX_GRAD_NORM, weight_decay=0.0,
            per_device_train_batch_size=BATCH, max_steps=steps, logging_steps=1, disable_tqdm=True, seed=0,
        )
        callback = LawTrackerCallback()
        start = time.perf_counter()
        trainer = Trainer(model=model, args=args, train_dataset=Windows(windows), callbacks=[callback])
        trainer.remove_callback(PrinterCallback)  # every step is logged (for the clipping count): do not print them
        trainer.train()
        seconds = time.perf_counter() - start
    norms = [e["grad_norm"] for e in trainer.state.log_history if e.get("grad_norm") is not None]
    tracker, report = callback.tracker, callback.report
    drift = torch.stack([r.drift for r in tracker.records]).sum(0)
    total = (drift / tracker.records[-1].scale).abs()
    fams = report["families"]
    return {
        "model": name,
        "optimizer": optim,
        "dtype": dtype,
        "laws": report["n_laws"],
        "steps": steps,
        "max_residual": max(f["max_residual"] for f in fams),
        "max_step_drift": max(f["max_relative_drift"] for f in fams),
        "total_drift": float(total.max()),
        "noether": max(f["noether"] for f in fams),
        "clipped_steps": sum(n > MAX_GRAD_NORM for n in norms),
        "max_grad_norm_before_clipping": report["max_grad_norm_before_clipping"],
        "final_loss": report["final_loss"],
        "verdicts": sorted({f["verdict"] for f in fams}),
        "families": fams,
        "seconds": seconds,
        "_curve": {
            "step": [r.step for r in tracker.records],
            "residual": tracker.residuals().abs().max(1).values.clamp_min(1e-20).tolist(),
            "drift": tracker.relative_drifts().abs().max(1).values.clamp_min(1e-20).tolist(),
        },
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for r in (r for r in runs if r["model"] == model):
            c = r["_curve"]
            opt = "SGD" if r["optimizer"] == "sgd" else "AdamW"
            ax.semilogy(c["step"], c["residual"], label=f"{opt}: |drift - SGD prediction|")
            if opt == "SGD":
                ax.semilogy(c["step"], c["drift"], "--", label="SGD: |drift| per step")
        dtype = next(r["dtype"] for r in runs if r["model"] == model)
        ax.set_title(f"{model} ({dtype})")
        ax.set_xlabel("Trainer step")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("worst over laws / ||touched||^2")
    fig.suptitle("Conservation laws under transformers.Trainer (clipped, linear warmup/decay)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--models", default="llama-gqa,gpt2,mixtral")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    quiet_logs()
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    windows = byte_tokens(vocab_size=VOCAB, seq_len=SEQ, n_train=args.steps * BATCH, n_test=8).train[:, :SEQ]
    runs = []
    for name in args.models.split(","):
        for optim in OPTIMIZERS:
            runs.append(run(name, optim, args.steps, windows))
            r = runs[-1]
            print(f"{name} / {optim}: {r['laws']} laws, residual {r['max_residual']:.2e}, step drift {r['max_step_drift']:.2e}, "
                  f"total drift {r['total_drift']:.2e}, Noether {r['noether']:.1e}, loss {r['final_loss']:.3f}, {r['seconds']:.0f} s", flush=True)
    rows = []
    for name in dict.fromkeys(r["model"] for r in runs):
        sgd = next(r for r in runs if r["model"] == name and r["optimizer"] == "sgd")
        adam = next(r for r in runs if r["model"] == name and r["optimizer"] != "sgd")
        rows.append({
            "model": name, "dtype": sgd["dtype"], "laws": sgd["laws"], "SGD residual": sgd["max_residual"],
            "SGD step drift": sgd["max_step_drift"], "AdamW step drift": adam["max_step_drift"],
            "AdamW total drift": adam["total_drift"], "Noether": max(sgd["noether"], adam["noether"]),
            "SGD verdicts": ", ".join(sgd["verdicts"]), "AdamW verdicts": ", ".join(adam["verdicts"]),
        })
    print(table(rows, list(rows[0])))
    plot(runs, RESULTS / "laws_hf.png")
    for r in runs:
        r.pop("_curve")
    write_json("laws_hf", {
        "steps": args.steps, "batch": BATCH, "seq_len": SEQ, "vocab": VOCAB, "lr": OPTIMIZERS, "max_grad_norm": MAX_GRAD_NORM,
        "lr_scheduler": "linear, warmup steps/10", "weight_decay": 0.0, "data": "byte windows of the bundled Shakespeare plays",
        "table": rows, "runs": runs,
    })


if __name__ == "__main__":
    main()
