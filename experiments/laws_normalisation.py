"""Experiment: conservation laws under normalisation (issue 12).

Part 1, attention: sinusoidal PE vs RoPE vs per-head QK-norm (Qwen3 style, eps 0 and Qwen3's 1e-6), byte LM.
Laws per kind, worst SGD residual, Noether residual per law kind, and the would-be GL law Q^T Q - K^T K tracked as a
control under QK-norm. Part 2, MoE routers: softmax (dense), plain sigmoid, top-k sigmoid renormalised over the k,
sigmoid normalised over all experts (the seed's Theorem 4.7 claims a router law for it), also with small gates
(router bias -4 and -8). The candidate law is softmax's translation law, the sum of router rows (and biases): its
drift, SGD residual and Noether residual per router. Part 3, BatchNorm CNN (digits) in training mode: laws of the
eval and training specs, the per-channel filter-scale laws with torch's eps 1e-5 and with eps ~ 0, plain SGD with
and without weight decay. Part 4: Noether residual of the norm-scale laws vs the norm's eps.

All float64, plain SGD (lr 0.1) unless stated, 50 steps. Prints tables, writes results/laws_normalisation.json/.png.
Usage: .venv/bin/python experiments/laws_normalisation.py [--steps 50] [--replot]
"""

from __future__ import annotations

import argparse
import json
from functools import lru_cache

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

from _common import RESULTS, quiet_logs, table, write_json
from symm.data import byte_tokens, digits
from symm.law_tracker import LawTracker, control_report
from symm.laws import law_families, law_terms
from symm.models import CNNConfig, TransformerConfig, build_model, spec_for

LM = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)
ATTENTION = {
    "sinusoidal": TransformerConfig(**LM, pe="sinusoidal", ffn="swiglu"),
    "rope": TransformerConfig(**LM, pe="rope", ffn="swiglu"),
    "qknorm-rope eps=0": TransformerConfig(**LM, pe="rope", ffn="swiglu", qk_norm=True, qk_norm_eps=0.0),
    "qknorm-rope eps=1e-6": TransformerConfig(**LM, pe="rope", ffn="swiglu", qk_norm=True, qk_norm_eps=1e-6),
    "qknorm-none eps=0": TransformerConfig(**LM, pe="none", ffn="swiglu", qk_norm=True, qk_norm_eps=0.0),
}
MOE = dict(LM, pe="rope", ffn="moe", n_experts=4, top_k=2, d_ff=32, router_bias=True)
ROUTERS = {
    "softmax (dense)": (TransformerConfig(**MOE, gating="dense"), 0.0),
    "sigmoid (plain)": (TransformerConfig(**MOE, gating="sigmoid-raw"), 0.0),
    "sigmoid top-2 renormalised": (TransformerConfig(**MOE, gating="sigmoid"), 0.0),
    "normalised sigmoid": (TransformerConfig(**MOE, gating="normsigmoid"), 0.0),
    "normalised sigmoid, bias -4": (TransformerConfig(**MOE, gating="normsigmoid"), -4.0),
    "normalised sigmoid, bias -8": (TransformerConfig(**MOE, gating="normsigmoid"), -8.0),
}
TINY_EPS = 1e-300  # torch refuses eps = 0 for BatchNorm in training mode; this vanishes against any variance


@lru_cache(maxsize=4)
def _windows(vocab: int) -> torch.Tensor:
    return byte_tokens(vocab_size=vocab, seq_len=32, n_train=512, n_test=8).train


@lru_cache(maxsize=1)
def _digits():
    return digits()


def batches(config, steps: int, seed: int = 0):
    """``steps`` minibatches ``(inputs, loss_fn)``: byte windows for LMs, digits otherwise."""
    gen = torch.Generator().manual_seed(seed)
    if isinstance(config, TransformerConfig):
        windows = _windows(config.vocab_size)
        for _ in range(steps):
            w = windows[torch.randint(0, len(windows), (16,), generator=gen)]
            yield w[:, :-1], lambda out, w=w: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), w[:, 1:].reshape(-1))
        return
    split = _digits()
    x, y = split.x_train.double(), split.y_train
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        yield x[idx], lambda out, idx=idx: nn.functional.cross_entropy(out, y[idx])


def set_eps(model: nn.Module, eps: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = eps


def family_noether(spec, model, names) -> torch.Tensor:
    """Per law, |<grad h, g>| / (||grad h|| ||g||) on the current gradient (what the tracker reports as one max)."""
    state = model.state_dict(keep_vars=True)
    params = {k: v.detach().double() for k, v in state.items()}
    grads = {names[id(p)]: p.grad.detach().double() for p in model.parameters() if p.grad is not None}
    terms = law_terms(spec, params, grads)
    g_norm = sum(float(g.pow(2).sum()) for g in grads.values()) ** 0.5
    return terms.cross.abs() / (terms.grad_norm2.sqrt() * g_norm).clamp_min(1e-300)


def track(config, steps: int, lr: float = 0.1, wd: float = 0.0, bn_eps: float | None = None, router_bias: float | None = None) -> dict:
    """Train with plain SGD in float64 and return per law kind and per control: counts, residual, drift, Noether."""
    torch.manual_seed(0)
    model = build_model(config).double().train()
    if bn_eps is not None:
        set_eps(model, bn_eps)
    if router_bias is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("router.bias"):
                    p.fill_(router_bias)
    spec = spec_for(model, mode="train")
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd)
    tracker = LawTracker(model, spec, opt, controls=True)
    names = {id(p): n for n, p in model.named_parameters()}
    noether = torch.zeros(len(tracker.initial), dtype=torch.float64)
    for inputs, loss_fn in batches(config, steps):
        loss = loss_fn(model(inputs))
        opt.zero_grad()
        loss.backward()
        noether = torch.maximum(noether, family_noether(spec, model, names))
        opt.step()
    tracker.close()
    return summarise(tracker, noether, loss.item())


def summarise(tracker: LawTracker, noether: torch.Tensor, loss: float) -> dict:
    res, drift = tracker.residuals().abs().max(0).values, tracker.relative_drifts().abs().max(0).values
    kinds: dict[str, dict] = {}
    start = 0
    for fam in law_families(tracker.spec):
        sl = slice(start, start + fam.count)
        start += fam.count
        k = kinds.setdefault(fam.kind, {"laws": 0, "max_residual": 0.0, "max_drift": 0.0, "noether": 0.0, "verdicts": set()})
        k["laws"] += fam.count
        k["max_residual"] = max(k["max_residual"], float(res[sl].max()))
        k["max_drift"] = max(k["max_drift"], float(drift[sl].max()))
        k["noether"] = max(k["noether"], float(noether[sl].max()))
    for fam in tracker.report().families:
        kinds[fam["kind"]]["verdicts"].add(fam["verdict"])
    for k in kinds.values():
        k["verdicts"] = sorted(k["verdicts"])
    return {"n_laws": int(len(tracker.initial)), "kinds": kinds, "controls": control_report(tracker), "final_loss": loss}


def part1(steps: int) -> list[dict]:
    rows = []
    for name, config in ATTENTION.items():
        out = track(config, steps)
        qk_control = [c for c in out["controls"] if "under QK-norm" in c["control"] or "between RoPE pairs" in c["control"]]
        row = {
            "attention": name,
            "laws": out["n_laws"],
            "law kinds": ", ".join(f"{k} {v['laws']}" for k, v in out["kinds"].items()),
            "worst law residual": max(k["max_residual"] for k in out["kinds"].values()),
            "worst law Noether": max(k["noether"] for k in out["kinds"].values()),
            "norm-scale residual": out["kinds"].get("norm-scale", {}).get("max_residual"),
            "norm-scale Noether": out["kinds"].get("norm-scale", {}).get("noether"),
            "norm-scale verdicts": ", ".join(out["kinds"].get("norm-scale", {}).get("verdicts", [])) or "-",
            "QK control": qk_control[0]["control"].split(": ", 1)[1] if qk_control else "-",
            "QK control residual": max((c["max_residual"] for c in qk_control), default=None),
            "QK control Noether": max((c["noether"] for c in qk_control), default=None),
            "QK control verdict": ", ".join(sorted({c["verdict"] for c in qk_control})) or "-",
            "details": out,
        }
        rows.append(row)
    print(table(rows, [c for c in rows[0] if c != "details"]), flush=True)
    return rows


def part2(steps: int) -> list[dict]:
    rows = []
    for name, (config, bias) in ROUTERS.items():
        out = track(config, steps, router_bias=bias if bias else None)
        law = out["kinds"].get("translation")
        ctrl = [c for c in out["controls"] if "sum of router rows" in c["control"]]
        row = {
            "router": name,
            "row-sum law?": "law (translation)" if law else "control",
            "row-sum count": law["laws"] if law else sum(c["count"] for c in ctrl),
            "row-sum drift": law["max_drift"] if law else max(c["max_relative_drift"] for c in ctrl),
            "row-sum residual": law["max_residual"] if law else max(c["max_residual"] for c in ctrl),
            "row-sum Noether": law["noether"] if law else max(c["noether"] for c in ctrl),
            "verdict": ", ".join(law["verdicts"]) if law else ", ".join(sorted({c["verdict"] for c in ctrl})),
            "details": out,
        }
        rows.append(row)
    print(table(rows, [c for c in rows[0] if c != "details"]), flush=True)
    return rows


def part3(steps: int) -> list[dict]:
    rows = []
    for act in ("relu", "gelu"):
        config = CNNConfig(activation=act)
        for eps_name, eps in (("1e-5 (torch default)", None), ("~0", TINY_EPS)):
            for wd in (0.0, 0.01):
                out = track(config, steps, wd=wd, bn_eps=eps)
                ns = out["kinds"]["norm-scale"]
                rows.append(
                    {
                        "cnn": f"cnn-batchnorm {act}",
                        "bn eps": eps_name,
                        "wd": wd,
                        "eval laws": sum(f.count for f in law_families(spec_for(config))),
                        "train laws": out["n_laws"],
                        "norm-scale laws": ns["laws"],
                        "norm-scale drift": ns["max_drift"],
                        "norm-scale residual": ns["max_residual"],
                        "norm-scale Noether": ns["noether"],
                        "verdicts": ", ".join(ns["verdicts"]),
                        "other laws residual": max((k["max_residual"] for n, k in out["kinds"].items() if n != "norm-scale"), default=None),
                        "details": out,
                    }
                )
    print(table(rows, [c for c in rows[0] if c != "details"]), flush=True)
    return rows


def part4(steps: int) -> dict:
    out = {"qk-norm": {}, "batchnorm": {}}
    for eps in (0.0, 1e-8, 1e-6, 1e-4):
        config = TransformerConfig(**{**ATTENTION["qknorm-rope eps=0"].__dict__, "qk_norm_eps": eps})
        out["qk-norm"][eps] = track(config, steps)["kinds"]["norm-scale"]["noether"]
    for eps in (TINY_EPS, 1e-7, 1e-5, 1e-3):
        out["batchnorm"][eps] = track(CNNConfig(), steps, bn_eps=eps)["kinds"]["norm-scale"]["noether"]
    for what, vals in out.items():
        print(f"{what}: norm-scale Noether vs eps: " + ", ".join(f"{e:g}: {v:.2e}" for e, v in vals.items()), flush=True)
    return out


def plot(p1: list[dict], p2: list[dict], p4: dict, path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    floor = 1e-18
    ax = axes[0]
    xs = range(len(p1))
    ax.bar([x - 0.2 for x in xs], [max(r["worst law residual"], floor) for r in p1], 0.4, label="worst law residual")
    ax.bar([x + 0.2 for x in xs], [max(r["QK control residual"] or floor, floor) for r in p1], 0.4, label="Q/K control residual")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [r["attention"] for r in p1], rotation=20, fontsize=7)
    ax.set_title("attention: SGD residual, laws vs Q/K control")
    ax.legend(fontsize=7)
    ax = axes[1]
    xs = range(len(p2))
    ax.bar(xs, [max(r["row-sum Noether"], floor) for r in p2])
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [r["router"] for r in p2], rotation=20, fontsize=7)
    ax.set_title("MoE router: Noether residual of the row-sum direction")
    ax = axes[2]
    for what, vals in p4.items():
        es = [max(float(e), 1e-12) for e in vals]
        ax.loglog(es, [max(v, floor) for v in vals.values()], "o-", label=what)
    ax.set_xlabel("norm eps (0 and 1e-300 drawn at 1e-12)")
    ax.set_ylabel("worst Noether residual of the norm-scale laws")
    ax.set_title("norm-scale laws: Noether residual vs eps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the saved JSON without training")
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "laws_normalisation.json").read_text())
        plot(saved["attention"], saved["routers"], saved["eps_sweep"], RESULTS / "laws_normalisation.png")
        return
    quiet_logs()
    torch.set_num_threads(2)
    p1, p2, p3, p4 = part1(args.steps), part2(args.steps), part3(args.steps), part4(args.steps)
    sweep = {k: {str(e): v for e, v in d.items()} for k, d in p4.items()}
    write_json("laws_normalisation", {"steps": args.steps, "lr": 0.1, "attention": p1, "routers": p2, "batchnorm_cnn": p3, "eps_sweep": sweep})
    plot(p1, p2, p4, RESULTS / "laws_normalisation.png")
    print(f"wrote {RESULTS / 'laws_normalisation.png'}")


if __name__ == "__main__":
    main()
