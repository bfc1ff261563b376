"""Linear mode connectivity of independently trained byte-level LMs (Llama GQA/RoPE untied, GPT-2 tied, Mixtral
top-2 of 4 experts) under each alignment setting of ``symm align`` (issue 16, item 4).

Each pair: two models of one family trained from scratch with different init and data-order seeds on the first
half of the shipped Shakespeare bytes (``symm.data.byte_tokens``), cached as ``save_pretrained`` folders keyed by
config, training settings and seeds. Every setting runs the align job (:func:`aligners.job.align`) on the job's
default evaluation, the same for every setting: byte windows of the held-out second half of the text.

Settings: naive; ``--stream permutation``; ``--stream signed``; ``--stream orthogonal``; ``--method
activations``; ``--method learned``; ``--method learned --learn-from generated`` (fitted on windows sampled from A
and B themselves: no text read for the alignment); and for Mixtral the signed stream (compare with ``signed``) with the expert
permutations fixed at the identity (the job has no switch for it, so the library is called directly: ``weight_matching(...,
fixed={expert factors: identity})`` on the job's own Spec, task and probe). A setting the job refuses records
its message (``--method`` values the job does not know: "not available"); a setting that later lands is picked
up without changes here.

Tied GPT-2 (and ``llama-tied``, on request: Llama trained with tied embeddings) also gets ``untied-orthogonal`` and
``untied-learned``: both models untied by ``symm untie`` (same functions), then data-free weight matching with the
orthogonal stream, and learned matching started from it.

``gpt2-untied`` is GPT-2 with an untied LM head, Theus et al.'s setting, where the orthogonal LayerNorm stream
exists (the issue's tied GPT-2 admits no continuous stream group).

Usage: .venv/bin/python experiments/lm_lmc.py [--steps 2000] [--pairs 2] [--families llama gpt2 mixtral gpt2-untied]
[--cache DIR] [--vocab N] [--width 64] [--kv-heads 2] [--recipe cosine|constant] [--quick]. Writes results/lm_lmc.json and
results/lm_lmc.png (or into ``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from _common import RESULTS, quiet_logs, table
from aligners import naive_vs_aligned, weight_matching
from aligners.job import align, cast, eval_dtype, load_checkpoint, resolve, stream_group
from aligners.outputs import check_same_function
from symm.action import act
from symm.data import TokenSplit, byte_tokens, text_corpus
from symm.errors import SymmError, UsageError
from symm.io import atomic_write_text
from symm.train import train_lm
from symm.user_data import SEQ_LEN, folder_tokenizer_tokens

FAMILIES = ("llama", "gpt2", "mixtral", "gpt2-untied")
#: on request (``--families``): Llama trained with tied embeddings (like Llama 3.2 1B / 3B), aligned on untied copies
EXTRA_FAMILIES = ("llama-tied",)
#: families trained with tied embeddings: they also get ``untied-orthogonal`` and ``untied-learned``
TIED = ("gpt2", "llama-tied")
#: align-job settings: name -> keyword arguments of :func:`aligners.job.align`
JOB_SETTINGS = {
    "permutation": {"stream": "permutation"},
    "signed": {"stream": "signed"},
    "orthogonal": {"stream": "orthogonal"},
    "activations": {"method": "activations"},
    "learned": {"method": "learned"},
    "learned-generated": {"method": "learned", "learn_from": "generated"},
}
#: settings run on untied copies of tied models
UNTIED_SETTINGS = ("orthogonal", "learned")
SETTINGS = ("naive", *JOB_SETTINGS, "experts-fixed", *(f"untied-{s}" for s in UNTIED_SETTINGS))
ACCEPT, GOAL = 0.3, 0.17
DATA_NOTE = ("training: byte windows of the first half of the shipped Shakespeare plays; barrier: the align job's "
             "default evaluation (held-out windows of the second half), the same for every setting")
DEFAULT_CACHE = Path.home() / ".cache" / "symm" / "lm_lmc"


@dataclass(frozen=True)
class Sizes:
    """Model sizes shared by the three families (Mixtral: ``ff`` per expert)."""

    d: int = 64
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    ff: int = 192
    expert_ff: int = 96
    experts: int = 4
    top_k: int = 2
    seq: int = 128
    vocab: int = 256  # 256: bytes; larger: a byte-level BPE tokenizer trained on the training half (--vocab)


@dataclass(frozen=True)
class Training:
    """AdamW settings of :func:`symm.train.train_lm` and the training windows (first half of the text). The default
    is the usual LM recipe (weight decay 0.1, linear warm-up, cosine decay to 0); ``--recipe constant`` is the one
    of the earlier results (no weight decay, constant learning rate)."""

    steps: int = 2000
    batch: int = 16
    lr: float = 2e-3
    windows: int = 16384
    weight_decay: float = 0.1
    warmup: int = 100
    schedule: str = "cosine"


#: ``--recipe constant``: the training of the results before the cosine recipe (its cache keys are unchanged)
CONSTANT_RECIPE = {"weight_decay": 0.0, "warmup": 0, "schedule": "constant"}


@dataclass(frozen=True)
class Budget:
    """What each align run costs: barrier grid points (the evaluation windows are the job's default), and the
    steps of learned matching (``None``: the job's default; passed only once the job takes ``learn_steps``)."""

    points: int = 7
    learn_steps: int | None = None


QUICK = (Sizes(d=16, layers=1, heads=2, kv_heads=1, ff=32, expert_ff=16, seq=32), Training(steps=30, batch=8, windows=512, warmup=5), Budget(points=3, learn_steps=10))


def config_for(family: str, s: Sizes):
    """A transformers config of ``family`` at sizes ``s``: byte vocabulary, no dropout."""
    from transformers import GPT2Config, LlamaConfig, MixtralConfig

    positions = max(s.seq, SEQ_LEN)  # the align job evaluates windows of SEQ_LEN tokens
    common = dict(vocab_size=s.vocab, hidden_size=s.d, num_hidden_layers=s.layers, num_attention_heads=s.heads,
                  num_key_value_heads=s.kv_heads, max_position_embeddings=positions, tie_word_embeddings=False)
    if family in ("llama", "llama-tied"):
        return LlamaConfig(intermediate_size=s.ff, **(common | {"tie_word_embeddings": family == "llama-tied"}))
    if family == "mixtral":
        return MixtralConfig(intermediate_size=s.expert_ff, num_local_experts=s.experts, num_experts_per_tok=s.top_k, **common)
    if family in ("gpt2", "gpt2-untied"):  # untied: Theus et al.'s setting (their GPT-2s never tie)
        return GPT2Config(vocab_size=s.vocab, n_embd=s.d, n_layer=s.layers, n_head=s.heads, n_inner=s.ff, n_positions=positions,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                          tie_word_embeddings=family == "gpt2")
    raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES + EXTRA_FAMILIES)}")


def seeds(pair: int, member: int) -> tuple[int, int]:
    """(init seed, data-order seed) of model ``member`` (0 = A, 1 = B) of pair ``pair``: all distinct."""
    return 2 * pair + member, 1000 + 2 * pair + member


def model_key(family: str, s: Sizes, t: Training, init_seed: int, data_seed: int) -> str:
    """Cache key: family, a hash of the config and training settings, and the seeds."""
    sizes, training = asdict(s), asdict(t)
    if sizes["vocab"] == 256:  # bytes: the keys of models trained before --vocab existed
        del sizes["vocab"]
    if all(training[k] == v for k, v in CONSTANT_RECIPE.items()):  # the keys of models trained before the recipe fields
        training = {k: v for k, v in training.items() if k not in CONSTANT_RECIPE}
    blob = json.dumps({"config": config_for(family, s).to_diff_dict() | {"transformers_version": None},
                       "sizes": sizes, "training": training}, sort_keys=True)
    return f"{family}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}-init{init_seed}-data{data_seed}"


#: every token of the shipped text (``max_tokens`` for the BPE runs: windows come from the same halves as bytes)
ALL_TOKENS = 10**9


def bpe_tokenizer(vocab: int, cache: Path) -> Path:
    """A folder holding a byte-level BPE tokenizer of ``vocab`` tokens trained on the first (training) half of the
    shipped text; cached (training it is deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder = cache / f"bpe-{vocab}"
    if (folder / "tokenizer.json").is_file():
        return folder
    text = text_corpus()[0].decode("utf-8", errors="ignore")
    half = text[: len(text) // 2]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((half[i : i + (1 << 16)] for i in range(0, len(half), 1 << 16)), trainer)
    stage = Path(tempfile.mkdtemp(prefix=f".stage-bpe-{vocab}-", dir=cache))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(stage)
    try:
        os.rename(stage, folder)
    except OSError:
        shutil.rmtree(stage, ignore_errors=True)
    return folder


def training_tokens(s: Sizes, t: Training, cache: Path) -> tuple[TokenSplit, Path | None]:
    """Training windows (first half of the text) and held-out windows (second half): bytes, or BPE tokens of the
    cached tokenizer (returned, to be saved with each model so the align job evaluates through it)."""
    if s.vocab == 256:
        return byte_tokens(vocab_size=256, seq_len=s.seq, n_train=t.windows, n_test=64, seed=0), None
    cache.mkdir(parents=True, exist_ok=True)
    folder = bpe_tokenizer(s.vocab, cache)
    return folder_tokenizer_tokens(folder, s.vocab, max_tokens=ALL_TOKENS, seq_len=s.seq, n_train=t.windows, n_test=64, seed=0), folder


def train_model(family: str, s: Sizes, t: Training, tokens: TokenSplit, init_seed: int, data_seed: int, cache: Path,
                tokenizer: Path | None = None) -> tuple[Path, dict]:
    """The cached ``save_pretrained`` folder of one trained model (with the tokenizer's files, if any); trained and
    published atomically if missing."""
    from transformers import AutoModelForCausalLM

    folder = cache / model_key(family, s, t, init_seed, data_seed)
    if (folder / "train.json").is_file():
        return folder, json.loads((folder / "train.json").read_text())
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(init_seed)
    model = AutoModelForCausalLM.from_config(config_for(family, s))
    t0 = time.perf_counter()
    train_lm(model, tokens.train, steps=t.steps, batch_size=t.batch, lr=t.lr, weight_decay=t.weight_decay, warmup=t.warmup,
             schedule=t.schedule, seed=data_seed, progress=False)
    info = {"family": family, "init_seed": init_seed, "data_seed": data_seed, "train_s": time.perf_counter() - t0,
            "test_loss": heldout_loss(model, tokens), "parameters": sum(p.numel() for p in model.parameters())}
    stage = Path(tempfile.mkdtemp(prefix=f".stage-{folder.name}-", dir=cache))
    try:
        model.save_pretrained(stage)
        if tokenizer is not None:
            for f in tokenizer.iterdir():
                shutil.copy2(f, stage / f.name)
        atomic_write_text(stage / "train.json", json.dumps(info, indent=2) + "\n")
        os.rename(stage, folder)  # one rename: the folder appears complete or not at all
    except OSError:
        shutil.rmtree(stage, ignore_errors=True)
        if not (folder / "train.json").is_file():
            raise
    return folder, info


@torch.no_grad()
def heldout_loss(model, tokens: TokenSplit) -> float:
    """Mean next-token (byte or BPE token) cross-entropy on the held-out windows."""
    x, y = tokens.test[:, :-1], tokens.test[:, 1:]
    logits = model(x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


@dataclass
class CachedPair:
    """A trained pair read back from the cache, with the align job's Spec and evaluation (its held-out windows)."""

    a: object  # Checkpoint
    b: object
    spec: object
    task: object
    pa: dict  # A's and B's parameters in the evaluation dtype
    pb: dict
    dtype: torch.dtype


def cached_pair(family: str, pair: int, s: Sizes, t: Training, cache: Path) -> CachedPair:
    """Pair ``pair`` of ``family`` from the cache (exits with a clear message if it is not trained yet)."""
    folders = [cache / model_key(family, s, t, *seeds(pair, m)) for m in (0, 1)]
    missing = [str(f) for f in folders if not (f / "train.json").is_file()]
    if missing:
        raise SystemExit(f"not trained yet: {', '.join(missing)}; run experiments/lm_lmc.py with the same sizes first")
    a, b = load_checkpoint(folders[0]), load_checkpoint(folders[1])
    max_tokens = ALL_TOKENS if (folders[0] / "tokenizer.json").is_file() else None  # the job's evaluation windows (run_job)
    spec, task, _ = resolve(a, b, None, None, max_tokens=max_tokens)
    dtype = eval_dtype(b.params)
    return CachedPair(a, b, spec, task, cast(a.params, dtype), cast(b.params, dtype), dtype)


def add_cached_pair_args(p: argparse.ArgumentParser, families: list[str]) -> None:
    """The options of the studies that read this script's cache (lm_lmc_objective.py, lm_lmc_blocks.py): which
    pair, and the sizes / training that key it."""
    p.add_argument("--families", nargs="+", default=families, choices=[f for f in FAMILIES if f != "gpt2"])
    p.add_argument("--pair", type=int, default=0)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--recipe", choices=("cosine", "constant"), default="cosine", help="the training recipe of the models (lm_lmc.py --recipe)")
    p.add_argument("--quick", action="store_true", help="the tiny models of lm_lmc.py --quick, 10 learned steps (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS)


def results_suffix(sizes: Sizes, recipe: str) -> str:
    """``_bpe<vocab>`` for BPE models, ``_constant`` for the constant recipe: the result file names of the studies."""
    return ("" if sizes.vocab == 256 else f"_bpe{sizes.vocab}") + ("_constant" if recipe == "constant" else "")


def row_from_report(family: str, pair: int, setting: str, report: dict) -> dict:
    naive, aligned = report["loss_barrier"]["naive"], report["loss_barrier"]["aligned"]
    return {"family": family, "pair": pair, "setting": setting, "status": "ok", "naive": naive, "aligned": aligned,
            "ratio": aligned / naive if naive > 0 else math.nan, "stream": report.get("stream"), "method": report.get("method"),
            "sweeps": report.get("sweeps"), "align_s": report["timings_s"]["align"], "total_s": report["timings_s"]["total"],
            "curves": {"naive": report["naive"]["loss"], "aligned": report["aligned"]["loss"]}}


def failed_row(family: str, pair: int, setting: str, status: str, message: str) -> dict:
    return {"family": family, "pair": pair, "setting": setting, "status": status, "naive": None, "aligned": None,
            "ratio": None, "message": message}


def run_job(family: str, pair: int, setting: str, a: Path, b: Path, budget: Budget, work: Path) -> dict:
    """One align-job setting; a refusal (or a method that does not exist yet) is recorded with its message. Folders
    with a tokenizer are evaluated on every token of the text, so the held-out windows are the second half, as for bytes."""
    out = work / f"{family}-{pair}-{setting}"
    kwargs = dict(JOB_SETTINGS[setting])
    if (a / "tokenizer.json").is_file():
        kwargs["max_tokens"] = ALL_TOKENS
    if budget.learn_steps is not None and "learn_steps" in inspect.signature(align).parameters:
        kwargs["learn_steps"] = budget.learn_steps
    if "learn_from" in kwargs and "learn_from" not in inspect.signature(align).parameters:
        return failed_row(family, pair, setting, "not available", "the align job has no learn_from")
    try:
        report = align(a, b, out, n_points=budget.points, progress=False, overwrite=True, **kwargs)
    except UsageError as exc:
        status = "not available" if str(exc).startswith("--method must be one of") else "refused"
        return failed_row(family, pair, setting, status, str(exc))
    except SymmError as exc:
        return failed_row(family, pair, setting, "refused", f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001 - a library bug in one setting must not lose the other settings
        return failed_row(family, pair, setting, "failed", f"{type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row_from_report(family, pair, setting, report)


def run_experts_fixed(family: str, pair: int, a_path: Path, b_path: Path, budget: Budget) -> dict:
    """Weight matching with the job's Spec, task and signed stream, every expert permutation fixed at the identity
    (units inside each expert are still matched); the aligned B is checked to compute B's function."""
    t0 = time.perf_counter()
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    max_tokens = ALL_TOKENS if (a_path / "tokenizer.json").is_file() else None  # the job's evaluation windows (run_job)
    spec, task, _ = resolve(a, b, None, None, max_tokens=max_tokens)
    stream, fixed = stream_group(spec, None)
    experts = [n for n, f in spec.factors.items() if f.kind == "permutation" and n.endswith(".experts")]
    fixed |= {n: spec.factors[n].identity() for n in experts}
    dtype = eval_dtype(b.params)
    pa, pb = cast(a.params, dtype), cast(b.params, dtype)
    t1 = time.perf_counter()
    g = weight_matching(spec, pa, pb, fixed=fixed, progress=False)
    t_align = time.perf_counter() - t1
    aligned = cast(act(spec, b.params, g), dtype)
    check_same_function(task.probe, pb, aligned, dtype, "the aligned B (experts fixed)")
    rep = naive_vs_aligned(task.evaluate, pa, pb, aligned, budget.points, progress=False).to_dict()
    report = {**rep, "stream": stream, "method": f"weights, {len(experts)} expert permutations fixed", "sweeps": None,
              "timings_s": {"align": t_align, "total": time.perf_counter() - t0}}
    return row_from_report(family, pair, "experts-fixed", report)


def run_untied(family: str, pair: int, a: Path, b: Path, budget: Budget, work: Path) -> list[dict]:
    """Tied models: ``symm untie`` both (same functions, LM head a copy of the embedding), then each of
    :data:`UNTIED_SETTINGS` (data-free weight matching with the orthogonal stream, learned matching) on the untied
    copies (the naive barrier is the tied pair's)."""
    from symm.untie import untie

    copies = [work / f"{family}-{pair}-{name}-untied" for name in ("A", "B")]
    rows = []
    try:
        for src, dst in zip((a, b), copies):
            untie(src, dst)
        for setting in UNTIED_SETTINGS:
            rows.append(run_job(family, pair, setting, *copies, budget, work) | {"setting": f"untied-{setting}"})
            print(f"  {family} pair {pair} untied-{setting}: {short(rows[-1])}", flush=True)
    finally:
        for c in copies:
            shutil.rmtree(c, ignore_errors=True)
    return rows


def naive_row(family: str, pair: int, rows: list[dict]) -> dict:
    """The naive barrier of the pair (the same in every report: same models, same evaluation)."""
    naive = next((r["naive"] for r in rows if r["status"] == "ok"), None)
    return {"family": family, "pair": pair, "setting": "naive", "status": "ok" if naive is not None else "failed",
            "naive": naive, "aligned": naive, "ratio": 1.0 if naive else None}


def run_pair(family: str, pair: int, folders: tuple[Path, Path], budget: Budget, work: Path) -> list[dict]:
    rows = []
    for setting in JOB_SETTINGS:
        rows.append(run_job(family, pair, setting, *folders, budget, work))
        print(f"  {family} pair {pair} {setting}: {short(rows[-1])}", flush=True)
    if family == "mixtral":
        rows.append(run_experts_fixed(family, pair, *folders, budget))
        print(f"  {family} pair {pair} experts-fixed: {short(rows[-1])}", flush=True)
    if family in TIED:  # tied: the orthogonal stream after an explicit untie
        rows += run_untied(family, pair, *folders, budget, work)
    return [naive_row(family, pair, rows), *rows]


def short(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row.get('message', '')[:90]}"
    return f"naive {row['naive']:.4f} aligned {row['aligned']:.4f} ({row['ratio']:.3f} of naive)"


def printable(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        aligned = r["aligned"] if r["status"] == "ok" else f"{r['status']}: {r.get('message', '')[:60]}"
        out.append({"family": r["family"], "pair": r["pair"], "setting": r["setting"], "naive": r["naive"], "aligned": aligned,
                    "aligned/naive": r["ratio"]})
    return out


def plot(rows: list[dict], families: list[str], path: Path, quiet: bool = False) -> None:
    """Bars of mean aligned/naive per family and setting (pairs as dots); refused settings are labelled."""
    settings = [s for s in SETTINGS if s != "naive" and any(r["setting"] == s for r in rows)]
    fig, ax = plt.subplots(figsize=(max(7, 2.6 * len(families)), 4.2))
    width = 0.8 / max(len(settings), 1)
    colors = plt.get_cmap("tab10")
    for j, setting in enumerate(settings):
        labelled = False
        for i, family in enumerate(families):
            x = i + (j - (len(settings) - 1) / 2) * width
            mine = [r for r in rows if r["family"] == family and r["setting"] == setting]
            ratios = [r["ratio"] for r in mine if r["status"] == "ok" and r["ratio"] is not None]
            if ratios:
                ax.bar(x, sum(ratios) / len(ratios), width, color=colors(j), label=None if labelled else setting)
                labelled = True
                ax.plot([x] * len(ratios), ratios, "k.", markersize=4)
            elif mine:
                label = "n/a" if mine[0]["status"] == "not available" else mine[0]["status"]
                ax.text(x, 0.02, label, rotation=90, ha="center", va="bottom", fontsize=7, color=colors(j))
    ax.axhline(ACCEPT, color="red", linestyle="--", linewidth=1, label=f"acceptance {ACCEPT}")
    ax.axhline(GOAL, color="green", linestyle=":", linewidth=1, label=f"goal {GOAL}")
    top = max([r["ratio"] for r in rows if r["status"] == "ok" and r["setting"] != "naive" and r["ratio"] is not None], default=1.0)
    ax.set_ylim(0, 1.35 * max(top, 1.0))  # room for the legend above the bars
    ax.set_xticks(range(len(families)), families)
    ax.set_ylabel("loss barrier, aligned / naive")
    ax.set_title("LMC of independently trained small LMs (held-out Shakespeare)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if not quiet:
        print(f"wrote {path}")


def sizes_and_training(quick: bool, width: int | None, vocab: int | None, steps: int | None, recipe: str,
                       kv_heads: int | None = None) -> tuple[Sizes, Training]:
    """The model sizes and training settings of the command-line options (also read by lm_lmc_objective.py)."""
    sizes, training = (QUICK[0], QUICK[1]) if quick else (Sizes(), Training())
    if steps is not None:
        training = Training(**(asdict(training) | {"steps": steps}))
    if recipe == "constant":
        training = Training(**(asdict(training) | CONSTANT_RECIPE))
    if width is not None:
        sizes = Sizes(**(asdict(sizes) | {"d": width, "ff": 3 * width, "expert_ff": 3 * width // 2}))
    if vocab is not None:
        sizes = Sizes(**(asdict(sizes) | {"vocab": vocab}))
    if kv_heads is not None:
        if kv_heads < 1 or sizes.heads % kv_heads:
            raise SystemExit(f"--kv-heads must divide the {sizes.heads} attention heads, got {kv_heads}")
        sizes = Sizes(**(asdict(sizes) | {"kv_heads": kv_heads}))
    return sizes, training


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="trained-model cache (default ~/.cache/symm/lm_lmc)")
    p.add_argument("--steps", type=int, default=None, help="AdamW steps per model (default 2000; --quick 30)")
    p.add_argument("--pairs", type=int, default=None, help="pairs (seeds) per family (default 2; --quick 1)")
    p.add_argument("--families", nargs="+", choices=FAMILIES + EXTRA_FAMILIES, default=list(FAMILIES),
                   help=f"default: {' '.join(FAMILIES)}; also {' '.join(EXTRA_FAMILIES)}")
    p.add_argument("--points", type=int, default=None, help="barrier grid points (default 7; --quick 3)")
    p.add_argument("--recipe", choices=("cosine", "constant"), default="cosine", help="training: weight decay 0.1, warm-up "
                   "and cosine decay (default), or no weight decay at a constant learning rate (the earlier results)")
    p.add_argument("--quick", action="store_true", help="tiny models, a few dozen steps (smoke test)")
    p.add_argument("--width", type=int, default=None, help="model width d (default 64; MLP 3d, experts 1.5d)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads of Llama and Mixtral (default 2 of 4: GQA; 4: none)")
    p.add_argument("--vocab", type=int, default=None, help="256: bytes (default); larger: a byte-level BPE tokenizer of that "
                   "many tokens trained on the training half, saved with each model")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of lm_lmc.json and lm_lmc.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    quiet_logs()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    sizes, training = sizes_and_training(args.quick, args.width, args.vocab, args.steps, args.recipe, args.kv_heads)
    budget = QUICK[2] if args.quick else Budget()
    if args.points is not None:
        budget = Budget(**(asdict(budget) | {"points": args.points}))
    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 2)
    tokens, tokenizer = training_tokens(sizes, training, args.cache)
    rows, models = [], []
    t0 = time.perf_counter()
    payload = {}
    with tempfile.TemporaryDirectory(prefix="lm_lmc-") as work:
        for pair in range(pairs):  # pair-major: a run cut short still has every family
            for family in args.families:
                trained = [train_model(family, sizes, training, tokens, *seeds(pair, m), args.cache, tokenizer) for m in (0, 1)]
                models += [info | {"pair": pair, "folder": str(folder)} for folder, info in trained]
                print(f"{family} pair {pair}: held-out loss A {trained[0][1]['test_loss']:.3f}, B {trained[1][1]['test_loss']:.3f} "
                      f"(train {trained[0][1]['train_s']:.0f} s + {trained[1][1]['train_s']:.0f} s)", flush=True)
                rows += run_pair(family, pair, (trained[0][0], trained[1][0]), budget, Path(work))
                done = pair == pairs - 1 and family == args.families[-1]
                payload = {"rows": rows, "models": models, "sizes": asdict(sizes), "training": asdict(training),
                           "budget": asdict(budget), "pairs": pairs, "families": args.families, "complete": done,
                           "data": DATA_NOTE if tokenizer is None else DATA_NOTE.replace("byte windows", f"windows of {sizes.vocab} BPE tokens"), "acceptance": ACCEPT, "goal": GOAL, "quick": args.quick,
                           "total_s": time.perf_counter() - t0}
                write_results(payload, args.out, args.families, quiet=not done)
    print(table(printable(rows), ["family", "pair", "setting", "naive", "aligned", "aligned/naive"]))
    return payload


def write_results(payload: dict, out: Path, families: list[str], quiet: bool) -> None:
    """``lm_lmc.json`` and ``lm_lmc.png`` in ``out`` (rewritten after every pair, so a cut run keeps its rows)."""
    out.mkdir(parents=True, exist_ok=True)
    path = atomic_write_text(out / "lm_lmc.json", json.dumps(payload, indent=2) + "\n")
    plot(payload["rows"], families, out / "lm_lmc.png", quiet)
    if not quiet:
        print(f"wrote {path}")

if __name__ == "__main__":
    main()
