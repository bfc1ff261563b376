"""``symm metanet train`` and ``symm metanet eval``: fit a metanetwork on a zoo view, report Kendall's tau and R^2.

``train`` selects a view of a zoo (``--select COL=VALUE``, ``--final``), splits it by run, trains the chosen model
(``equivariant``: the Spec-derived permutation-equivariant metanet; ``statnn``, ``mlp``, ``hparams``: baselines)
and evaluates it on every split under every robustness transformation (original, permutation, scale10, scale1000).
``eval`` rebuilds a saved model and evaluates it on a zoo with the recorded protocol. Outputs (``report.json``,
``scatter.png`` and, for ``train``, the checkpoint folder ``model/``) appear all-or-nothing in ``--out``; the zoo is
only read, and an ``--out`` equal to or inside the zoo folder is refused.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from symm.cli_types import non_negative, non_negative_float, positive, positive_float
from symm.errors import OutputError, UsageError

log = logging.getLogger(__name__)

MODELS = ("equivariant", "statnn", "mlp", "hparams", "quasi")
BASELINE_CLASSES = {"statnn": "StatNN", "mlp": "FlatMLP", "hparams": "HParamsMLP"}
CHECKPOINT = "model"
REPORT = "report.json"
SCATTER = "scatter.png"


# ----- the equivariant metanet, rebuildable from a checkpoint ------------------------------------------------------
@dataclass(frozen=True)
class EquivariantConfig:
    """How to rebuild an :class:`~metanets.equivariant.EquivariantMetaNet`: its architecture (JSON of
    :func:`symm.zoo.manifest.config_to_json`, as a string so the config stays hashable) and its kwargs."""

    arch: str
    hidden: int = 16
    depth: int = 2
    head_hidden: int = 64
    alpha_bound: float = 1.0  # quasi only: alpha = exp(b tanh(.)) per unit and channel

    @property
    def arch_config(self) -> object:
        from symm.zoo.manifest import config_from_json

        return config_from_json(json.loads(self.arch))


def _zoo_metanet_class(quasi: bool = False):
    """The checkpointable class of the Spec-derived metanet: ``ZooEquivariantMetaNet`` or ``ZooQuasiMetaNet``."""
    from flax import nnx

    from symm.models import spec_for

    from .equivariant import EquivariantMetaNet
    from .quasi import QuasiMetaNet

    base = QuasiMetaNet if quasi else EquivariantMetaNet

    class ZooMetaNet(base):
        """The metanet of one architecture's Spec, with a ``config`` (checkpointable)."""

        def __init__(self, config: EquivariantConfig, *, rngs: nnx.Rngs) -> None:
            extra = {"alpha_bound": config.alpha_bound} if quasi else {}
            super().__init__(spec_for(config.arch_config), hidden=config.hidden, depth=config.depth,
                             head_hidden=config.head_hidden, rngs=rngs, **extra)
            self.config = config

        @staticmethod
        def config_from_json(data: Mapping) -> EquivariantConfig:
            unknown = set(data) - {f.name for f in dataclasses.fields(EquivariantConfig)}
            if unknown:
                raise UsageError(f"equivariant config: unknown fields {sorted(unknown)}")
            return EquivariantConfig(**data)

    ZooMetaNet.__name__ = ZooMetaNet.__qualname__ = "ZooQuasiMetaNet" if quasi else "ZooEquivariantMetaNet"
    return ZooMetaNet


def _loadable_models() -> dict[str, type]:
    from .baselines import BASELINES

    classes = [_zoo_metanet_class(False), _zoo_metanet_class(True)]
    return {**BASELINES, **{cls.__name__: cls for cls in classes}}


# ----- parser ---------------------------------------------------------------------------------------------------
def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None
    if len(values) != 3 or any(v < 0 for v in values) or not abs(sum(values) - 1) < 1e-6:
        raise argparse.ArgumentTypeError(f"need three non-negative fractions train,val,test summing to 1, got {text!r}")
    return values


def add_metanet_parser(sub) -> None:
    mn = sub.add_parser("metanet", help="metanetworks: predict a zoo's test accuracy from weights (train, eval)")
    msub = mn.add_subparsers(dest="metanet_command", required=True)
    tr = msub.add_parser("train", help="train a metanetwork on a zoo view; report tau and R^2 per split and transformation")
    tr.add_argument("--zoo", type=Path, required=True, help="zoo folder (symm zoo make); only read")
    tr.add_argument("--model", choices=MODELS, default="equivariant",
                    help="equivariant (Spec-derived, permutations), quasi (Spec-derived, permutations x scalings: "
                         "canonical scale + per-channel alpha), statnn, mlp (flattened weights), hparams (hyperparameters only)")
    tr.add_argument("--select", action="append", default=[], metavar="COL=VALUE",
                    help="keep rows whose column equals VALUE (a,b: any of them); repeatable, e.g. --select activation=relu")
    tr.add_argument("--final", action="store_true", help="keep only the last checkpoint of every run")
    tr.add_argument("--epochs", type=positive, default=100)
    tr.add_argument("--batch-size", type=positive, default=32)
    tr.add_argument("--lr", type=positive_float, default=1e-3)
    tr.add_argument("--weight-decay", type=non_negative_float, default=1e-4)
    tr.add_argument("--hidden", type=positive, default=16, help="equivariant/quasi: channels of the equivariant layers (default 16)")
    tr.add_argument("--depth", type=positive, default=2, help="equivariant/quasi: equivariant layers (default 2)")
    tr.add_argument("--head-hidden", type=positive, default=64, help="equivariant/quasi: hidden units of the invariant head (default 64; baselines use 128-128)")
    tr.add_argument("--patience", type=non_negative, default=20, help="early stopping after N epochs without a better val tau (0: off)")
    tr.add_argument("--seed", type=non_negative, default=0, help="seed of the split, the model's init, shuffling and transformations")
    tr.add_argument("--fractions", type=_fractions, default=(0.8, 0.1, 0.1), help="train,val,test run fractions (default 0.8,0.1,0.1)")
    tr.add_argument("--out", type=Path, default=Path("metanet_out"), help="output folder (default metanet_out)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=_cmd_train)
    ev = msub.add_parser("eval", help="evaluate a saved metanetwork on a zoo with its recorded protocol")
    ev.add_argument("--model", type=Path, required=True, help="output folder of `symm metanet train` (or its model/ checkpoint)")
    ev.add_argument("--zoo", type=Path, required=True, help="zoo folder; only read")
    ev.add_argument("--out", type=Path, default=Path("metanet_eval_out"), help="output folder (default metanet_eval_out)")
    ev.set_defaults(func=_cmd_eval)


# ----- shared steps ---------------------------------------------------------------------------------------------
def parse_selection(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        col, sep, value = item.partition("=")
        if not sep or not col:
            raise UsageError(f"--select {item!r}: expected COL=VALUE, e.g. --select activation=relu")
        out[col.strip()] = value.strip()
    return out


def select_view(zoo, selection: Mapping[str, str], final: bool):
    """The zoo rows matching ``selection`` (values converted to the column's type), the final checkpoints if asked."""
    equals = {}
    for col, text in selection.items():
        if col not in zoo.table.names:
            raise UsageError(f"--select {col}={text}: the zoo has no column {col!r} (columns: {', '.join(zoo.table.names)})")
        dtype = zoo.table[col].dtype
        values = text.split(",")
        try:
            equals[col] = [str(v) for v in values] if dtype == object or dtype.kind in "US" else list(np.asarray(values).astype(dtype))
        except ValueError:
            raise UsageError(f"--select {col}={text}: column {col!r} holds {dtype} values") from None
    view = zoo.select(**equals) if equals else zoo
    if final:
        view = view.final()
    if len(view) == 0:
        raise UsageError(f"the selection {dict(selection)} matches no rows of the zoo")
    return view


def load_view_splits(zoo_dir: Path, selection: Mapping[str, str], final: bool, fractions, seed: int):
    from symm.zoo import load

    from .data import load_splits

    view = select_view(load(zoo_dir), selection, final)
    try:
        splits = load_splits(view, fractions, seed)
    except UsageError as exc:
        if "mixes" in str(exc):
            raise UsageError(f"{exc} (on the command line: --select arch=ID)") from None
        raise
    return view, splits


def check_out(out: Path, *inputs: Path) -> None:
    """Refuse an ``--out`` that is a file, or equal to / inside an input folder (inputs are never written)."""
    real = out.resolve()
    for folder in inputs:
        src = folder.resolve()
        if real == src or src in real.parents:
            raise OutputError(f"--out {out} is {'the' if real == src else 'inside the'} input folder {folder}: "
                              "choose another folder (inputs are never overwritten)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")


def _archs(view) -> dict[str, int]:
    names, counts = np.unique(np.asarray([str(a) for a in view.table["arch"]]), return_counts=True)
    return {str(a): int(c) for a, c in zip(names, counts)}


def build_model(kind: str, view, splits, seed: int, *, hidden: int = 16, depth: int = 2, head_hidden: int = 64):
    """A fresh model of ``kind`` (one of :data:`MODELS`) for the view."""
    from flax import nnx

    from symm.zoo.manifest import config_to_json

    from .baselines import BASELINES, BaselineConfig

    train_data = splits["train"]
    if hidden < 1 or depth < 1 or head_hidden < 1:
        raise UsageError(f"--hidden, --depth and --head-hidden must be positive, got {hidden}, {depth}, {head_hidden}")
    if kind in ("equivariant", "quasi"):
        archs = _archs(view)
        if len(archs) > 1:
            raise UsageError(f"the {kind} metanetwork is built from one architecture's symmetry group, but this view "
                             f"mixes {len(archs)} architectures {archs}; select one, e.g. --select activation=relu "
                             "(or --select arch=ID)")
        cfg = EquivariantConfig(json.dumps(config_to_json(view.architectures[next(iter(archs))]), sort_keys=True),
                                hidden=hidden, depth=depth, head_hidden=head_hidden)
        model = _zoo_metanet_class(kind == "quasi")(cfg, rngs=nnx.Rngs(seed))
    elif kind not in BASELINE_CLASSES:
        raise UsageError(f"unknown metanet model {kind!r} (known: {', '.join(MODELS)})")
    else:
        cfg = BaselineConfig(train_data.shapes, int(train_data.hparams.shape[1]))
        model = BASELINES[BASELINE_CLASSES[kind]](cfg, rngs=nnx.Rngs(seed))
    return model


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if np.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def evaluate_all(model, splits, seed: int):
    """``(metrics {split: {transform: ...}}, test predictions {transform: (pred, true)}, seconds)``."""
    from .train import evaluate, predict, transformed_views
    from .transforms import TRANSFORMS

    start = time.perf_counter()
    views = transformed_views(splits, TRANSFORMS, seed)
    report = evaluate(model, splits, TRANSFORMS, views=views)
    test = {t: (predict(model, views["test"][t].data), views["test"][t].data.target) for t in TRANSFORMS}
    return report, test, time.perf_counter() - start


def plot_scatter(test: Mapping[str, tuple[np.ndarray, np.ndarray]], metrics: Mapping, path: Path, title: str) -> None:
    """One panel per transformation: predicted vs true test accuracy, with the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(test), figsize=(3.6 * len(test), 3.6), squeeze=False)
    for ax, (name, (pred, true)) in zip(axes[0], test.items()):
        lo = float(min(np.min(pred), np.min(true)))
        hi = float(max(np.max(pred), np.max(true)))
        ax.plot([lo, hi], [lo, hi], color="0.6", lw=1, ls="--")
        ax.scatter(true, pred, s=12, alpha=0.8)
        m = metrics[name]
        ax.set_title(f"{name}\ntau {m['kendall_tau']:.3f}  R2 {m['r2']:.3f}  (n={m['n']})", fontsize=9)
        ax.set_xlabel("true test accuracy")
    axes[0][0].set_ylabel("predicted")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def publish_outputs(out: Path, report: dict, test, write_extra=None) -> None:
    from symm.publish import publish, staged_output

    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_output(out, lambda: None) as stage:
        names = []
        if write_extra is not None:
            names += write_extra(stage)
        plot_scatter(test, report["metrics"]["test"], stage / SCATTER,
                     f"{report['model']['type']} on {Path(report['zoo']).name} (test split)")
        (stage / REPORT).write_text(json.dumps(_jsonable(report), indent=1) + "\n")
        publish(stage, out, [*names, SCATTER, REPORT])


def _split_info(splits) -> dict:
    return {s: {"n": len(d), "runs": int(len(np.unique(d.run_id)))} for s, d in splits.items()}


# ----- commands -------------------------------------------------------------------------------------------------
def _cmd_train(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    check_out(args.out, args.zoo)
    selection = parse_selection(args.select)
    from .checkpoint import save_checkpoint
    from .train import TrainConfig, train

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr, weight_decay=args.weight_decay,
                         patience=args.patience, seed=args.seed)
    view, splits = load_view_splits(args.zoo, selection, args.final, args.fractions, args.seed)
    model = build_model(args.model, view, splits, args.seed, hidden=args.hidden, depth=args.depth, head_hidden=args.head_hidden)
    t_load = time.perf_counter() - t0
    start = time.perf_counter()
    result = train(model, splits["train"], splits["val"], config, progress=not args.quiet)
    t_train = time.perf_counter() - start
    metrics, test, t_eval = evaluate_all(model, splits, args.seed)
    protocol = {
        "zoo": str(args.zoo.resolve()),
        "selection": selection,
        "final": bool(args.final),
        "split": {"fractions": list(args.fractions), "seed": args.seed, "transform_seed": args.seed, **{"sizes": _split_info(splits)}},
        "architectures": _archs(view),
        "model": {"type": args.model, "class": type(model).__name__, "config": dataclasses.asdict(model.config)},
    }
    report = {
        "command": "train",
        **protocol,
        "training": {**dataclasses.asdict(config), "epochs_run": len(result.history), "best_epoch": result.best_epoch,
                     "best_value": result.best_value, "n_devices": result.n_devices, "history": result.history},
        "metrics": metrics,
        "timings": {"load_s": t_load, "train_s": t_train, "eval_s": t_eval, "total_s": time.perf_counter() - t0},
    }

    def write_model(stage: Path) -> list[str]:
        save_checkpoint(stage / CHECKPOINT, model, _jsonable({**protocol, "training": {k: v for k, v in report["training"].items() if k != "history"}}))
        return [CHECKPOINT]

    publish_outputs(args.out, report, test, write_model)
    t = metrics["test"]
    print(f"metanet {args.model}: best epoch {result.best_epoch} of {len(result.history)}; test tau "
          + ", ".join(f"{k} {v['kendall_tau']:.3f}" for k, v in t.items()) + f"; wrote {args.out}")
    return 0


def _checkpoint_folder(folder: Path) -> Path:
    if (folder / CHECKPOINT / "config.json").is_file():
        return folder / CHECKPOINT
    if (folder / "config.json").is_file():
        return folder
    raise UsageError(f"--model {folder}: not a `symm metanet train` output folder or metanetwork checkpoint (no config.json)")


def _cmd_eval(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    ckpt = _checkpoint_folder(args.model)
    check_out(args.out, args.zoo, args.model)
    from .checkpoint import load_checkpoint

    model, info = load_checkpoint(ckpt, _loadable_models())
    meta = info.get("metadata") or {}
    try:
        selection, final, split = meta["selection"], bool(meta["final"]), meta["split"]
        kind = meta["model"]["type"]
    except (KeyError, TypeError):
        raise UsageError(f"{ckpt}: the checkpoint does not record the training protocol (selection, split); "
                         "was it written by `symm metanet train`?") from None
    view, splits = load_view_splits(args.zoo, selection, final, tuple(split["fractions"]), int(split["seed"]))
    _check_compatible(model, view, splits)
    t_load = time.perf_counter() - t0
    metrics, test, t_eval = evaluate_all(model, splits, int(split.get("transform_seed", split["seed"])))
    report = {
        "command": "eval",
        "zoo": str(args.zoo.resolve()),
        "checkpoint": str(ckpt.resolve()),
        "selection": selection,
        "final": final,
        "split": {**split, "sizes": _split_info(splits)},
        "architectures": _archs(view),
        "model": {"type": kind, "class": info["model"], "config": info["config"]},
        "trained_on": meta.get("zoo"),
        "training": meta.get("training"),
        "metrics": metrics,
        "timings": {"load_s": t_load, "eval_s": t_eval, "total_s": time.perf_counter() - t0},
    }
    publish_outputs(args.out, report, test)
    print("metanet eval: test tau " + ", ".join(f"{k} {v['kendall_tau']:.3f}" for k, v in metrics["test"].items())
          + f"; wrote {args.out}")
    return 0


def _check_compatible(model, view, splits) -> None:
    """The saved model must read this view's parameters (and hyperparameter features)."""
    config = model.config
    data = splits["train"]
    if isinstance(config, EquivariantConfig):
        from symm.zoo.manifest import config_to_json

        archs = _archs(view)
        want = json.loads(config.arch)
        bad = [a for a in archs if config_to_json(view.architectures[a]) != want]
        if bad:
            raise UsageError(f"the model was trained on architecture {want}; this zoo view has {bad}")
        return
    if tuple(config.shapes) != tuple(data.shapes) or config.n_hparams != data.hparams.shape[1]:
        raise UsageError(f"the model reads parameters {list(config.shapes)} and {config.n_hparams} hyperparameter features; "
                         f"this zoo view has {list(data.shapes)} and {data.hparams.shape[1]}")
