"""Views of a Spec for people and for graph algorithms: a networkx graph and a text description."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import networkx as nx

if TYPE_CHECKING:
    from .spec import Spec


def to_networkx(spec: "Spec") -> nx.MultiGraph:
    """Factor nodes ``("factor", name)`` and parameter nodes ``("param", name)``.

    Edges factor--param carry ``axis``, ``offset``, ``side`` (or ``side="shift"``); edges factor--factor carry
    ``relation="parent"``. Connected components over factor nodes give the coupled groups.
    """
    g = nx.MultiGraph(name=spec.name)
    for name, f in spec.factors.items():
        g.add_node(("factor", name), kind=f.kind, count=f.count, dimension=f.dimension)
    for pname, ps in spec.params.items():
        g.add_node(("param", pname), shape=ps.shape)
        for axis, offset, seg in ps.segments():
            for on in seg.acts:
                g.add_edge(("factor", on.factor), ("param", pname), axis=axis, offset=offset, side=on.side)
        for shift in ps.shifts:
            g.add_edge(("factor", shift.factor), ("param", pname), axis=shift.axis, offset=0, side="shift")
    for name, f in spec.factors.items():
        if f.parent:
            g.add_edge(("factor", f.parent), ("factor", name), relation="parent")
    return g


def coupled_factors(spec: "Spec") -> list[set[str]]:
    """Sets of factors that act on a common parameter (directly or through a chain of parameters)."""
    g = to_networkx(spec)
    out = []
    for comp in nx.connected_components(g):
        names = {n for kind, n in comp if kind == "factor"}
        if names:
            out.append(names)
    return sorted(out, key=lambda s: sorted(s))


def _axis_label(spec: "Spec", segs) -> str:
    if not segs:
        return "-"
    parts = []
    for seg in segs:
        acts = ",".join(f"{on.factor}{'' if on.side == 'out' else '^-T'}" for on in seg.acts) or "-"
        parts.append(acts if len(segs) == 1 else f"[{seg.size}:{acts}]")
    return "+".join(parts)


def describe(spec: "Spec") -> str:
    """A readable summary: factors with kind, size and continuous dimension; then each parameter's axes."""
    lines = [f"Spec {spec.name or '(unnamed)'}: {len(spec.factors)} factors on {len(spec.params)} parameters"]
    by_kind: dict[str, int] = defaultdict(int)
    for f in spec.factors.values():
        by_kind[f.kind] += 1
    lines.append("  kinds: " + ", ".join(f"{k} x{n}" for k, n in sorted(by_kind.items())))
    lines.append(f"  continuous dimension: {spec.dimension}")
    lines.append("factors:")
    for name in spec.factor_order:
        f = spec.factors[name]
        dim = f" dim={f.dimension}" if f.is_continuous else ""
        lines.append(f"  {'  ' * spec.depth(name)}{name}: {f.describe()}{dim}")
    lines.append("parameters (axis factors; ^-T marks the consuming side):")
    for pname, ps in spec.params.items():
        axes = " x ".join(_axis_label(spec, segs) for segs in ps.axes) or "scalar"
        shifts = "".join(f" + shift {s.factor} along axis {s.axis}" for s in ps.shifts)
        lines.append(f"  {pname} {tuple(ps.shape)}: {axes}{shifts}")
    if spec.notes:
        lines.append("notes:")
        lines.extend(f"  - {n}" for n in spec.notes)
    return "\n".join(lines)


def _block_of(name: str) -> str:
    """``model.layers.3.self_attn.heads`` -> ``model.layers.3``; names without a layer index -> ``(global)``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return "(global)"


def describe_blocks(spec: "Spec") -> str:
    """The group per block: factor kinds and sizes, continuous dimensions, and what PE / gating changed."""
    blocks: dict[str, list[str]] = defaultdict(list)
    for name in spec.factor_order:
        blocks[_block_of(name)].append(name)
    lines = [
        f"{spec.name or 'spec'}: {len(spec.factors)} factors, {len(spec.params)} parameters, "
        f"continuous dimension {spec.dimension}"
    ]
    for block in sorted(blocks, key=lambda b: (b != "(global)", _natural_key(b))):
        names = blocks[block]
        dim = sum(spec.factors[n].dimension for n in names)
        lines.append(f"block {block}: {len(names)} factors, continuous dimension {dim}")
        for n in names:
            f = spec.factors[n]
            short = n[len(block) + 1 :] if n.startswith(block + ".") else n
            lines.append(f"    {short}: {f.describe()}" + (f", dim {f.dimension}" if f.is_continuous else ""))
        for note in spec.notes:
            if note.startswith(block + ".") or (block == "(global)" and _block_of(note.split(":")[0]) == "(global)"):
                lines.append(f"    note: {note}")
    return "\n".join(lines)


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in name.split(".")]
