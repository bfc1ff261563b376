"""Print the README's experiment tables from experiments/results/*.json (so the README quotes measured numbers);
write the README's combined LM figure, results/lm_lmc_bpe2048.png."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


LM_SETTINGS = ("permutation", "signed", "orthogonal", "activations", "learned", "learned-generated")


def lm_lmc_table(files: list[str]) -> None:
    """One row per family and pair of experiments/lm_lmc.py results: loss barrier (aligned / naive) per setting."""
    print("| family | pair | naive | permutation | signed | orthogonal (data-free) | activations | learned | learned, generated windows |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in files:
        rows = json.loads((RESULTS / name).read_text())["rows"]
        for family, pair in dict.fromkeys((r["family"], r["pair"]) for r in rows):
            by = {r["setting"]: r for r in rows if r["family"] == family and r["pair"] == pair}
            cells = []
            for setting in LM_SETTINGS:
                r = by.get(setting)
                untied = by.get(f"untied-{setting}")
                if untied is not None and untied["status"] == "ok":  # tied: after `symm untie`
                    tied = f"; tied {r['ratio']:.2f}" if r is not None and r["status"] == "ok" else ""
                    cells.append(f"{untied['aligned']:.3f} ({untied['ratio']:.2f}), untied copies{tied}")
                    continue
                if r is None:
                    cells.append("–")
                elif r["status"] != "ok":
                    cells.append(r["status"] + (" (tied)" if setting == "orthogonal" and "tied" in r.get("message", "") else ""))
                else:
                    cells.append(f"{r['aligned']:.3f} ({r['ratio']:.2f})")
            label = "gpt2 (tied)" if family == "gpt2" else family
            print(f"| {label} | {pair} | {by['naive']['naive']:.3f} | " + " | ".join(cells) + " |")


def lm_lmc_plot(files: list[str], out: Path) -> None:
    """One figure of several experiments/lm_lmc.py results (bars: mean aligned / naive per family and setting)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import lm_lmc

    payloads = [json.loads((RESULTS / name).read_text()) for name in files]
    rows = [r for d in payloads for r in d["rows"]]
    families = [f for d in payloads for f in d["families"]]
    lm_lmc.plot(rows, families, out)


def main() -> None:
    families = ("gpt2_untied", "llama", "mixtral", "gpt2")
    lm_lmc_table([f"lm_lmc_bpe2048_{f}.json" for f in families])  # the cosine recipe (default)
    lm_lmc_plot([f"lm_lmc_bpe2048_{f}.json" for f in families], RESULTS / "lm_lmc_bpe2048.png")
    print()
    lm_lmc_table([f"lm_lmc_bpe2048_constant_{f}.json" for f in families])  # --recipe constant
    print()
    r = json.loads((RESULTS / "mlp_width.json").read_text())["rows"]
    print("| data | width | test acc A / B | loss barrier: naive | weights | activations | acc. barrier: naive | weights | activations |")
    print("|---|---|---|---|---|---|---|---|---|")
    for x in r:
        print(
            f"| {x['dataset']} | {x['width']} | {x['acc_A']:.3f} / {x['acc_B']:.3f} | {x['loss_naive']:.3f} | {x['loss_weights']:.3f} | "
            f"{x['loss_activations']:.3f} | {x['acc_naive']:.3f} | {x['acc_weights']:.3f} | {x['acc_activations']:.3f} |"
        )
    print()
    r = json.loads((RESULTS / "lm_pe.json").read_text())
    print("| model | PE | test loss A / B | loss barrier: naive | heads only | heads + within-head |")
    print("|---|---|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['model']} | {x['pe']} | {x['loss_A']:.3f} / {x['loss_B']:.3f} | {x['barrier_naive']:.3f} | {x['barrier_heads-only']:.3f} | {x['barrier_full']:.3f} |")
    print()
    r = json.loads((RESULTS / "moe_experts.json").read_text())
    print("| gating | test loss A / B | loss barrier: naive | without expert order | with expert order |")
    print("|---|---|---|---|---|")
    for x in r["rows"]:
        print(f"| {x['gating']} | {x['loss_A']:.3f} / {x['loss_B']:.3f} | {x['barrier_naive']:.3f} | {x['barrier_no-expert-order']:.3f} | {x['barrier_expert-order']:.3f} |")
    print()
    r = json.loads((RESULTS / "bench_align.json").read_text())["rows"]
    print("| case | backend | sweeps | seconds | s / sweep | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for x in r:
        print(f"| {x['case']} | {x['backend']} | {x['sweeps']} | {x['seconds']:.2f} | {x['s_per_sweep']:.3f} | {x['peak_rss_mb']:.0f} |")
    print()
    r = json.loads((RESULTS / "bench_vs_peers.json").read_text())["rows"]
    print("| width | method | matching time (s) | sweeps | loss barrier: naive | aligned | aligned B = B's function |")
    print("|---|---|---|---|---|---|---|")
    for x in r:
        print(f"| {x['width']} | {x['method']} | {x['match_s']:.3f} | {x['sweeps']} | {x['naive_barrier']:.3f} | {x['aligned_barrier']:.4f} | {'ok' if x['function_ok'] else 'NO'} ({x['function_rel_err']:.0e}) |")


if __name__ == "__main__":
    main()
