"""Command line: ``symm demo`` and ``symm describe``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import SymmError


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    r = run_demo(args.out, width=args.width, depth=args.depth, epochs=args.epochs, seed=args.seed, method=args.method, progress=not args.quiet)
    print(r.spec_summary)
    print(f"random group element: logits unchanged up to relative error {r.symmetry_error:.1e}")
    _print_report(r.report)
    return 0


def _print_report(report: dict) -> None:
    lb, ab = report["loss_barrier"], report["accuracy_barrier"]
    print(f"{report['method']} matching, {report['sweeps']} sweeps, {report['timings_s']['align']:.2f} s; data: {report['data']}")
    print(f"loss barrier:     naive {lb['naive']:.4f}   aligned {lb['aligned']:.4f}   ({_ratio(lb)})")
    print(f"accuracy barrier: naive {ab['naive']:.4f}   aligned {ab['aligned']:.4f}")
    if "aligned+REPAIR" in lb:
        print(f"with REPAIR:      loss {lb['aligned+REPAIR']:.4f}   accuracy {ab['aligned+REPAIR']:.4f}")
    outs = report["outputs"]
    print(f"wrote {outs['aligned']}, {outs['report']}, {outs['plot']}")


def _ratio(barrier: dict) -> str:
    return f"{100 * barrier['aligned'] / barrier['naive']:.1f}% of naive" if barrier["naive"] > 0 else "naive barrier is 0"


def _cmd_align(args: argparse.Namespace) -> int:
    from aligners.job import align

    report = align(
        args.a, args.b, args.out, method=args.method, data=args.data, activation=args.activation, n_points=args.points,
        seed=args.seed, backend=args.backend, overwrite=args.overwrite, use_repair=args.repair, progress=not args.quiet,
    )
    print(report["models"]["architecture"])
    _print_report(report)
    return 0


def _cmd_describe(args: argparse.Namespace) -> int:
    from .adapters import infer_spec, spec_from_hf
    from .graph import describe_blocks
    from .io import load_state_dict

    target = Path(args.target)
    if target.is_dir() or target.suffix == ".json":
        spec = spec_from_hf(target if target.is_dir() else _config_from_json(target))
    else:
        inferred = infer_spec(load_state_dict(target), activation=args.activation)
        print(inferred.explanation)
        spec = inferred.spec
    print(describe_blocks(spec))
    if args.verbose:
        print(spec.describe())
    return 0


def _config_from_json(path: Path):
    """A transformers config from a ``config.json`` file (offline)."""
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
    except (OSError, ValueError, KeyError) as exc:
        raise SymmError(f"{path}: not a readable config.json with a model_type ({exc})") from None
    try:
        return AutoConfig.for_model(model_type, **data)
    except ValueError:
        from .errors import UnsupportedArchitecture
        from .adapters.hf import FAMILIES

        raise UnsupportedArchitecture(f"{path}: unknown model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symm", description="Weight-space symmetry catalogue and model alignment.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more output and INFO logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train two MLPs on digits, align them, plot the barrier (embedded default job)")
    demo.add_argument("--width", type=int, default=512)
    demo.add_argument("--depth", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--method", choices=["weights", "activations"], default="weights")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    al = sub.add_parser("align", help="align checkpoint B onto A and plot the linear-mode-connectivity barrier")
    al.add_argument("a", help="checkpoint A: .safetensors/.pt state dict or Hugging Face folder")
    al.add_argument("b", help="checkpoint B (same architecture)")
    al.add_argument("--method", choices=["weights", "activations"], default="weights")
    al.add_argument("--data", choices=["digits", "mnist1d", "text"], help="evaluation data (default: digits/mnist1d by input size; text for LMs)")
    al.add_argument("--activation", help="activation of a bare dense chain (default relu)")
    al.add_argument("--out", default="align_out", help="output folder (default: align_out)")
    al.add_argument("--points", type=int, default=25, help="interpolation points (default 25)")
    al.add_argument("--seed", type=int, default=0)
    al.add_argument("--backend", choices=["auto", "scipy", "lapx"], default="auto", help="linear-assignment solver")
    al.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never overwritten)")
    al.add_argument("--repair", action="store_true", help="also plot the aligned path with REPAIR renormalisation of hidden units")
    al.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    al.set_defaults(func=_cmd_align)

    describe = sub.add_parser("describe", help="print the symmetry group of a checkpoint")
    describe.add_argument("target", help="a Hugging Face model folder or config.json, or a .pt/.pth/.bin/.safetensors state dict")
    describe.add_argument("--activation", help="activation of a bare dense chain (relu adds scaling; default: permutations only)")
    describe.set_defaults(func=_cmd_describe)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SymmError as exc:
        print(f"symm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
