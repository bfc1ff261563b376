"""``symm align A B --barrier none`` on Hugging Face safetensors folders, at billion-parameter scale.

No torch model is instantiated with weights: both checkpoints are memory-mapped from their shards
(:mod:`symm.shards`), matched in their stored dtype when it is float32 (float64 checkpoints in float64, half
precision in float32), the found element is applied tensor by tensor while the aligned B is written shard by
shard in B's own layout (same shard files, index, dtype; config, tokenizer and side files copied), and the written
folder is read back (memory-mapped) and checked to compute B's function on a probe batch with the real
``transformers`` forward pass (a meta-device skeleton that borrows the weights). Peak memory is about one model
for A and B each (file pages) plus the working B and the score caches; never two full models in float64.

The job's other guarantees are those of :func:`aligners.job.align`: inputs checked first (configs, same
architecture, shapes from the headers, every weight finite), the output locked, everything staged, the staged
folder checked, then published at once (report last). Folders whose on-disk layout differs from the in-memory
one (MoE families with fused experts) go through ``from_pretrained`` instead (:func:`lean_inputs` is ``None``).
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from symm.action import act_param
from symm.adapters import spec_from_hf
from symm.adapters.hf.encoders import is_encoder
from symm.checkpoint import config_difference, hf_config, spec_difference
from symm.errors import CheckpointError, OutputError, SpecError
from symm.io import atomic_write_text, compare_state_dicts
from symm.publish import fault_point, publish
from symm.shards import LazyFolder, check_shapes, lazy_layout, logits_probe
from symm.spec import Spec

from .outputs import check_same_outputs, output_error
from .layerwise import LayerwiseInfo, layerwise_matching
from .weight_matching import MatchInfo

log = logging.getLogger(__name__)

#: glibc's ``mallopt`` parameter number of the mmap threshold (``malloc.h``)
M_MMAP_THRESHOLD = -3
#: probe batch of the function check: random token windows (seeded), small enough for a 1 B model on a CPU
PROBE_SHAPE = (2, 16)


@dataclass
class LeanPair:
    a: LazyFolder
    b: LazyFolder
    spec: Spec


def lean_inputs(path_a: Path, path_b: Path) -> LeanPair | None:
    """Both folders read lazily, or ``None`` when one of them cannot be (not a folder, ``.bin`` weights, an on-disk
    layout that differs from the in-memory one). Different architectures raise :class:`SpecError` (exit 2)."""
    from symm.adapters import is_hf_folder

    if not (is_hf_folder(path_a) and is_hf_folder(path_b)):
        return None
    ca, cb = hf_config(path_a), hf_config(path_b)
    if is_encoder(ca):  # encoders: their own head class
        return None  # and probe inputs; aligned through from_pretrained
    spec_a, spec_b = spec_from_hf(ca), spec_from_hf(cb)
    if spec_a != spec_b:
        what = config_difference(ca, cb) or spec_difference(spec_a, spec_b)
        raise SpecError(f"{path_a} and {path_b} have different architectures ({spec_a.name} vs {spec_b.name}): {what}")
    la, lb = lazy_layout(path_a, ca, spec_a.params), lazy_layout(path_b, cb, spec_b.params)
    if la is None or lb is None:
        return None
    return LeanPair(la, lb, spec_a)


def _work_dtype(params) -> torch.dtype:
    return torch.float64 if any(v.dtype == torch.float64 for v in params.values()) else torch.float32


def _stored_dtype(params) -> torch.dtype:
    return next((v.dtype for v in params.values() if torch.is_floating_point(v)), torch.float32)


#: safetensors header dtype -> torch dtype
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _check_same_dtypes(la: LazyFolder, lb: LazyFolder) -> None:
    """Both folders store every tensor in the same dtype (from the headers), as :func:`compare_state_dicts` checks."""
    da, db = la.dtypes(), lb.dtypes()
    differ = [f"{k} ({da[k]} vs {db[k]})" for k in sorted(da) if da[k] != db.get(k)]
    if differ:
        raise CheckpointError(f"{la.path} and {lb.path} store weights in different dtypes: {', '.join(differ[:6])}"
                              + (" ..." if len(differ) > 6 else "") + "; convert one so that both use the same dtype")


def _cast(params, dtype):
    """Tensors already in ``dtype`` are shared (memory-mapped pages stay file pages)."""
    return {k: (v.to(dtype) if torch.is_floating_point(v) else v) for k, v in params.items()}


def return_freed_memory() -> None:
    """glibc: serve every allocation of 1 MiB or more by its own mapping, so that a freed tensor goes back to the
    system at once. (By default the threshold adapts upwards to 32 MiB, and tensors below it freed while the matcher
    replaces them stay in the heap: about one more model's worth of resident memory at 0.1-0.5 B parameters.)"""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def run_lean(pair: LeanPair, stage: Path, plan, *, seed: int = 0, backend: str = "auto", progress: bool = True,
             stream: str | None = None, device: str = "cpu") -> dict:
    """Match, write the aligned B into ``stage``, check it, publish; returns the report."""
    from .job import stream_group

    return_freed_memory()
    t0 = time.perf_counter()
    spec, la, lb = pair.spec, pair.a, pair.b
    blocks = None
    check_shapes(la, spec)
    check_shapes(lb, spec)
    stream_used, stream_fixed = stream_group(spec, stream)
    info, ortho = MatchInfo(), None
    if stream_used == "orthogonal":  # folds both models in float64: in memory, as the from_pretrained path
        from symm.folding import layout_for

        from .orthogonal_stream import match_orthogonal

        pa, pb = la.state_dict(copy=True), lb.state_dict(copy=True)
        compare_state_dicts(pa, pb, (str(la.path), str(lb.path)))
        spec.check_params(pa, what=str(la.path))
        work, stored = _work_dtype(pb), _stored_dtype(pb)
        t_load = time.perf_counter() - t0
        fault_point("loaded")
        t1 = time.perf_counter()
        result = match_orthogonal(spec, layout_for(la.config, pa), _cast(pa, work), _cast(pb, work), seed=seed, backend=backend, progress=progress)
        info.sweeps, info.converged = result.rounds, result.converged
        ortho = {"rounds": result.rounds, "stream_objectives": result.objectives, "folded_distances": result.distances}
        aligned = result(pb)
        tensor_of = aligned.__getitem__
    else:  # one block of tensors at a time (aligners/layerwise.py): a few layers' worth in memory, never a model
        _check_same_dtypes(la, lb)
        la.check_finite()
        lb.check_finite()
        stored = _DTYPES.get(next(iter(lb.dtypes().values())), torch.float32)
        work = torch.float64 if stored == torch.float64 else torch.float32
        t_load = time.perf_counter() - t0
        fault_point("loaded")
        t1 = time.perf_counter()
        layerwise = LayerwiseInfo()
        read_a, read_b = (functools.partial(f.read, check_finite=False) for f in (la, lb))  # checked just above
        g = layerwise_matching(spec, read_a, read_b, fixed_stream=stream_fixed or None, seed=seed, backend=backend, progress=progress,
                               device=device, dtype=work, info=layerwise)
        info.sweeps, info.converged = layerwise.sweeps, layerwise.converged
        blocks = {"blocks": layerwise.blocks, "largest_block_tensors": layerwise.largest_block}
        tensor_of = lambda key: act_param(spec, spec.params[key], lb.tensor(key), g.values)  # noqa: E731  B's dtype
    pa = pb = None  # A is no longer needed; B is read again (memory-mapped) for writing and the check
    la.close()
    t_align = time.perf_counter() - t1
    fault_point("matched")

    t2 = time.perf_counter()
    target = stage / plan.aligned
    try:
        from symm.shards import write_like

        write_like(lb, target, tensor_of)
        fault_point("staged-model")
        written = lazy_layout(target, lb.config, spec.params)
        if written is None:
            raise OutputError(f"the written {plan.aligned} does not read back in B's layout; nothing was published")
        tokens = torch.randint(0, lb.config.vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(0))
        probe = logits_probe(lb.config, tokens, work)
        # one model's pages mapped at a time: B's outputs first, B released, then the written folder's
        reference = probe(lb.state_dict(check_finite=False))
        lb.close()
        error = check_same_outputs(output_error(reference, probe(written.state_dict())), stored, f"the saved folder {plan.aligned}")
        written.close()
        t_write = time.perf_counter() - t2
        report = {
            "models": {"A": str(la.path), "B": str(lb.path), "format": "hf", "dtype": str(stored)[6:],
                       "architecture": f"Hugging Face {lb.config.model_type} causal LM ({spec.name})"},
            "spec": {"name": spec.name, "factors": len(spec.factors), "parameters": len(spec.params), "continuous_dimension": spec.dimension},
            "method": "weights",
            "stream": stream_used,
            **({"orthogonal": ortho} if ortho else {}),
            "backend": backend,
            "repair": False,
            "data": None,
            "sweeps": info.sweeps,
            "converged": info.converged,
            "function_check": {"max_relative_error": error, "evaluated_in": str(work)[6:], "probe": f"{PROBE_SHAPE[0]} random windows of {PROBE_SHAPE[1]} tokens"},
            "barrier": "none",
            "loader": "memory-mapped safetensors, written shard by shard",
            **({"layerwise": blocks} if blocks else {}),
            "device": device,
            "timings_s": {"load": t_load, "align": t_align, "write": t_write, "total": time.perf_counter() - t0},
            "outputs": plan.shown(),
        }
        atomic_write_text(stage / plan.report, json.dumps(report, indent=2) + "\n")
        fault_point("staged")
        publish(stage, plan.real, plan.names)
    except OSError as exc:
        where = exc.filename or plan.out
        raise OutputError(f"{exc.strerror or exc} ({where}) while writing the results to {plan.out}; nothing was written") from None
    return report
