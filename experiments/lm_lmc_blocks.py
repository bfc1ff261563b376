"""Where does the aligned midpoint lose? Block-wise interpolation and MLP unit correspondence (issue 16).

On a trained pair of ``experiments/lm_lmc.py`` (read from its cache; train it with that script first), for the
data-free alignment with the orthogonal stream (:func:`aligners.orthogonal_stream.match_orthogonal`) and the learned
one started from it (:func:`aligners.learned.learned_matching`):

- the excess loss of the midpoint, loss((A + aligned B) / 2) - (loss(A) + loss(B)) / 2, on the align job's
  held-out windows;
- per block (the catalogue's: each attention layer, each MLP / MoE layer, and each tensor only the residual stream
  acts on: embeddings, norms, LM head): the excess loss when **only** that block is interpolated (the rest kept at A), and when **all but** that
  block are;
- per MLP unit factor the activations can hook (the dense MLPs): the mean correlation (absolute for units with a
  sign flip: SwiGLU) of each unit of A with its best-correlated unit of B on the training windows, the share of units for which data-free weight matching and
  activation matching pick the same partner, and the midpoint's excess loss when the activation permutations are
  forced into the data-free alignment (same O; everything else re-matched by weight matching), for layer 0 alone
  and for every layer.

Usage: .venv/bin/python experiments/lm_lmc_blocks.py [--families llama mixtral] [--pair 0] [--cache DIR]
[--width 64] [--kv-heads 2] [--steps 2000] [--vocab 2048] [--recipe cosine|constant] [--quick]. Writes results/lm_lmc_blocks.json
(or into ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from _common import quiet_logs, table
from aligners.activation_matching import collect_activations, decide_from_activations
from aligners.job import cast, orthogonal_layout
from aligners.layerwise import blocks
from aligners.learned import learned_matching
from aligners.orthogonal_stream import OrthogonalMatch, match_orthogonal, stream_factors
from aligners.weight_matching import weight_matching
from symm.folding import act_orthogonal, fold
from symm.io import atomic_write_text

import lm_lmc

Params = Mapping[str, torch.Tensor]


def spec_blocks(spec, stream: list[str]) -> dict[str, str]:
    """parameter -> its block: the catalogue's components of parameters that share a factor other than the stream's
    (:func:`aligners.layerwise.blocks`: an attention layer, an MLP or MoE layer, or a tensor only the stream acts on,
    such as the embedding, a norm or the LM head), named by the dotted prefix its parameters share."""
    out: dict[str, str] = {}
    for group in blocks(spec, stream):
        parts = [p.split(".") for p in group]
        prefix = os.path.commonprefix(parts) if len(group) > 1 else parts[0][:-1]
        name = ".".join(prefix) or group[0]
        while name in out.values():  # two components under one prefix stay apart
            name += "'"
        out.update(dict.fromkeys(group, name))
    return out


def excess(evaluate: Callable[[Params], tuple[float, float]], params: Params, reference: float) -> float:
    return evaluate(params)[0] - reference


def block_losses(evaluate, pa: Params, aligned: Params, block: Mapping[str, str], reference: float) -> dict:
    """Midpoint excess loss, and per block with only that block interpolated / all but that block."""
    mid = {k: 0.5 * (pa[k] + aligned[k]) if torch.is_floating_point(pa[k]) else pa[k] for k in pa}
    out = {"midpoint": excess(evaluate, mid, reference), "blocks": {}}
    for blk in dict.fromkeys(block[k] for k in pa):  # in the spec's order
        only = {k: (mid[k] if block[k] == blk else pa[k]) for k in pa}
        all_but = {k: (pa[k] if block[k] == blk else mid[k]) for k in pa}
        out["blocks"][blk] = {"only": excess(evaluate, only, reference), "all_but": excess(evaluate, all_but, reference)}
    return out


def unit_correspondence(spec, task, layout, pa: Params, pb: Params, start: OrthogonalMatch, reference: float, dtype) -> dict:
    """Best-match activation correlation of MLP units, agreement of data-free and activation permutations, and the
    midpoint excess with the activation permutations forced into the data-free alignment."""
    stream = stream_factors(spec, layout)
    a_f, b_f = fold({k: v.double() for k, v in pa.items()}, layout), fold({k: v.double() for k, v in pb.items()}, layout)
    acts = collect_activations(spec, task.model, cast(a_f, dtype), cast(b_f, dtype), task.inputs, progress=False)
    given = {n: spec.factors[n].identity() for n in stream}
    by_acts = decide_from_activations(spec, acts, given)
    units = [n for n in acts.units if n not in stream]
    out: dict = {"factors": {}}
    for n in units:
        signed = any(f.parent == n and f.kind == "sign-flip" for f in spec.factors.values())
        c, w = (acts.units[n].abs() if signed else acts.units[n]), start.g.values[n]  # signed units: |corr|
        out["factors"][n] = {"best_match_correlation": float(c.max(1).values.mean()),
                             "agreement": float((w == by_acts[n]).double().mean()),
                             "correlation_weights": float(c[torch.arange(len(w)), w].mean()),
                             "correlation_activations": float(c[torch.arange(len(w)), by_acts[n]].mean())}
    rotated = act_orthogonal(b_f, layout, start.O)
    for label, names in (("layer 0", units[:1]), ("every layer", units)):
        if not names:
            continue
        g = weight_matching(spec, a_f, rotated, fixed=given | {n: by_acts[n] for n in names}, init=start.g)
        forced = OrthogonalMatch(spec, layout, start.O, g, start.gains)
        aligned = cast(forced(pb), dtype)
        out[f"forced {label}"] = excess(task.evaluate, {k: 0.5 * (pa[k] + aligned[k]) for k in pa}, reference)
    return out


def run_family(family: str, pair: int, sizes, training, cache: Path, learn_steps: int) -> dict:
    c = lm_lmc.cached_pair(family, pair, sizes, training, cache)
    a, b, spec, task, pa, pb, dtype = c.a, c.b, c.spec, c.task, c.pa, c.pb, c.dtype
    layout = orthogonal_layout(a, pa)
    reference = 0.5 * (task.evaluate(pa)[0] + task.evaluate(pb)[0])
    start = match_orthogonal(spec, layout, pa, pb)
    learned = learned_matching(spec, task.model, pa, pb, task.windows, init=start.g, layout=layout, O=start.O, steps=learn_steps)
    block = spec_blocks(spec, stream_factors(spec, layout))
    result = {"family": family, "pair": pair, "endpoint_mean_loss": reference}
    for name, match in (("data-free", start), ("learned", OrthogonalMatch(spec, layout, learned.O, learned.g, start.gains))):
        result[name] = block_losses(task.evaluate, pa, cast(match(b.params), dtype), block, reference)
        print(f"  {family} {name}: midpoint excess {result[name]['midpoint']:.3f}", flush=True)
    result["units"] = unit_correspondence(spec, task, layout, pa, pb, start, reference, dtype)
    return result


def rows_of(result: dict) -> list[dict]:
    rows = [{"family": result["family"], "block": "(every block)", "data-free only": result["data-free"]["midpoint"],
             "learned only": result["learned"]["midpoint"], "data-free all but": "-", "learned all but": "-"}]
    for blk, x in result["data-free"]["blocks"].items():
        y = result["learned"]["blocks"][blk]
        rows.append({"family": result["family"], "block": blk, "data-free only": x["only"], "learned only": y["only"],
                     "data-free all but": x["all_but"], "learned all but": y["all_but"]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    lm_lmc.add_cached_pair_args(p, ["llama", "mixtral"])
    args = p.parse_args(argv)
    quiet_logs()
    torch.set_num_threads(1)
    sizes, training = lm_lmc.sizes_and_training(args.quick, args.width, args.vocab, args.steps, args.recipe, args.kv_heads)
    results = [run_family(f, args.pair, sizes, training, args.cache, 10 if args.quick else 1000) for f in args.families]
    payload = {"results": results, "sizes": asdict(sizes), "training": asdict(training), "pair": args.pair}
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = lm_lmc.results_suffix(sizes, args.recipe)
    path = atomic_write_text(args.out / f"lm_lmc_blocks{suffix}.json", json.dumps(payload, indent=2) + "\n")
    rows = [r for res in results for r in rows_of(res)]
    print(table(rows, ["family", "block", "data-free only", "learned only", "data-free all but", "learned all but"]))
    for res in results:
        print(res["family"], json.dumps(res["units"], indent=1))
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
