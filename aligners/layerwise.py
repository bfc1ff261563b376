"""Weight matching one block at a time: a few layers' worth of tensors in memory, for billion-parameter checkpoints.

The parameters split into **blocks**: the connected components of "two parameters share a factor other than the
stream" (a layer's attention, its MLP or MoE, and each stream-only tensor: embeddings, norms, the LM head). Only the
stream permutation (and its signs) links blocks. The stream starts from the stream-only blocks alone (as the
orthogonal stream's first fit). One sweep:

1. for each block, read its tensors of A and B (and nothing else), move B's by the current stream element s,
   match the block's own factors (heads, GL / RoPE factors, units, experts, scalings) with
   :func:`aligners.weight_matching` on the block's sub-spec, the stream fixed; add the block's stream scores
   S_signed, S_plain (A's stream rows against the matched B's, as the full matcher scores them) and drop the block;
2. solve the stream from the summed scores (assignment on |S_signed| + S_plain, signs from the matched S_signed
   entries) and compose it into s.

Sweeps stop when the stream no longer moves (or after ``max_sweeps``). The answer is the union of the block
elements and s, an element of the full spec, applied tensor by tensor by the caller when it writes the aligned B.
Memory: two blocks of tensors (A's and B's) and the d x d stream scores. Planted pairs are recovered exactly, like
the full matcher; on real pairs the two are block-coordinate ascents with different visiting orders (the stream is
solved once per sweep here), so their answers can differ.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from symm.action import act_param
from symm.element import GroupElement
from symm.errors import SpecError
from symm.spec import Fragment, Spec
from symm.views import segment_of, unit_matrix

from .assignment import linear_assignment
from .weight_matching import weight_matching

log = logging.getLogger(__name__)

#: ``keys -> {key: tensor}``: reads some tensors of a checkpoint (copies; nothing else stays in memory)
Reader = Callable[[list[str]], Mapping[str, torch.Tensor]]


def stream_family(spec: Spec, stream: str = "stream") -> list[str]:
    """The stream factor and its descendants (its signs)."""
    if stream not in spec.factors:
        raise SpecError(f"spec {spec.name}: no factor named {stream!r} (the residual stream)")
    out = [stream]
    for name in spec.factor_order:
        if spec.factors[name].parent in out:
            out.append(name)
    return out


def blocks(spec: Spec, streams: Iterable[str]) -> list[list[str]]:
    """Connected components of the parameters under "share a factor other than ``streams``", in spec order."""
    streams = set(streams)
    parent = {p: p for p in spec.params}

    def root(p: str) -> str:
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    owner: dict[str, str] = {}
    for p, ps in spec.params.items():
        for f in ps.factors() - streams:
            if f in owner:
                parent[root(p)] = root(owner[f])
            else:
                owner[f] = p
    groups: dict[str, list[str]] = {}
    for p in spec.params:
        groups.setdefault(root(p), []).append(p)
    return list(groups.values())


def sub_spec(spec: Spec, params: list[str]) -> Spec:
    """The spec restricted to ``params`` and the factors (with their ancestors) acting on them."""
    names: set[str] = set()
    for p in params:
        for f in spec.params[p].factors():
            while f is not None and f not in names:
                names.add(f)
                f = spec.factors[f].parent
    return Spec(Fragment({n: spec.factors[n] for n in names}, {p: spec.params[p] for p in params}), name=f"{spec.name} [{params[0]} ...]")


@dataclass
class StreamScores:
    signed: torch.Tensor | None = None
    plain: torch.Tensor | None = None

    def add(self, signed: bool, part: torch.Tensor) -> None:
        if signed:
            self.signed = part if self.signed is None else self.signed + part
        else:
            self.plain = part if self.plain is None else self.plain + part


def add_stream_scores(
    scores: StreamScores, spec: Spec, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], stream: str, sign: str | None
) -> None:
    """S += A_u B_u^T over the stream's uses in the parameters of ``a`` (uses carrying the sign apart from those that
    do not)."""
    for pname, axis, offset, on in spec.uses(stream):
        if pname not in a:
            continue
        seg = segment_of(spec, pname, axis, offset)
        signed = sign is not None and any(o.factor == sign for o in seg.acts)
        rows_a = unit_matrix(spec, a[pname], axis, offset, seg.size, on)
        rows_b = unit_matrix(spec, b[pname], axis, offset, seg.size, on).to(rows_a.dtype)
        scores.add(signed, (rows_a @ rows_b.T).to(torch.float64))  # in the working dtype, summed in float64


def solve_stream(spec: Spec, scores: StreamScores, stream: str, sign: str | None, backend: str = "auto") -> GroupElement:
    """The stream step: sigma from |S_signed| + S_plain, each unit's sign from its matched S_signed entry."""
    if scores.signed is None and scores.plain is None:
        return GroupElement.identity(spec)
    effective = (scores.signed.abs() if scores.signed is not None else 0) + (scores.plain if scores.plain is not None else 0)
    sigma = linear_assignment(effective, backend)
    values = {stream: sigma}
    if sign is not None and scores.signed is not None:
        matched = scores.signed.gather(-1, sigma.unsqueeze(-1)).squeeze(-1)
        flips = torch.where(matched < 0, -1.0, 1.0).to(torch.float64)
        element = torch.ones_like(flips)
        element.scatter_(-1, sigma, flips)  # normal form: flip B's unit sigma[i], then permute (as the full matcher)
        values[sign] = element
    return GroupElement.identity(spec).replace(**values)


def first_stream(spec: Spec, parts: list[list[str]], own_factors: list[list[str]], read_a: Reader, read_b: Reader, stream: str,
                 sign: str | None, s: GroupElement, backend: str, dtype: torch.dtype = torch.float64) -> GroupElement:
    """The starting stream, from the blocks no other factor acts on (embeddings, norms, LM head), as the orthogonal
    stream's first fit: matching a layer's units against an arbitrary stream first would fit them to it (many free
    unit permutations find spurious agreement) and hold the stream there."""
    scores = StreamScores()
    for keys, own in zip(parts, own_factors):
        if not own:
            a = {k: v.to(dtype) for k, v in read_a(keys).items()}
            b = {k: act_param(spec, spec.params[k], v.to(dtype), s.values) for k, v in read_b(keys).items()}
            add_stream_scores(scores, spec, a, b, stream, sign)
    return solve_stream(spec, scores, stream, sign, backend).compose(s)


@dataclass
class LayerwiseInfo:
    sweeps: int = 0
    converged: bool = False
    blocks: int = 0
    largest_block: int = 0  # tensors in the largest block (what is in memory at once, per model)


def layerwise_matching(
    spec: Spec,
    read_a: Reader,
    read_b: Reader,
    *,
    stream: str = "stream",
    fixed_stream: Mapping[str, torch.Tensor] | None = None,
    max_sweeps: int = 20,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = False,
    device: str | None = None,
    dtype: torch.dtype = torch.float64,
    info: LayerwiseInfo | None = None,
) -> GroupElement:
    """The element of ``spec``'s group matching B to A, found block by block (see the module doc).

    ``fixed_stream``: values of the stream factors decided by the caller (e.g. identity signs for ``--stream
    permutation``); they are never changed. ``dtype``: the blocks' working precision (float32 halves the cost of a
    float32 checkpoint; stream scores are summed in float64 either way)."""
    streams = stream_family(spec, stream) if stream in spec.factors else []  # none: a pinned stream (XGLM)
    sign = next((n for n in streams if spec.factors[n].kind == "sign-flip"), None)
    fixed_stream = dict(fixed_stream or {})
    if not streams:
        fixed_stream[stream] = torch.empty(0)  # marks the stream as decided (nothing to solve)
    if stream in fixed_stream:
        max_sweeps = 1  # nothing links the blocks but the stream: one pass decides everything
    parts = blocks(spec, streams)
    info = info if info is not None else LayerwiseInfo()
    info.blocks, info.largest_block = len(parts), max(len(p) for p in parts)
    own_factors = [sorted({f for k in p for f in spec.params[k].factors()} - set(streams)) for p in parts]
    subs = [sub_spec(spec, p) if own else None for p, own in zip(parts, own_factors)]  # stream-only blocks need none
    given = {n: v for n, v in fixed_stream.items() if n in spec.factors}
    s = GroupElement.identity(spec).replace(**given)
    found: list[GroupElement | None] = [None] * len(parts)
    if stream not in fixed_stream:
        s = first_stream(spec, parts, own_factors, read_a, read_b, stream, sign if sign not in fixed_stream else None, s, backend, dtype)
    for sweep in range(max_sweeps):
        scores = StreamScores()
        bar = tqdm(range(len(parts)), desc=f"layer-wise matching, sweep {sweep + 1}", unit="block", disable=not progress, leave=False)
        for i in bar:
            keys, sub = parts[i], subs[i]
            a = {k: v.to(dtype) for k, v in read_a(keys).items()}
            b = {k: act_param(spec, spec.params[k], v.to(dtype), s.values) for k, v in read_b(keys).items()}
            if sub is not None:
                fixed = {n: sub.factors[n].identity() for n in sub.factors if n in streams}
                init = found[i].restrict(own_factors[i]) if found[i] is not None else None
                found[i] = weight_matching(sub, a, b, fixed=fixed, init=init, seed=seed, backend=backend, progress=False, device=device)
                # score the stream on B moved by the block's element less its translations: a router translation
                # fitted under a wrong stream copies A's mean row into B and biases the stream towards where it is
                moves = found[i].replace(**{n: sub.factors[n].identity() for n in sub.factors if sub.factors[n].kind == "translation"})
                b = {k: act_param(sub, sub.params[k], v, moves.values) for k, v in b.items()}
            if stream not in fixed_stream:
                add_stream_scores(scores, spec, a, b, stream, sign if sign not in fixed_stream else None)
            del a, b
        info.sweeps = sweep + 1
        if stream in fixed_stream:
            info.converged = True
            break
        delta = solve_stream(spec, scores, stream, sign if sign not in fixed_stream else None, backend)
        log.info("layer-wise matching: sweep %d, stream moved: %s", sweep + 1, not delta.is_identity())
        if delta.is_identity():
            info.converged = True
            break
        if sweep + 1 == max_sweeps:
            break  # out of sweeps: keep the stream the blocks were matched under
        s = delta.compose(s)
    own = {n: v for g in found if g is not None for n, v in g.values.items() if n not in streams}
    # the blocks were matched on B already moved by s: g = g_blocks . s (composing moves router translations, which
    # live in stream coordinates, back through s)
    return GroupElement.identity(spec).replace(**own).compose(s)
