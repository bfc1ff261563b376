"""Is data-free orthogonal matching limited by its solver or by its objective? (issue 16)

On the trained pairs of ``experiments/lm_lmc.py`` (read from its cache; train them with that script first), this
runs data-free weight matching with the orthogonal stream (:func:`aligners.orthogonal_stream.match_orthogonal`) in
several variants (the default; the first Procrustes fit on every stream tensor instead of the free ones; 40 outer
rounds; other matching seeds) and learned matching from the default start, and records for each the loss barrier of
the aligned path (the align job's evaluation) and the objective data-free matching minimises: the relative folded
weight distance ||g . O . fold(B) - fold(A)|| / ||fold(A)||.

If the learned solution sits farther from A in weights than the data-free one while its barrier is several times
lower, better data-free solvers of that distance cannot reach it: the distance is the wrong objective at this scale.

Usage: .venv/bin/python experiments/lm_lmc_objective.py [--families llama gpt2-untied mixtral] [--pair 0]
[--cache DIR] [--width 64] [--kv-heads 2] [--steps 2000] [--vocab 256] [--recipe cosine|constant] [--quick]. Writes results/lm_lmc_objective.json (or into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from _common import quiet_logs, table
from aligners.barrier import naive_vs_aligned
from aligners.job import cast, orthogonal_layout
from aligners.learned import learned_matching
from aligners.orthogonal_stream import OrthogonalMatch, match_orthogonal, relative_distance
from symm.folding import fold
from symm.io import atomic_write_text

import lm_lmc

#: data-free variants: name -> keyword arguments of :func:`match_orthogonal`
VARIANTS = {
    "default": {},
    "first fit on all tensors": {"first_fit": "all"},
    "40 rounds": {"max_outer": 40, "patience": 8, "min_gain": 1e-6},
    "seed 1": {"seed": 1},
    "seed 2": {"seed": 2},
}


def folded_distance(match: OrthogonalMatch, pa, pb) -> float:
    """||g . O . fold(B) - fold(A)|| / ||fold(A)|| in float64."""
    return relative_distance(match.folded(pb), fold({k: v.double() for k, v in pa.items()}, match.layout))


def run_family(family: str, pair: int, sizes: lm_lmc.Sizes, training: lm_lmc.Training, cache: Path, points: int,
               learn_steps: int = 1000) -> list[dict]:
    c = lm_lmc.cached_pair(family, pair, sizes, training, cache)
    a, b, spec, task, pa, pb, dtype = c.a, c.b, c.spec, c.task, c.pa, c.pb, c.dtype
    layout = orthogonal_layout(a, pa)
    rows: list[dict] = []

    def record(name: str, match: OrthogonalMatch, seconds: float, **extra) -> None:
        report = naive_vs_aligned(task.evaluate, pa, pb, cast(match(b.params), dtype), points, progress=False).to_dict()
        naive, aligned = report["naive"]["loss_barrier"], report["aligned"]["loss_barrier"]
        rows.append({"family": family, "pair": pair, "variant": name, "naive": naive, "aligned": aligned, "ratio": aligned / naive,
                     "folded_distance": folded_distance(match, pa, pb), "seconds": seconds, **extra})
        print(f"  {family} {name}: barrier {aligned:.4f} ({aligned / naive:.3f} of naive), folded distance "
              f"{rows[-1]['folded_distance']:.4f}", flush=True)

    start = None
    for name, kwargs in VARIANTS.items():
        t0 = time.perf_counter()
        match = match_orthogonal(spec, layout, pa, pb, **kwargs)
        record(name, match, time.perf_counter() - t0, rounds=match.rounds)
        start = start or match
    t0 = time.perf_counter()
    learned = learned_matching(spec, task.model, pa, pb, task.windows, init=start.g, layout=layout, O=start.O, steps=learn_steps)
    record("learned (from default)", OrthogonalMatch(spec, layout, learned.O, learned.g, start.gains), time.perf_counter() - t0,
           best_step=learned.best_step)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lm_lmc.add_cached_pair_args(p, ["llama", "gpt2-untied", "mixtral"])
    p.add_argument("--points", type=int, default=7)
    args = p.parse_args(argv)
    quiet_logs()
    torch.set_num_threads(1)
    sizes, training = lm_lmc.sizes_and_training(args.quick, args.width, args.vocab, args.steps, args.recipe, args.kv_heads)
    points, learn_steps = (3, 10) if args.quick else (args.points, 1000)
    rows = [r for family in args.families for r in run_family(family, args.pair, sizes, training, args.cache, points, learn_steps)]
    payload = {"rows": rows, "sizes": asdict(sizes), "training": asdict(training), "pair": args.pair}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = lm_lmc.results_suffix(sizes, args.recipe)
    path = atomic_write_text(args.out / f"lm_lmc_objective{suffix}.json", json.dumps(payload, indent=2) + "\n")
    print(table([{k: r[k] for k in ("family", "variant", "naive", "aligned", "ratio", "folded_distance")} for r in rows],
                ["family", "variant", "naive", "aligned", "ratio", "folded_distance"]))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
