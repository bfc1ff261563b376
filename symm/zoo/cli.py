"""``symm zoo make`` and ``symm zoo info``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from ..cli_types import non_negative, positive
from ..errors import UsageError
from .make import ARCHS, CHUNK_SIZE, ZooPlan, make_zoo
from .datasets import DATASETS
from .space import SearchSpace, default_space


def add_zoo_parser(sub) -> None:
    zoo = sub.add_parser("zoo", help="model zoos: generate populations of trained networks, inspect them")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    mk = zsub.add_parser("make", help="train N small networks with hyperparameters drawn from a search space (resumable)")
    mk.add_argument("--arch", choices=ARCHS, default="mlp", help="reference architecture family (default mlp)")
    mk.add_argument("--dataset", choices=DATASETS, default="digits", help="default digits (sklearn, shipped)")
    mk.add_argument("--n-models", type=positive, default=300, help="number of runs (default 300)")
    mk.add_argument("--out", default="zoo_out", help="zoo folder (default zoo_out); re-running finishes it")
    mk.add_argument("--seed", type=non_negative, default=0, help="zoo seed: run i's hyperparameters and torch seed follow from (seed, i)")
    mk.add_argument("--split-seed", type=non_negative, default=0, help="seed of the train/val/test split of the dataset")
    mk.add_argument("--space", type=Path, help="JSON file overriding fields of the default search space (see README)")
    mk.add_argument("--workers", type=positive, default=os.cpu_count() or 1, help="local worker processes (default: CPU count)")
    mk.add_argument("--ray", metavar="auto|ADDRESS", help="schedule the runs as Ray tasks on an existing cluster instead")
    mk.add_argument("--chunk-size", type=positive, default=CHUNK_SIZE, help=f"runs trained together per vmap stack (default {CHUNK_SIZE})")
    mk.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    mk.set_defaults(func=_cmd_make)
    info = zsub.add_parser("info", help="counts, architectures and their symmetry groups, accuracy spread")
    info.add_argument("folder", type=Path, help="a zoo folder (ours, or the published Small CNN Zoo format)")
    info.set_defaults(func=_cmd_info)


def _space(path: Path | None, arch: str) -> SearchSpace:
    if path is None:
        return default_space(arch)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--space {path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"--space {path}: not JSON ({exc})") from None
    return SearchSpace.from_json({**default_space(arch).to_json(), **data})


def _cmd_make(args: argparse.Namespace) -> int:
    if args.chunk_size < 1:
        raise UsageError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    plan = ZooPlan(args.arch, args.dataset, args.n_models, seed=args.seed, split_seed=args.split_seed, space=_space(args.space, args.arch))
    r = make_zoo(args.out, plan, workers=args.workers, ray=args.ray, chunk_size=args.chunk_size, progress=not args.quiet)
    rate = r.trained / r.seconds if r.seconds > 0 else float("nan")
    print(f"zoo {r.folder}: trained {r.trained} runs ({rate:.1f} models/s), {r.skipped} already finished")
    _cmd_info(argparse.Namespace(folder=r.folder))
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from ..graph import describe
    from ..laws import count_laws
    from ..models import spec_for
    from .store import load

    if (Path(args.folder) / "layout.csv").is_file():  # the published Small CNN Zoo format
        from .small_cnn import load_small_cnn_zoo

        zoo = load_small_cnn_zoo(args.folder)
        print(f"zoo {args.folder}: Small CNN Zoo format (Unterthiner et al. 2020)")
    else:
        zoo = load(args.folder)
        m = zoo.info
        print(f"zoo {args.folder}: format v{m['format_version']}, {m.get('family', '?')} on {m['dataset']['name']} "
              f"(split seed {m['dataset']['split_seed']}, sizes {m['dataset']['sizes']})")
    print(zoo.describe())
    finite = zoo.table["finite"] if "finite" in zoo.table.columns else np.ones(len(zoo), int)
    if (finite == 0).any():
        print(f"{int((finite == 0).sum())} checkpoints diverged (non-finite weights, metrics NaN)")
    print("architectures (runs, symmetry group, conservation laws):")
    for aid, cfg in zoo.architectures.items():
        runs = len(np.unique(zoo.table["run_id"][zoo.table["arch"] == aid])) if len(zoo) else 0
        if runs == 0:
            continue
        spec = spec_for(cfg)
        group = describe(spec).splitlines()
        print(f"  {aid}: {runs} runs; {group[0].removeprefix('Spec ')}; {group[1].strip()}; {count_laws(spec)} laws")
    return 0
