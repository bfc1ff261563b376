"""``symm zoo make``: plan the runs, train them in chunks (in process, on local workers or as Ray tasks), commit
each chunk atomically as one shard, and keep ``metadata.csv`` in step.

Resumable and crash-safe: a run is finished exactly when a committed shard holds it; a re-run plans only the
unfinished runs, so a kill at any moment loses at most the chunks in flight and never duplicates a run. One
writer at a time (an exclusive lock on the folder).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import OutputError, UsageError
from ..models import CNNConfig, MLPConfig, TransformerConfig
from ..publish import OutputLock, fault_point
from .datasets import DATASETS, TEXT_SEQ, load_dataset
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST, METADATA, SHARDS, arch_id, config_to_json, read_manifest, write_atomic
from .shards import TMP_PREFIX, read_header, write_shard
from .space import TRANSFORMER_FFNS, Run, SearchSpace, default_space, draw_run
from .store import rebuild_index, shard_paths
from .table import Table
from .train import ChunkResult, ChunkTask, train_chunk

log = logging.getLogger(__name__)

ARCHS = ("mlp", "cnn", "transformer")
CHECKPOINT_EPOCHS = (0, 1, 2, 5, 10, 20, 30)
BATCH_SIZE = 64
CHUNK_SIZE = 64


@dataclass(frozen=True)
class ZooPlan:
    """What a zoo folder is to hold: the settings recorded in its manifest."""

    arch: str
    dataset: str
    n_models: int
    seed: int = 0
    split_seed: int = 0
    space: SearchSpace | None = None  # None: default_space(arch)
    checkpoint_epochs: tuple[int, ...] = CHECKPOINT_EPOCHS
    batch_size: int = BATCH_SIZE

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UsageError(f"unknown zoo architecture {self.arch!r} (known: {', '.join(ARCHS)})")
        if self.dataset not in DATASETS:
            raise UsageError(f"unknown zoo dataset {self.dataset!r} (known: {', '.join(DATASETS)})")
        if self.space is None:
            object.__setattr__(self, "space", default_space(self.arch))
        if self.arch == "cnn" and self.dataset != "digits":
            raise UsageError("--arch cnn needs an image dataset: --dataset digits")
        if (self.arch == "transformer") != (self.dataset == "text"):
            raise UsageError("--arch transformer goes with --dataset text (and text only with the transformer)")
        if self.arch == "transformer":
            bad = set(self.space.activations) - set(TRANSFORMER_FFNS)
            if bad or any(d > 0 for d in self.space.dropout):
                raise UsageError(f"transformer zoos: activations among {TRANSFORMER_FFNS} (got {sorted(bad)}), dropout (0.0,)")
        if self.n_models < 1:
            raise UsageError(f"--n-models must be at least 1, got {self.n_models}")
        if self.arch == "cnn" and max(self.space.depths) > 3:
            raise UsageError("a digits CNN pools 8x8 images per block: depths at most 3")

    def config(self, run: Run, n_features: int, n_classes: int) -> object:
        """The reference-model config of a run (its width, depth and activation)."""
        if self.arch == "mlp":
            return MLPConfig((n_features, *([run.width] * run.depth), n_classes), run.activation)
        if self.arch == "transformer":
            return TransformerConfig(vocab_size=n_classes, d_model=run.width, n_layers=run.depth, n_heads=2, max_len=TEXT_SEQ,
                                     pe="rope", ffn=run.activation, d_ff=2 * run.width, norm="layer")
        return CNNConfig(in_channels=1, widths=(run.width,) * run.depth, n_classes=n_classes, image_size=8, activation=run.activation, norm="none")

    def manifest(self) -> dict:
        data = load_dataset(self.dataset, self.split_seed)
        archs = {}
        for w in self.space.widths:
            for d in self.space.depths:
                for a in self.space.activations:
                    probe = Run(0, 0, "sgd", 0.0, 0.0, w, d, a, 1.0, 0.0, 1.0, 0.0, 1)
                    cfg = self.config(probe, data.n_features, data.n_classes)
                    archs[arch_id(cfg)] = config_to_json(cfg)
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "family": self.arch, "architectures": archs,
            "dataset": {"name": self.dataset, "split_seed": self.split_seed, "sizes": data.sizes},
            "space": self.space.to_json(), "seed": self.seed, "n_models": self.n_models,
            "checkpoint_epochs": list(self.checkpoint_epochs), "batch_size": self.batch_size,
            "columns": COLUMNS,
        }


COLUMNS = {
    "model_id": "checkpoint id r<run>-e<epoch>", "run_id": "run index (0..n_models-1)", "arch": "manifest architecture id",
    "seed": "the run's torch seed", "epoch": "epochs trained", "step": "optimizer steps taken",
    "train_loss/accuracy": "on the run's own training subset and (noisy) labels", "val_*/test_*": "clean held-out splits",
    "finite": "1 if every weight is finite (diverged runs keep 0 and NaN metrics)", "shard/index": "where the weights are",
}


@dataclass(frozen=True)
class MakeResult:
    folder: Path
    trained: int  # runs trained by this call
    skipped: int  # runs already finished
    seconds: float


def make_zoo(
    out: str | Path,
    plan: ZooPlan,
    *,
    workers: int = 1,
    ray: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    progress: bool = True,
) -> MakeResult:
    """Generate (or finish) the zoo ``plan`` describes in ``out``."""
    out = Path(out)
    if workers < 1:
        raise UsageError(f"--workers must be at least 1, got {workers}")
    _check_target(out, plan)
    start = time.perf_counter()
    with OutputLock(out):
        manifest = _prepare(out, plan)
        done = _finished_runs(out)
        todo = [draw_run(plan.space, plan.seed, i) for i in range(plan.n_models) if i not in done]
        tasks = list(_chunks(plan, todo, manifest, chunk_size))
        log.info("zoo %s: %d runs finished, %d to train in %d chunks", out, len(done & set(range(plan.n_models))), len(todo), len(tasks))
        index = _Index(out)
        bar = tqdm(total=len(todo), desc="zoo", unit="model", disable=not progress)
        try:
            for result in _execute(tasks, workers, ray):
                index.add(_commit(out, result), result.rows)
                bar.update(len({r["run_id"] for r in result.rows}))
        finally:
            bar.close()
        index.flush()
    return MakeResult(out, len(todo), plan.n_models - len(todo), time.perf_counter() - start)


def _check_target(out: Path, plan: ZooPlan) -> None:
    """Refuse a file, or a non-empty folder that is not a zoo of the same settings, before any work."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} exists and is not a folder")
    if out.is_dir() and any(not p.name.startswith(TMP_PREFIX) for p in out.iterdir()):  # our own leftovers are ignored
        if not (out / MANIFEST).is_file():
            raise OutputError(f"{out} is not empty and holds no {MANIFEST}: refusing to write a zoo into it")
        _check_same(read_manifest(out), plan, out)


def _check_same(old: dict, plan: ZooPlan, out: Path) -> None:
    want = {"family": plan.arch, "dataset.name": plan.dataset, "dataset.split_seed": plan.split_seed, "seed": plan.seed,
            "space": plan.space.to_json(), "checkpoint_epochs": list(plan.checkpoint_epochs), "batch_size": plan.batch_size}
    have = {"family": old.get("family"), "dataset.name": old.get("dataset", {}).get("name"),
            "dataset.split_seed": old.get("dataset", {}).get("split_seed"), "seed": old.get("seed"), "space": old.get("space"),
            "checkpoint_epochs": old.get("checkpoint_epochs"), "batch_size": old.get("batch_size")}
    diff = [k for k in want if want[k] != have[k]]
    if diff:
        details = "; ".join(f"{k}: zoo has {have[k]!r}, asked {want[k]!r}" for k in diff)
        raise OutputError(f"{out} holds a zoo made with other settings ({details}); choose another --out")


def _prepare(out: Path, plan: ZooPlan) -> dict:
    """Create the folder and manifest (or raise ``n_models``); drop temporary files of killed writers."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).is_file():
        manifest = read_manifest(out)
        _check_same(manifest, plan, out)
        if plan.n_models > manifest["n_models"]:
            manifest["n_models"] = plan.n_models
            write_atomic(out / MANIFEST, _json(manifest))
    else:
        manifest = plan.manifest()
        write_atomic(out / MANIFEST, _json(manifest))
    (out / SHARDS).mkdir(exist_ok=True)  # after the manifest: a folder with shards/ always has one
    for tmp in [*(out / SHARDS).glob(f"*/{TMP_PREFIX}*"), *out.glob(f"{TMP_PREFIX}*")]:
        log.info("removing %s, left by a killed run", tmp)
        tmp.unlink()
    return manifest


def _json(data: dict) -> str:
    import json

    return json.dumps(data, indent=1) + "\n"


def _finished_runs(out: Path) -> set[int]:
    return {int(r["run_id"]) for p in shard_paths(out) for r in read_header(p).rows}


def _chunks(plan: ZooPlan, runs: Sequence[Run], manifest: dict, size: int) -> Iterator[ChunkTask]:
    """Runs grouped by architecture (one vmap stack each), in run order, at most ``size`` per chunk."""
    sizes = manifest["dataset"]["sizes"]
    data = load_dataset(plan.dataset, plan.split_seed)
    groups: dict[str, tuple[object, list[Run]]] = {}
    for r in runs:
        cfg = plan.config(r, data.n_features, data.n_classes)
        groups.setdefault(arch_id(cfg), (cfg, []))[1].append(r)
    if sizes != data.sizes:
        raise OutputError(f"the {plan.dataset} split has sizes {data.sizes} here but {sizes} in the zoo's manifest")
    for aid in sorted(groups):
        cfg, members = groups[aid]
        for i in range(0, len(members), size):
            yield ChunkTask(aid, cfg, plan.dataset, plan.split_seed, tuple(members[i : i + size]), plan.checkpoint_epochs, plan.batch_size)


def _execute(tasks: Sequence[ChunkTask], workers: int, ray_address: str | None) -> Iterator[ChunkResult]:
    """Results as chunks finish: in process (1 worker), on a local process pool, or as Ray tasks."""
    if ray_address is not None:
        from .ray_backend import run_on_ray

        yield from run_on_ray(tasks, ray_address)
    elif workers == 1:
        for task in tasks:
            yield train_chunk(task)
    else:
        from concurrent.futures import ProcessPoolExecutor, as_completed
        from multiprocessing import get_context

        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(train_chunk, t) for t in tasks]
            try:
                for f in as_completed(futures):
                    yield f.result()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


class _Index:
    """``metadata.csv`` kept in step with the committed shards (rewritten atomically every ``every`` seconds)."""

    def __init__(self, out: Path, every: float = 20.0) -> None:
        self.out, self.every, self.last = out, every, time.monotonic()
        self.table = rebuild_index(out)
        self.rows = list(self.table.rows())

    def add(self, shard: Path, rows: Sequence[dict]) -> None:
        rel = str(shard.relative_to(self.out))
        self.rows += [{**r, "shard": rel, "index": i} for i, r in enumerate(rows)]
        if time.monotonic() - self.last > self.every:
            self.flush()

    def flush(self) -> None:
        self.rows.sort(key=lambda r: (r["run_id"], r["epoch"]))
        write_atomic(self.out / METADATA, Table.from_rows(self.rows).to_csv())
        self.last = time.monotonic()


def _commit(out: Path, result: ChunkResult) -> Path:
    """One shard per chunk, renamed into place (the commit point), then the index is rewritten."""
    runs = sorted({int(r["run_id"]) for r in result.rows})
    folder = out / SHARDS / result.arch
    folder.mkdir(exist_ok=True)
    path = folder / f"runs-{runs[0]:06d}-{runs[-1]:06d}-n{len(runs)}.safetensors"
    if path.exists():
        raise OutputError(f"{path} already exists: two writers on one zoo?")
    fault_point("zoo-before-shard")
    write_shard(path, result.weights, result.rows, {"arch": result.arch})
    fault_point("zoo-after-shard")
    return path
