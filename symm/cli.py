"""Command line: ``symm demo``, ``symm align``, ``symm merge``, ``symm describe``, ``symm untie``, ``symm laws``, ``symm zoo`` and
``symm metanet``.

Every failure ends with one line ``symm: error: ...`` and exit status 2 (130 on Ctrl-C), never a traceback
(``-v`` logs it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .cli_types import int_at_least, non_negative, non_negative_float, positive, positive_float
from .errors import SymmError
from .graph import describe

log = logging.getLogger("symm.cli")

ACTIVATIONS = ["relu", "leaky_relu", "tanh", "gelu", "silu", "any"]


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


def _quiet_libraries() -> None:
    """``-q``: no progress bars or advisory logging from transformers / huggingface_hub either."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if "transformers" in sys.modules:  # already imported: its environment variables were read
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _cmd_align(args: argparse.Namespace) -> int:
    from aligners.job import align

    if args.quiet:
        _quiet_libraries()

    report = align(
        args.a, args.b, args.out, method=args.method, data=args.data, activation=args.activation, n_points=args.points,
        seed=args.seed, backend=args.backend, overwrite=args.overwrite, use_repair=args.repair, stream=args.stream,
        progress=not args.quiet, max_tokens=args.max_tokens, max_samples=args.max_samples,
        barrier=args.barrier, device=args.device, learn_steps=args.learn_steps, learn_from=args.learn_from,
    )
    print(report["models"]["architecture"])
    if report.get("barrier") == "none":
        _print_unmeasured(report)
        return 0
    _print_report(report)
    return 0


def _print_unmeasured(report: dict) -> None:
    """``--barrier none``: the matching and the function check; no curves."""
    t = report["timings_s"]
    print(f"{report['method']} matching, {report['sweeps']} sweeps, {t['align']:.2f} s (total {t['total']:.1f} s, "
          f"device {report.get('device', 'cpu')}); barrier not measured (--barrier none)")
    print(f"aligned B computes B's function: relative output error {report['function_check']['max_relative_error']:.1e}")
    outs = report["outputs"]
    print(f"wrote {outs['aligned']}, {outs['report']}")


def _merge_weights(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def _cmd_merge(args: argparse.Namespace) -> int:
    from aligners.merge_job import merge

    if args.quiet:
        _quiet_libraries()
    report = merge(args.inputs, args.out, method=args.method, weights=args.weights, data=args.data, activation=args.activation,
                   max_rounds=args.rounds, ste_steps=args.ste_steps, seed=args.seed, backend=args.backend, overwrite=args.overwrite, progress=not args.quiet)
    print(report["architecture"])
    print(f"{report['method']} matching (MergeMany): {report['rounds']} rounds, converged {report['converged']}, "
          f"{report['timings_s']['align']:.2f} s; data: {report['data']}")
    for i, m in enumerate(report["models"]):
        print(f"input {i}: loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f}  ({m['path']})")
    for name in ("naive_average", "merged"):
        print(f"{name.replace('_', ' ')}: loss {report[name]['loss']:.4f}  accuracy {report[name]['accuracy']:.4f}")
    outs = report["outputs"]
    print(f"wrote {outs['merged']}, {len(outs['aligned'])} aligned inputs, {outs['report']}, {outs['plot']}")
    return 0


def _spec_of_target(args: argparse.Namespace, mode: str = "eval"):
    """The Spec of ``args.target``: an HF folder or config.json, a bare state dict, or a reference model name.

    ``mode="train"`` (laws): a reference model's training-mode spec (adds BatchNorm filter scales)."""
    from .adapters import infer_spec, spec_from_hf
    from .io import load_state_dict
    from .models import spec_for
    from .models.named import NAMED_CONFIGS, named_config

    target = Path(args.target)
    if not target.exists():
        if args.target in NAMED_CONFIGS or not any(c in args.target for c in "/\\."):
            return spec_for(named_config(args.target), mode=mode)
        raise SymmError(f"{target}: no such file or folder")
    if target.is_dir():
        return _describe_folder(target)
    if target.suffix == ".json":
        return spec_from_hf(_config_from_json(target))
    inferred = infer_spec(load_state_dict(target), activation=None if args.activation == "any" else args.activation)
    print(inferred.explanation)
    return inferred.spec


def _cmd_describe(args: argparse.Namespace) -> int:
    from .graph import describe_blocks

    spec = _spec_of_target(args)
    print(describe_blocks(spec))
    if args.verbose:
        print(describe(spec))
    return 0


def _cmd_untie(args: argparse.Namespace) -> int:
    from .untie import untie

    if args.quiet:
        _quiet_libraries()
    report = untie(args.source, args.out)
    print(f"wrote {report['out']}: {report['lm_head']} is now a copy of {report['embedding']} (tie_word_embeddings false); "
          f"logits unchanged (relative difference {report['logits_difference']:.1e})")
    return 0


def _cmd_laws(args: argparse.Namespace) -> int:
    if args.target == "verify":
        return _cmd_laws_verify(args)
    from .laws import describe_laws

    print(describe_laws(_spec_of_target(args, mode="train")))
    return 0


def _cmd_laws_verify(args: argparse.Namespace) -> int:
    from .laws_verify import verify

    report = verify(
        args.out, model_name=args.model, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        steps=args.steps, every=args.every, seed=args.seed, progress=not args.quiet, controls=args.controls,
    )
    print(f"{report['model']} ({report['spec']}), {report['optimizer']} lr={report['lr']} weight decay={report['weight_decay']}, "
          f"{report['steps']} steps, {report['n_laws']} laws, {report['dtype']} (residual tolerance {report['tolerance']:.0e}"
          + ("; the model does not run in float64" if report["dtype"] != "float64" else "") + ")")
    for fam in report["families"]:
        print(f"  {fam['factor']}: {fam['laws']} {fam['kind']} laws, max |drift| {fam['max_relative_drift']:.2e}, "
              f"max |residual| {fam['max_residual']:.2e}, Noether {fam['noether']:.1e}: {fam['verdict']}")
    for c in report.get("controls", []):
        print(f"  control {c['control']} ({c['count']}): max |drift| {c['max_relative_drift']:.2e}, max |residual| {c['max_residual']:.2e}, "
              f"Noether {c['noether']:.1e}: {c['verdict']}")
    print(f"wrote {Path(args.out) / 'report.json'}, {Path(args.out) / 'laws.png'}")
    return 0


def _describe_folder(folder: Path):
    """The Spec of a Hugging Face folder, after checking its config and every weight file (lengths, NaN/Inf)."""
    from .adapters import spec_from_hf
    from .checkpoint import check_hf_weights, hf_config

    if not (folder / "config.json").is_file():
        raise SymmError(f"{folder}: not a Hugging Face model folder (no config.json)")
    spec = spec_from_hf(hf_config(folder))
    files, tensors = check_hf_weights(folder)
    if files:
        print(f"weights: {tensors} tensors in {files} file(s), complete and finite")
    else:
        print("weights: none in this folder (described from config.json only)")
    return spec


def _config_from_json(path: Path):
    """A transformers config from a ``config.json`` file (offline)."""
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
        model_type = data.pop("model_type")
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise SymmError(f"{path}: not a readable config.json with a model_type ({exc})") from None
    try:
        return AutoConfig.for_model(model_type, **data)
    except (ValueError, TypeError):
        from .errors import UnsupportedArchitecture
        from .adapters.hf import FAMILIES

        raise UnsupportedArchitecture(f"{path}: unknown model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="symm", description="Weight-space symmetry catalogue and model alignment.")
    parser.add_argument("-v", "--verbose", action="store_true", help="more output and INFO logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train two MLPs on digits, align them, plot the barrier (embedded default job)")
    demo.add_argument("--width", type=positive, default=512)
    demo.add_argument("--depth", type=positive, default=2)
    demo.add_argument("--epochs", type=positive, default=30)
    demo.add_argument("--seed", type=non_negative, default=0)
    demo.add_argument("--method", choices=["weights", "activations"], default="weights")
    demo.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    al = sub.add_parser("align", help="align checkpoint B onto A and plot the linear-mode-connectivity barrier")
    al.add_argument("a", help="checkpoint A: .safetensors/.pt state dict or Hugging Face folder")
    al.add_argument("b", help="checkpoint B (same architecture)")
    al.add_argument("--method", choices=["weights", "activations", "learned"], default="weights",
                    help="weight matching (default), activation matching, or learned: weight matching, then the continuous "
                         "factors and the stream O fitted to the midpoint loss on the training windows (language models)")
    al.add_argument("--learn-steps", type=positive, default=1000, metavar="N",
                    help="--method learned: at most N gradient steps (it stops earlier when the held-out midpoint loss stops "
                         "improving; default 1000)")
    al.add_argument("--learn-from", choices=["text", "generated"], default="text",
                    help="--method learned: fit on windows of the evaluation text's training half (default), or on as many "
                         "windows sampled from A and B themselves (temperature 1, half from each): no data needed")
    al.add_argument("--data", metavar="digits|mnist1d|text|FILE|DIR",
                    help="evaluation data: a dataset name, a UTF-8 text file (language models; tokenised by the folder's own "
                         "tokenizer, else bytes), or tensors for classifiers (a .npz/.safetensors file with 'inputs' and "
                         "'labels', split 80/20, or a folder with train.* and test.*; a ViT takes images [n, C, H, W] or flattened). "
                         "Default: digits/mnist1d by input size (digits for a ViT); for language models the shipped "
                         "Shakespeare text, through the folder's tokenizer if it has one")
    al.add_argument("--max-tokens", type=positive, metavar="N",
                    help="language models: use the first N tokens of the text (default 200000; "
                         "without a tokenizer the shipped default text is used whole)")
    al.add_argument("--max-samples", type=positive, metavar="N",
                    help="classifiers (dense and ViT): at most N samples per split (a seeded random subset; default: all)")
    al.add_argument(
        "--activation",
        choices=ACTIVATIONS,
        help="activation of a bare dense chain (state dicts only). Default: unknown, so only permutations are used "
        "(true for every activation) and the barrier is evaluated with relu; relu/leaky_relu add positive scalings, "
        "tanh adds sign flips, gelu/silu permutations only",
    )
    al.add_argument("--out", default="align_out", help="output folder (default: align_out); created, or must be a folder")
    al.add_argument("--points", type=int_at_least(2, "the endpoints A and B"), default=25, help="interpolation points, at least 2 (default 25)")
    al.add_argument("--seed", type=non_negative, default=0)
    al.add_argument("--backend", choices=["auto", "jv", "scipy", "lapx"], default="auto",
                    help="linear-assignment solver (default auto: jv, our warm-started exact solver, from 512 units; scipy below)")
    al.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never overwritten)")
    al.add_argument("--stream", choices=["permutation", "signed", "orthogonal"],
                    help="residual-stream group: permutations only, signed permutations (RMSNorm streams), or "
                         "orthogonal after folding the norm gains (untied RMSNorm and LayerNorm decoders, O 1 = 1 for "
                         "LayerNorm; the aligned B carries A's gains). Default: the largest the model allows "
                         "(orthogonal where allowed, else signed, else permutation); with --barrier none on safetensors folders, the "
                         "catalogue's group (signed or permutation): the streaming path keeps billion-parameter models in "
                         "float32")
    al.add_argument("--repair", action="store_true", help="also plot the aligned path with REPAIR renormalisation of hidden units")
    al.add_argument("--barrier", choices=["full", "none"], default="full",
                    help="full (default): measure and plot the naive and aligned barrier curves; none: skip them (no plot). "
                         "With none, Hugging Face safetensors folders are aligned without instantiating the models "
                         "(memory-mapped weights, aligned B written shard by shard): billion-parameter models on one machine")
    al.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where the score matmuls run: auto (a CUDA GPU when present, else cpu), cpu, or cuda "
                         "(an error without a GPU)")
    al.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    al.set_defaults(func=_cmd_align)

    mg = sub.add_parser("merge", help="align N checkpoints into the first one's frame (MergeMany) and average them")
    mg.add_argument("inputs", nargs="+", help="checkpoints (at least 2): .safetensors/.pt state dicts or Hugging Face folders, one architecture")
    mg.add_argument("--method", choices=["weights", "activations", "ste"], default="weights",
                    help="weight matching (default), activation matching, or straight-through estimation (state-dict classifiers)")
    mg.add_argument("--weights", type=_merge_weights, help="comma-separated positive weights of the average, one per input (default: uniform)")
    mg.add_argument("--data", choices=["digits", "mnist1d", "text"], help="evaluation data (default: digits/mnist1d by input size; text for LMs)")
    mg.add_argument("--activation", choices=ACTIVATIONS, help="activation of a bare dense chain (state dicts only; see `symm align --help`)")
    mg.add_argument("--rounds", type=positive, default=20, help="most MergeMany rounds (default 20; stops earlier when a round changes nothing)")
    mg.add_argument("--ste-steps", type=positive, default=100, help="STE optimisation steps per match (default 100)")
    mg.add_argument("--out", default="merge_out", help="output folder (default: merge_out); created, or must be a folder")
    mg.add_argument("--seed", type=non_negative, default=0)
    mg.add_argument("--backend", choices=["auto", "jv", "scipy", "lapx"], default="auto", help="linear-assignment solver")
    mg.add_argument("--overwrite", action="store_true", help="replace existing outputs (inputs are never overwritten)")
    mg.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    mg.set_defaults(func=_cmd_merge)

    describe = sub.add_parser("describe", help="print the symmetry group of a checkpoint")
    describe.add_argument("target", help="a Hugging Face model folder or config.json, or a .pt/.pth/.bin/.safetensors state dict")
    describe.add_argument(
        "--activation", choices=ACTIVATIONS, help="activation of a bare dense chain (relu adds scaling; default: unknown, permutations only)"
    )
    describe.set_defaults(func=_cmd_describe)

    untie_p = sub.add_parser("untie", help="write an untied copy of a tied checkpoint (LM head = a copy of the embedding): "
                             "the same function, and the orthogonal residual stream of `symm align` applies to it")
    untie_p.add_argument("source", help="a Hugging Face folder with tied embeddings (never modified)")
    untie_p.add_argument("out", help="the new folder to write (must not exist)")
    untie_p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    untie_p.set_defaults(func=_cmd_untie)

    laws = sub.add_parser("laws", help="list the conservation laws of gradient flow that a model's symmetries imply")
    laws.add_argument("target", help="`verify` (train and check, options below), or a Hugging Face folder or config.json, a state dict, or a reference model name (e.g. mlp-relu, attention-rope, moe-softmax) to list its laws")
    laws.add_argument("--activation", choices=ACTIVATIONS, help="activation of a bare dense chain (default: unknown, permutations only: no laws)")
    verify = laws.add_argument_group("symm laws verify: train a reference model and check every law against its exact SGD step")
    verify.add_argument("--model", default="mlp-relu", help="reference model name (default mlp-relu; see `symm laws NAME`) or hf:FOLDER")
    verify.add_argument("--optimizer", choices=["sgd", "momentum", "adam", "adamw"], default="sgd")
    verify.add_argument("--lr", type=positive_float, help="learning rate (default: 0.1 sgd, 0.05 momentum, 1e-3 adam/adamw)")
    verify.add_argument("--weight-decay", type=non_negative_float, default=0.0)
    verify.add_argument("--steps", type=positive, default=100)
    verify.add_argument("--every", type=positive, default=1, help="track every N-th step")
    verify.add_argument("--seed", type=non_negative, default=0)
    verify.add_argument("--controls", action="store_true", help="also track quantities that are NOT laws, for contrast (report key 'controls')")
    verify.add_argument("--out", default="laws_out", help="output folder (default laws_out)")
    verify.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    laws.set_defaults(func=_cmd_laws)

    from .zoo.cli import add_zoo_parser

    add_zoo_parser(sub)
    from metanets.cli import add_metanet_parser

    add_metanet_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except SymmError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("symm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. ``head``: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        return _fail(f"{exc.strerror or exc}{where}")
    except MemoryError:
        return _fail("out of memory")
    except Exception as exc:  # noqa: BLE001 - never a traceback; -v logs it
        log.info("traceback of the error above:", exc_info=True)
        return _fail(f"unexpected {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} (rerun with -v for details)")


def _fail(message: str) -> int:
    print(f"symm: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
