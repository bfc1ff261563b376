"""The align job: two checkpoints in, aligned B + barrier report + plot out (``symm align A B``).

Order of work: arguments and outputs are checked first (:func:`aligners.outputs.preflight`), then the output
folder is locked (a concurrent run fails at once), inputs are loaded and validated (formats, same architecture,
same dtypes, finite weights), B is aligned, the aligned B is checked to compute B's function, the barrier is
measured, and the whole result set is written into a staging folder and published at once
(:mod:`symm.publish`). On any error nothing is left in ``--out``.

Half-precision checkpoints are matched and evaluated in float32 (float64 ones in float64) and written back in
their own dtype.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from symm.action import act
from symm.adapters import infer_spec, is_hf_folder, spec_from_hf
from symm.adapters.hf.encoders import is_encoder
from symm.adapters.infer import DenseChain
from symm.checkpoint import Checkpoint, hf_architecture_difference, hf_config, load_checkpoint
from symm.data import Split, TokenSplit, digits, mnist1d
from symm.errors import CheckpointError, DataError, OutputError, SpecError, UnsupportedArchitecture, UsageError
from symm.evaluate import functional
from symm.io import checkpoint_format, compare_state_dicts
from symm.publish import fault_point, publish, staged_output
from symm.spec import Spec
from symm.train import evaluate_classifier
from symm.user_data import SEQ_LEN, data_kind, folder_tokenizer_tokens, has_tokenizer, limit_samples, load_tensor_split, load_text_tokens

from .activation_matching import activation_matching
from .barrier import has_batchnorm, naive_vs_aligned, reset_batchnorm
from .outputs import check_same_function, check_written, disk_size, make_parents, plan_outputs, preflight, remove_empty, write_results
from .lean_job import lean_inputs, run_lean
from .repair import repair
from .weight_matching import MatchInfo, weight_matching

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "Task", "align", "load_checkpoint", "lm_task", "resolve"]

METHODS = ("weights", "activations", "learned")
#: residual-stream groups a user may ask for (``None``: the largest the model allows)
STREAMS = ("permutation", "signed", "orthogonal")
#: where learned matching's training windows come from: the evaluation text's training half, or sampled from A and B
LEARN_FROM = ("text", "generated")
DATASETS = ("digits", "mnist1d", "text")
#: ``--barrier``: measure the naive and aligned curves, or skip them (no evaluation data, no plot)
BARRIERS = ("full", "none")
DEVICES = ("auto", "cpu", "cuda")
#: seed of the evaluation data (windows, splits, subsets): the same data whatever ``--seed`` the matching uses
DATA_SEED = 0
ACTIVATIONS = ("relu", "leaky_relu", "tanh", "gelu", "silu", "any")
#: an unknown activation is checked under each of these (a permutation-only element must preserve them all)
PROBE_ACTIVATIONS = ("relu", "tanh", "gelu")
Params = Mapping[str, torch.Tensor]


@dataclass
class Task:
    """What the barrier is measured on: a model skeleton, its inputs, an evaluation ``params -> (loss, acc)``,
    and a probe ``params -> [outputs]`` used to check that the aligned model is B's function."""

    model: nn.Module
    data_name: str
    inputs: torch.Tensor  # training inputs (activations, BatchNorm reset)
    evaluate_fn: Callable[[Params], tuple[float, float]] = field(repr=False)
    probe: Callable[[Params], list[torch.Tensor]] | None = field(default=None, repr=False)
    windows: torch.Tensor | None = field(default=None, repr=False)  # LM tasks: (n, seq + 1) training token windows

    def evaluate(self, params) -> tuple[float, float]:
        return self.evaluate_fn(params)


def eval_dtype(params: Params) -> torch.dtype:
    """float64 checkpoints are evaluated in float64, everything else in float32."""
    return torch.float64 if any(v.dtype == torch.float64 for v in params.values()) else torch.float32


def storage_dtype(params: Params) -> torch.dtype:
    return next((v.dtype for v in params.values() if torch.is_floating_point(v)), torch.float32)


def cast(params: Params, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in params.items()}


def _classifier_task(model: nn.Module, split: Split, probe_models: list[nn.Module], dtype: torch.dtype) -> Task:
    x_train, x_test = split.x_train.to(dtype), split.x_test.to(dtype)
    gen = torch.Generator().manual_seed(0)
    x_probe = torch.cat([x_test[:128], torch.randn(32, x_test.shape[1], generator=gen, dtype=dtype)])

    def evaluate(params):
        if has_batchnorm(model):
            params = reset_batchnorm(model, params, x_train)
        return evaluate_classifier(model, params, x_test, split.y_test)

    def probe(params):
        return [functional(m)(dict(params), x_probe) for m in probe_models]

    return Task(model, split.name, x_train, evaluate, probe)


def lm_task(model: nn.Module, tokens: TokenSplit, hf: bool) -> Task:
    """Next-token cross-entropy and accuracy on held-out windows."""
    f = functional(model)
    x, y = tokens.test[:, :-1], tokens.test[:, 1:]

    @torch.no_grad()
    def logits_at(params, inputs=x):
        if hf:
            model.load_state_dict(params)
            return model(inputs).logits
        return f(params, inputs)

    def evaluate(params):
        logits = logits_at(params)
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()
        return loss, (logits.argmax(-1) == y).float().mean().item()

    return Task(model, tokens.name, tokens.train[:, :-1], evaluate, lambda params: [logits_at(params, x[:4])], tokens.train)


def _split(name: str) -> Split:
    return {"digits": digits, "mnist1d": mnist1d}[name]()


def data_path(data: str | None) -> Path | None:
    """``--data`` as a path (``None`` for a dataset name or no ``--data``)."""
    return None if data is None or data in DATASETS else Path(data)


#: what a model is evaluated on: ``text`` (causal LMs, masked-LM encoders), ``images`` (ViT), ``tensors`` (dense classifiers)
DataKind = str


def data_kind_of(path_a: Path, path_b: Path) -> DataKind:
    """The evaluation data a pair takes, from its configs only (cheap, before loading weights)."""
    from symm.adapters.hf.encoders import IMAGE_CLASSIFIERS

    for p in (path_a, path_b):
        if is_hf_folder(p):
            return "images" if getattr(hf_config(p), "model_type", None) in IMAGE_CLASSIFIERS else "text"
    return "tensors"


def check_data(data: str | None, kind: DataKind, max_tokens: int | None = None, max_samples: int | None = None) -> None:
    """The data and budgets fit the kind of model (``text``, ``images`` or ``tensors``); cheap, before any work."""
    path = data_path(data)
    if kind == "text":
        if max_samples is not None:
            raise UsageError("--max-samples applies to classifier data; a language model's text is budgeted by --max-tokens")
        if path is not None and data_kind(path) == "tensors":
            raise DataError(f"--data {path}: tensors (a .npz/.safetensors file or a folder) are classifier data; "
                            "a language model is evaluated on a UTF-8 text file")
        if path is None and data not in (None, "text"):
            raise CheckpointError(f"language models are evaluated on --data text or a text file, not {data!r}")
        return
    if max_tokens is not None:
        raise UsageError("--max-tokens applies to a language model's text; classifier data is budgeted by --max-samples")
    if path is not None and data_kind(path) == "text":
        what = "an image classifier is evaluated on image tensors [n, C, H, W]" if kind == "images" else "a dense classifier is evaluated on tensors"
        raise DataError(f"--data {path}: a text file is language-model data; {what} (a .npz/.safetensors file, or a folder "
                        "with train.* and test.*)")
    if kind == "images" and path is None and data not in (None, "digits"):
        raise CheckpointError(f"an image classifier is evaluated on --data digits or your own image tensors, not {data!r}")


def _tokenizer_folder(a: Checkpoint, b: Checkpoint) -> Path:
    """The folder whose tokenizer reads the text: A's, or B's if only B ships one."""
    return a.path if has_tokenizer(a.path) or not has_tokenizer(b.path) else b.path


def context_length(config) -> int:
    """Evaluation window: :data:`SEQ_LEN` tokens, or fewer when the model has fewer positions (learned PE)."""
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    return min(SEQ_LEN, int(limit)) if limit else SEQ_LEN


def _resolve_hf(
    a: Checkpoint, b: Checkpoint, data: str | None, dtype: torch.dtype, max_tokens: int | None = None, max_samples: int | None = None
) -> tuple[Spec, Task, str]:
    if a.fmt != b.fmt:
        raise CheckpointError(f"cannot align a Hugging Face folder with a bare state dict ({a.path} is {a.fmt}, {b.path} is {b.fmt})")
    difference = hf_architecture_difference(a, b)
    if difference:
        raise SpecError(difference)
    compare_state_dicts(a.params, b.params, (str(a.path), str(b.path)))
    spec = spec_from_hf(a.model)
    if is_encoder(a.model.config):
        return _resolve_hf_encoder(a, b, spec, data, dtype, max_tokens, max_samples)
    vocab, folder, path = a.model.config.vocab_size, _tokenizer_folder(a, b), data_path(data)
    seq_len = context_length(a.model.config)
    if path is None:
        tokens = folder_tokenizer_tokens(folder, vocab, max_tokens=max_tokens, seed=DATA_SEED, seq_len=seq_len)
    else:
        tokens = load_text_tokens(path, folder, vocab, max_tokens=max_tokens, seed=DATA_SEED, seq_len=seq_len)
    a.model.to(dtype)  # evaluation model (B's model keeps its dtype for saving)
    kind = f"Hugging Face {a.model.config.model_type} causal LM ({spec.name})"
    return spec, lm_task(a.model, tokens, hf=True), kind


def _resolve_hf_encoder(a: Checkpoint, b: Checkpoint, spec: Spec, data: str | None, dtype: torch.dtype,
                        max_tokens: int | None = None, max_samples: int | None = None) -> tuple[Spec, Task, str]:
    """Encoders (:mod:`symm.adapters.hf.encoders`): BERT / RoBERTa on masked-LM loss and accuracy (15% of the positions
    of each text window replaced by the mask token, seeded), ViT on classification loss and accuracy on the user's
    image tensors (``--data``, ``[n, C, H, W]``) or scikit-learn digits (8x8 images, grey replicated over the channels)."""
    from symm.adapters.hf import encoders as enc

    model, config = a.model, a.model.config
    kind = f"Hugging Face {config.model_type} {enc.architecture(config)} ({spec.name})"
    model.to(dtype)  # evaluation model (B's model keeps its dtype for saving)

    @torch.no_grad()
    def logits_at(params, inputs):
        model.load_state_dict(params)
        return model(inputs).logits

    if config.model_type in enc.IMAGE_CLASSIFIERS:
        path = data_path(data)
        if path is None:
            split = limit_samples(Split(*enc.digit_images(config, seed=DATA_SEED), 10, "digits (8x8 images)"), max_samples, DATA_SEED)
        else:
            split = _user_images(path, config, max_samples)
        x_train, x_test, y_test = split.x_train.to(dtype), split.x_test.to(dtype), split.y_test

        def evaluate(params):
            logits = logits_at(params, x_test)
            loss = nn.functional.cross_entropy(logits.float(), y_test).item()
            return loss, (logits.argmax(-1) == y_test).float().mean().item()

        task = Task(model, split.name, x_train, evaluate, lambda params: [logits_at(params, x_test[:32])])
        return spec, task, kind
    folder, path = _tokenizer_folder(a, b), data_path(data)
    tokenizer = has_tokenizer(folder)
    vocab = config.vocab_size if tokenizer else config.vocab_size - 1  # bytes fold below the mask id
    mask_id = enc.mask_token_id(config, folder if tokenizer else None)
    seq_len = min(SEQ_LEN, enc.mlm_context(config)) - 1  # windows of seq_len + 1 tokens fit the positions
    if path is None:
        tokens = folder_tokenizer_tokens(folder, vocab, max_tokens=max_tokens, seed=DATA_SEED, seq_len=seq_len)
    else:
        tokens = load_text_tokens(path, folder, vocab, max_tokens=max_tokens, seed=DATA_SEED, seq_len=seq_len)
    x, y = enc.mask_windows(tokens.test, mask_id, seed=DATA_SEED)
    x_train, _ = enc.mask_windows(tokens.train, mask_id, seed=DATA_SEED + 1)
    chosen = y != -100

    def evaluate(params):
        logits = logits_at(params, x)[chosen]
        loss = nn.functional.cross_entropy(logits.float(), y[chosen]).item()
        return loss, (logits.argmax(-1) == y[chosen]).float().mean().item()

    name = f"masked LM ({round(100 * enc.MASK_FRACTION)}% of positions masked with id {mask_id}) on {tokens.name}"
    return spec, Task(model, name, x_train, evaluate, lambda params: [logits_at(params, x[:4])]), kind


def _user_images(path: Path, config, max_samples: int | None) -> Split:
    """Image tensors ``[n, C, H, W]`` (or flattened) that fit a ViT's ``num_channels`` x ``image_size`` and labels."""
    from symm.adapters.hf.encoders import image_shape

    split = load_tensor_split(path, max_samples=max_samples, seed=DATA_SEED, sample_shape=image_shape(config))
    if split.n_classes > config.num_labels:
        raise DataError(f"--data {path} has labels up to {split.n_classes - 1} ({split.n_classes} classes); the model has "
                        f"{config.num_labels} outputs")
    return split


def _user_split(path: Path, d_in: int, d_out: int, max_samples: int | None) -> Split:
    """A tensor file or folder that fits a ``d_in -> d_out`` classifier."""
    split = load_tensor_split(path, max_samples=max_samples, seed=DATA_SEED)
    if split.x_train.shape[1] != d_in:
        raise DataError(f"--data {path} has {split.x_train.shape[1]} inputs per sample; the model takes {d_in}")
    if split.n_classes > d_out:
        raise DataError(f"--data {path} has labels up to {split.n_classes - 1} ({split.n_classes} classes); the model has {d_out} outputs")
    return split


def resolve(
    a: Checkpoint, b: Checkpoint, activation: str | None, data: str | None, *, max_tokens: int | None = None, max_samples: int | None = None
) -> tuple[Spec, Task, str]:
    """Spec and task for the pair, or a clear error if they are not the same architecture or the data does not fit.

    A bare state dict's activation is unknown unless given: its Spec then holds permutations only (true for
    every elementwise activation), and the barrier is evaluated with ReLU (said in the explanation).
    ``data``: a dataset name, a text file (language models) or tensors (classifiers; see :mod:`symm.user_data`).
    """
    dtype = eval_dtype(b.params)
    hf = a.fmt == "hf" or b.fmt == "hf"
    check_data(data, data_kind_of(a.path, b.path), max_tokens, max_samples)
    if hf:
        return _resolve_hf(a, b, data, dtype, max_tokens, max_samples)
    compare_state_dicts(a.params, b.params, (str(a.path), str(b.path)))
    inferred = infer_spec(a.params, activation=None if activation == "any" else activation)
    model = DenseChain(inferred).to(dtype).eval()
    d_in, d_out = inferred.sizes[0], inferred.sizes[-1]
    path = data_path(data)
    if path is not None:
        split = _user_split(path, d_in, d_out, max_samples)
    else:
        name = data or {64: "digits", 40: "mnist1d"}.get(d_in)
        if name is None or name not in ("digits", "mnist1d"):
            raise CheckpointError(f"no embedded dataset for a {d_in}->{d_out} dense model; pass --data digits|mnist1d with "
                                  "matching sizes, or your own tensors (--data FILE|DIR)")
        split = _split(name)
        if split.x_train.shape[1] != d_in or split.n_classes != d_out:
            raise CheckpointError(f"--data {name} has {split.x_train.shape[1]} inputs and {split.n_classes} classes; the model is {d_in}->{d_out}")
        split = limit_samples(split, max_samples, DATA_SEED)
    acts = PROBE_ACTIVATIONS if inferred.activation == "any" else (inferred.activation,)
    probes = [DenseChain(inferred, activation=fn).to(dtype).eval() for fn in acts]
    explanation = inferred.explanation
    if inferred.activation == "any":
        explanation += "; barrier evaluated with relu (the true activation is unknown; pass --activation)"
    return inferred.spec, _classifier_task(model, split, probes, dtype), explanation


def _check_budget(flag: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise UsageError(f"{flag} must be a positive integer, got {value!r}")


def check_learn_from(learn_from: str, method: str, path_a: Path, path_b: Path) -> None:
    """``--learn-from generated`` samples windows from causal LMs for learned matching; anything else is refused
    (from the configs only, before any weights are read)."""
    if learn_from not in LEARN_FROM:
        raise UsageError(f"--learn-from must be one of {', '.join(LEARN_FROM)}, got {learn_from!r}")
    if learn_from == "text":
        return
    if method != "learned":
        raise UsageError(f"--learn-from generated picks the windows of --method learned; it does nothing with --method {method}")
    causal = data_kind_of(path_a, path_b) == "text" and not any(is_hf_folder(p) and is_encoder(hf_config(p)) for p in (path_a, path_b))
    if not causal:
        raise UsageError("--learn-from generated samples token windows from the two models: it needs causal language models "
                         "(Hugging Face decoder folders)")


def check_arguments(
    method: str, n_points: int, activation: str | None, data: str | None, stream: str | None = None,
    max_tokens: int | None = None, max_samples: int | None = None,
) -> None:
    """Argument checks made before anything is read or written; ``data`` is a dataset name or an existing path."""
    if stream is not None and stream not in STREAMS:
        raise UsageError(f"--stream must be one of {', '.join(STREAMS)}, got {stream!r}")
    if method not in METHODS:
        raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
        raise UsageError(f"--points must be an integer of at least 2 (the endpoints A and B), got {n_points!r}")
    if activation is not None and activation not in ACTIVATIONS:
        raise UsageError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    path = data_path(data)
    if path is not None and not path.exists():
        raise DataError(f"--data {data}: no such file or folder (and not a dataset name: {', '.join(DATASETS)})")
    _check_budget("--max-tokens", max_tokens)
    _check_budget("--max-samples", max_samples)


def resolve_device(device: str) -> str:
    """``--device``: ``auto`` is ``cuda`` when a GPU is present, else ``cpu``; ``cuda`` without one is a usage error."""
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise UsageError("--device cuda: no CUDA GPU is available to torch here; use --device cpu (or auto)")
    return "cuda" if device == "cuda" or (device == "auto" and available) else "cpu"


def check_barrier(barrier: str, use_repair: bool) -> None:
    if barrier not in BARRIERS:
        raise UsageError(f"--barrier must be one of {', '.join(BARRIERS)}, got {barrier!r}")
    if barrier == "none" and use_repair:
        raise UsageError("--repair adds a barrier curve; it cannot be combined with --barrier none")


def _check_input_kind(path: Path) -> None:
    """Cheap checks of an input path before anything else: it exists and is a kind of checkpoint we read."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        if not is_hf_folder(path):
            raise CheckpointError(f"{path}: a folder without config.json is not a checkpoint")
    else:
        checkpoint_format(path)


def stream_signs(spec: Spec) -> list[str]:
    """The sign-flip factors of residual streams (children of a permutation named ``*stream``)."""
    return [n for n, f in spec.factors.items() if f.kind == "sign-flip" and (f.parent or "").endswith("stream")]


def stream_group(spec: Spec, stream: str | None) -> tuple[str, dict[str, torch.Tensor]]:
    """The stream group used (``signed``, ``permutation`` or ``none``) and the factors it fixes at the identity."""
    signs = stream_signs(spec)
    has_stream = any(f.kind == "permutation" and n.endswith("stream") for n, f in spec.factors.items())
    if stream == "signed" and not signs:
        raise UsageError("--stream signed: this model's residual stream allows no per-channel signs "
                         "(LayerNorm centres the stream, or the stream is pinned); use --stream permutation")
    if stream == "orthogonal":
        return "orthogonal", {}
    if stream == "permutation":
        return "permutation", {n: spec.factors[n].identity() for n in signs}
    return ("signed" if signs else "permutation" if has_stream else "none"), {}


def orthogonal_layout(a: Checkpoint, pa):
    """The stream layout of A for the orthogonal stream (:func:`symm.folding.layout_for`); raises with the reason
    when the model does not allow it (not a Hugging Face folder, tied embeddings, unsupported family)."""
    from symm.folding import layout_for

    if a.fmt != "hf":
        raise UsageError("--stream orthogonal needs Hugging Face folders (untied GPT-2, Llama, Mixtral, Qwen2-MoE)")
    return layout_for(a.model, pa)


def default_stream(a: Checkpoint, pa, method: str) -> str | None:
    """The largest stream group the model allows: ``orthogonal`` when its layout derives, else ``None`` (signed
    or plain permutations, from the Spec)."""
    try:
        orthogonal_layout(a, pa)
    except (UsageError, UnsupportedArchitecture, SpecError) as exc:
        log.info("orthogonal stream not available (%s): using the catalogue's stream group", exc)
        return None
    return "orthogonal"


def _match_orthogonal(a: Checkpoint, spec: Spec, pa, pb, b_params, seed, backend, progress, info, task: Task | None = None
                      ) -> tuple[dict, dict]:
    """Fold the norm gains, match the stream O by Procrustes (alternated with weight matching, or on activations
    when ``task`` is given), unfold with A's gains (:mod:`aligners.orthogonal_stream`); tied models are refused."""
    from .orthogonal_stream import match_orthogonal, match_orthogonal_activations

    layout = orthogonal_layout(a, pa)
    if task is not None:
        result = match_orthogonal_activations(spec, layout, task.model, pa, pb, task.inputs, seed=seed, backend=backend, progress=progress)
    else:
        result = match_orthogonal(spec, layout, pa, pb, seed=seed, backend=backend, progress=progress)
    info.sweeps, info.converged = result.rounds, result.converged
    return result(b_params), {"rounds": result.rounds, "stream_objectives": result.objectives, "folded_distances": result.distances}


def _match_learned(a: Checkpoint, spec: Spec, task: Task, pa, pb, b_params, stream_used: str, fixed, seed, backend, progress,
                   info, steps: int = 1000, learn_from: str = "text") -> tuple[dict, dict]:
    """Weight matching (with the orthogonal stream when used), then the continuous factors and O learned on the
    midpoint loss of the training windows (:mod:`aligners.learned`): the text's, or as many sampled from A and B
    themselves (``learn_from="generated"``, :mod:`aligners.generated`)."""
    from .learned import learned_matching
    from .orthogonal_stream import match_orthogonal

    if task.windows is None:
        raise UsageError("--method learned fits the loss of the midpoint model on token windows: it needs a language "
                         "model (Hugging Face folders)")
    layout = O = None
    if stream_used == "orthogonal":
        layout = orthogonal_layout(a, pa)
        start = match_orthogonal(spec, layout, pa, pb, seed=seed, backend=backend, progress=progress)
        g, O = start.g, start.O
        info.sweeps, info.converged = start.rounds, start.converged
    else:
        g = weight_matching(spec, pa, pb, seed=seed, backend=backend, progress=progress, info=info, fixed=fixed or None)
    windows = task.windows
    if learn_from == "generated":
        from .generated import sample_windows

        windows = sample_windows(task.model, [pa, pb], windows.shape[0], windows.shape[1], seed=seed, progress=progress)
    result = learned_matching(spec, task.model, pa, pb, windows, init=g, layout=layout, O=O, steps=steps, seed=seed, progress=progress)
    summary = result.summary() | {"windows": {"source": learn_from, "count": windows.shape[0], "tokens": windows.shape[1]}}
    return result(b_params), summary


def _match(method, spec, task, pa, pb, seed, backend, progress, info, fixed=None, device=None):
    if method == "weights":
        return weight_matching(spec, pa, pb, seed=seed, backend=backend, progress=progress, info=info, fixed=fixed, device=device)
    return activation_matching(spec, task.model, pa, pb, task.inputs, seed=seed, backend=backend, progress=progress, info=info, fixed=fixed)


def align(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    method: str = "weights",
    data: str | None = None,
    activation: str | None = None,
    n_points: int = 25,
    seed: int = 0,
    backend: str = "auto",
    overwrite: bool = False,
    use_repair: bool = False,
    stream: str | None = None,
    progress: bool = True,
    max_tokens: int | None = None,
    max_samples: int | None = None,
    barrier: str = "full",
    device: str = "auto",
    learn_steps: int = 1000,
    learn_from: str = "text",
) -> dict:
    """Align B onto A, measure naive vs aligned barriers, write aligned B, ``report.json`` and ``barrier.png``.

    ``barrier="none"``: no barrier curves and no plot. Hugging Face safetensors folders are then aligned without
    instantiating the models (:mod:`aligners.lean_job`: weights memory-mapped, aligned B written shard by shard).
    ``device``: where score matmuls run, ``auto`` (a GPU when present), ``cpu`` or ``cuda``.

    ``stream``: the residual-stream group, ``permutation`` or ``signed`` (default: the largest the model allows).
    ``data``: a dataset name, or a path: a UTF-8 text file for language models (tokenised by the folder's own
    tokenizer; first ``max_tokens`` tokens), tensors for classifiers (at most ``max_samples`` per split)."""
    check_arguments(method, n_points, activation, data, stream, max_tokens, max_samples)
    _check_budget("--learn-steps", learn_steps)
    check_barrier(barrier, use_repair)
    device = resolve_device(device)
    path_a, path_b = Path(path_a), Path(path_b)
    for p in (path_a, path_b):
        _check_input_kind(p)
    check_data(data, data_kind_of(path_a, path_b), max_tokens, max_samples)
    check_learn_from(learn_from, method, path_a, path_b)
    inputs = [path_a, path_b] + ([data_path(data)] if data_path(data) is not None else [])
    plan = plan_outputs(path_b, is_hf_folder(path_b), out_dir, plot=barrier != "none")
    preflight(plan, inputs, None, need_bytes=int(1.1 * disk_size(path_b)) + 1_000_000)
    created = make_parents(plan.real.parent)
    try:  # preflight again under the lock, now with existing outputs
        with staged_output(plan.real, lambda: preflight(plan, inputs, overwrite)) as stage:
            lean = lean_inputs(path_a, path_b) if barrier == "none" and method == "weights" else None
            if lean is not None:  # no models instantiated: memory-mapped weights, B written shard by shard
                return run_lean(lean, stage, plan, seed=seed, backend=backend, progress=progress, stream=stream, device=device)
            outcome = _run(path_a, path_b, plan, method, data, activation, n_points, seed, backend, use_repair, progress, stream,
                           max_tokens, max_samples, barrier, device, learn_steps, learn_from)
            _write_and_publish(stage, plan, outcome)
            return outcome.report
    finally:
        remove_empty(created)


@dataclass
class Outcome:
    """Everything the writer needs from a finished run."""

    report: dict
    b: Checkpoint
    aligned: dict[str, torch.Tensor]  # in B's dtype
    barrier: object
    task: Task
    dtype: torch.dtype  # evaluation dtype
    title: str


def _run(path_a, path_b, plan, method, data, activation, n_points, seed, backend, use_repair, progress, stream=None,
         max_tokens=None, max_samples=None, barrier="full", device=None, learn_steps: int = 1000, learn_from: str = "text") -> "Outcome":
    """Load, align, check the function, measure the barrier; returns everything the writer needs."""
    t0 = time.perf_counter()
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    spec, task, explanation = resolve(a, b, activation, data, max_tokens=max_tokens, max_samples=max_samples)
    dtype, stored = eval_dtype(b.params), storage_dtype(b.params)
    pa, pb = cast(a.params, dtype), cast(b.params, dtype)
    stream_used, stream_fixed = stream_group(spec, stream if stream is not None else default_stream(a, pa, method))
    t_load = time.perf_counter() - t0
    fault_point("loaded")
    info, t1 = MatchInfo(), time.perf_counter()
    ortho = learned = None
    if method == "learned":
        aligned, learned = _match_learned(a, spec, task, pa, pb, b.params, stream_used, stream_fixed, seed, backend, progress, info,
                                          learn_steps, learn_from)
    elif stream_used == "orthogonal":
        by_activations = task if method == "activations" else None
        aligned, ortho = _match_orthogonal(a, spec, pa, pb, b.params, seed, backend, progress, info, by_activations)
    else:
        g = _match(method, spec, task, pa, pb, seed, backend, progress, info, stream_fixed or None, device)
        aligned = act(spec, b.params, g)  # in B's own dtype: this is what is written
    t_align = time.perf_counter() - t1
    aligned_eval = cast(aligned, dtype)
    error = check_same_function(task.probe, pb, aligned_eval, stored, "the aligned B")
    fault_point("matched")
    t2 = time.perf_counter()
    correct = None
    if use_repair:
        correct = lambda mixed, t: repair(spec, task.model, pa, aligned_eval, mixed, t, task.inputs)  # noqa: E731
    curves = None if barrier == "none" else naive_vs_aligned(task.evaluate, pa, pb, aligned_eval, n_points, progress, correct)
    t_barrier = time.perf_counter() - t2
    report = {
        "models": {"A": str(a.path), "B": str(b.path), "format": a.fmt, "dtype": str(stored)[6:], "architecture": explanation},
        "spec": {"name": spec.name, "factors": len(spec.factors), "parameters": len(spec.params), "continuous_dimension": spec.dimension},
        "method": method,
        "stream": stream_used,
        **({"orthogonal": ortho} if ortho else {}),
        **({"learned": learned} if learned else {}),
        "backend": backend,
        "repair": use_repair,
        "data": task.data_name,
        "sweeps": info.sweeps,
        "converged": info.converged,
        "function_check": {"max_relative_error": error, "evaluated_in": str(dtype)[6:]},
        **(curves.to_dict() if curves is not None else {"barrier": "none"}),
        "device": device or "cpu",
        "timings_s": {"load": t_load, "align": t_align, "barrier": t_barrier, "total": time.perf_counter() - t0},
        "outputs": plan.shown(),
    }
    return Outcome(report, b, aligned, curves, task, dtype, f"{spec.name}: {method} matching on {task.data_name}")


def _write_and_publish(stage: Path, plan, o: Outcome) -> None:
    """Stage the whole set, read the model back and check it, publish; OS errors become one clear message."""
    try:
        write_results(stage, plan, o.b, o.aligned, o.report, o.barrier, o.title)
        check_written(o.b, stage / plan.aligned, o.aligned, o.task.probe, lambda p: cast(p, o.dtype), storage_dtype(o.b.params))
        publish(stage, plan.real, plan.names)
    except OSError as exc:
        where = exc.filename or plan.out
        raise OutputError(f"{exc.strerror or exc} ({where}) while writing the results to {plan.out}; nothing was written") from None
