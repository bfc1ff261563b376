"""Benchmark: `symm align --barrier none` on two random-init Llama checkpoints at 0.1 B / 0.5 B / 1.1 B parameters.

Each pair is built offline from a ``LlamaConfig`` (``from_config``, seeds 0 and 1, float32, nothing downloaded),
saved with ``save_pretrained`` (safetensors) and cached under ``~/.cache/symm/bench_scale/<size>/{A,B}`` (built in
a temporary folder and renamed into place, so a killed build leaves no half pair). Each alignment runs the CLI
in a fresh subprocess under ``/usr/bin/time -v``: the peak RSS is the whole process's (maximum resident set
size), the wall time includes loading, matching, the function check and writing the aligned B; ``cpu_s`` is
user + system CPU time (the machine may be shared: wall time then exceeds cpu_s / cores).

Usage: .venv/bin/python experiments/bench_scale.py [--sizes 0.1B,0.5B,1.1B] [--device auto] [--build-only] [-- ARGS]
(ARGS: extra ``symm align`` arguments, e.g. ``-- --stream permutation``). Writes experiments/results/bench_scale.json
(rows of sizes not run this time are kept) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, table, write_json

CACHE = Path(os.environ.get("SYMM_BENCH_CACHE", Path.home() / ".cache" / "symm" / "bench_scale"))
ROOT = Path(__file__).resolve().parents[1]

#: Llama shapes (TinyLlama-1.1B's for 1.1B); vocabulary 32,000, untied head, 4 KV heads
SHAPES = {
    "0.1B": dict(hidden_size=768, num_hidden_layers=8, intermediate_size=2048, num_attention_heads=12, num_key_value_heads=4),
    "0.5B": dict(hidden_size=1536, num_hidden_layers=16, intermediate_size=4096, num_attention_heads=24, num_key_value_heads=4),
    "1.1B": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4),
}


def config_for(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, **SHAPES[size])


def n_params(size: str) -> int:
    s = SHAPES[size]
    d, f, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return 2 * 32000 * d + layers * per_layer + d


def build_pair(size: str) -> Path:
    """``CACHE/size/{A,B}``, built once (atomically: a temporary folder renamed into place)."""
    final = CACHE / size
    if (final / "A" / "config.json").is_file() and (final / "B" / "config.json").is_file():
        return final
    import torch
    from transformers import AutoModelForCausalLM

    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{size}-", dir=CACHE))
    try:
        for name, seed in (("A", 0), ("B", 1)):
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config_for(size))
            model.save_pretrained(tmp / name)
            del model
            print(f"built {size} {name} in {time.perf_counter() - t0:.0f} s", flush=True)
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _time_v(stderr: str, key: str) -> str | None:
    m = re.search(rf"^\s*{re.escape(key)}:\s*(.+)$", stderr, re.M)
    return m.group(1).strip() if m else None


def _wall_seconds(text: str) -> float:
    parts = [float(p) for p in text.split(":")]
    return sum(p * 60 ** i for i, p in enumerate(reversed(parts)))


def run_align(size: str, pair: Path, device: str, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench_scale_{size}_")) / "out"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "symm.cli", "align", str(pair / "A"), str(pair / "B"),
           "--barrier", "none", "--out", str(out), "--quiet", "--device", device, *extra]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    try:
        if proc.returncode != 0:
            print(proc.stdout, proc.stderr, sep="\n")
            raise SystemExit(f"{size}: symm align exited {proc.returncode}")
        report = json.loads((out / "report.json").read_text())
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    rss_kb = int(_time_v(proc.stderr, "Maximum resident set size (kbytes)"))
    timings = report["timings_s"]
    return {
        "size": size,
        "params": n_params(size),
        "params_B": round(n_params(size) / 1e9, 3),
        "peak_rss_GB": round(rss_kb * 1024 / 1e9, 2),
        "peak_rss_GiB": round(rss_kb / 2**20, 2),
        "wall_s": round(_wall_seconds(_time_v(proc.stderr, "Elapsed (wall clock) time (h:mm:ss or m:ss)")), 1),
        "cpu_s": round(float(_time_v(proc.stderr, "User time (seconds)")) + float(_time_v(proc.stderr, "System time (seconds)")), 1),
        "load_s": round(timings["load"], 1),
        "matching_s": round(timings["align"], 1),
        "write_s": round(timings.get("write", float("nan")), 1),
        "sweeps": report["sweeps"],
        "device": report.get("device"),
        "loader": report.get("loader"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.1B,0.5B,1.1B")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("extra", nargs="*", help="extra arguments for symm align (after --)")
    args = parser.parse_args()
    rows = []
    for size in args.sizes.split(","):
        pair = build_pair(size)
        if args.build_only:
            continue
        rows.append(run_align(size, pair, args.device, args.extra))
        print(table(rows[-1:], list(rows[-1])), flush=True)
    if args.build_only:
        return
    previous = RESULTS / "bench_scale.json"  # rows of sizes not run this time are kept
    if previous.is_file():
        ran = {r["size"] for r in rows}
        rows += [r for r in json.loads(previous.read_text()).get("rows", []) if r["size"] not in ran]
    rows.sort(key=lambda r: list(SHAPES).index(r["size"]))
    columns = ["size", "params", "peak_rss_GB", "wall_s", "cpu_s", "load_s", "matching_s", "write_s", "sweeps"]
    print(table(rows, columns))
    write_json("bench_scale", {"machine": f"{os.cpu_count()} CPU cores, no GPU", "command": "symm align A B --barrier none", "rows": rows})


if __name__ == "__main__":
    main()
