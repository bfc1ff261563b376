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
    from .io import atomic_write_text

    r = run_demo(width=args.width, depth=args.depth, epochs=args.epochs, seed=args.seed, progress=not args.quiet)
    print(r.spec_description if args.verbose else r.spec_description.split("parameters (")[0].rstrip())
    print()
    print(f"two ReLU MLPs on digits: test accuracy A {r.accuracy_a:.3f}, B {r.accuracy_b:.3f}; relative weight distance |A-B|/|A| = {r.distance_a_b:.3f}")
    print(f"random group element g (permutations x positive scalings, {r.continuous_dimension} continuous dims):")
    print(f"  weights moved by |g.A - A|/|A| = {r.weight_change_relative:.3f}")
    print(f"  logits unchanged: max relative error {r.logit_relative_error:.2e}; accuracy {r.accuracy_transformed:.3f}")
    print(f"  negative control (first layer permuted on one side only): accuracy {r.one_sided_accuracy:.3f}")
    if args.out:
        path = atomic_write_text(Path(args.out) / "demo.json", json.dumps(r.to_dict(), indent=2) + "\n")
        print(f"report: {path}")
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

    demo = sub.add_parser("demo", help="train two MLPs on digits and check a random symmetry (embedded default job)")
    demo.add_argument("--width", type=int, default=128)
    demo.add_argument("--depth", type=int, default=2)
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", help="folder for demo.json")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

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
