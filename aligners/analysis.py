"""The singular-vector view of alignment (Ito, Yamada & Kumagai 2024, arXiv 2402.04051).

A permutation moves the rows / columns of a weight matrix, so it leaves the matrix's singular values unchanged
and only rotates its singular vectors. Weight matching maximises ``sum <W_A, P W_B Q^T>``, which it does mostly by
lining up the singular vectors that carry large singular values. Per weight matrix (a tensor of rank >= 2,
viewed as ``(shape[0], rest)``; stacked experts one matrix per expert) this module reports the singular values of A and of B (aligned) and how well
their top-k singular vectors agree: ``|<u_i^A, u_i^B>|`` and ``|<v_i^A, v_i^B>|`` for ``i < k``, and the
subspace overlap ``||U_A[:, :k]^T U_B[:, :k]||_F^2 / k`` (1: the same top-k left subspace; k/n for random ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from symm.element import GroupElement
from symm.normal_form import PERMUTATION_KINDS
from symm.spec import Spec

Params = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class SingularAlignment:
    """One weight matrix: singular values of A and B, per-index vector agreement and top-k subspace overlaps."""

    name: str
    shape: tuple[int, int]
    sv_a: list[float]
    sv_b: list[float]
    cos_u: list[float]  # |<u_i^A, u_i^B>|, i < k
    cos_v: list[float]
    overlap_u: float  # ||U_A^T U_B||_F^2 / k over the top k
    overlap_v: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def batch_axis(spec: Spec | None, name: str) -> int | None:
    """The axis of parameter ``name`` that indexes a batched factor's batch (stacked experts), if any."""
    if spec is None or name not in spec.params:
        return None
    axes = {on.batch_axis for _, _, seg in spec.params[name].segments() for on in seg.acts if on.batch_axis is not None}
    return axes.pop() if len(axes) == 1 else None


def weight_matrices(params: Params, spec: Spec | None = None) -> dict[str, torch.Tensor]:
    """Every floating tensor of rank >= 2 as a ``(shape[0], rest)`` float64 matrix; with ``spec``, stacked
    per-expert tensors become one matrix per expert, ``name[e]`` (each expert's own matrix)."""
    out = {}
    for k, v in params.items():
        if not torch.is_floating_point(v) or v.ndim < 2:
            continue
        b = batch_axis(spec, k)
        pieces = {k: v} if b is None else {f"{k}[{e}]": v.select(b, e) for e in range(v.shape[b])}
        for n, m in pieces.items():
            if m.ndim >= 2:
                out[n] = m.detach().to(torch.float64).reshape(m.shape[0], -1)
    return out


def singular_values(params: Params, spec: Spec | None = None) -> dict[str, torch.Tensor]:
    return {k: torch.linalg.svdvals(m) for k, m in weight_matrices(params, spec).items()}


def permutation_part(spec: Spec, g: GroupElement) -> GroupElement:
    """The element's permutation factors (plain, grouped, head), every other factor at the identity."""
    return g.restrict(n for n, f in spec.factors.items() if f.kind in PERMUTATION_KINDS)


def singular_alignment(name: str, a: torch.Tensor, b: torch.Tensor, k: int = 8) -> SingularAlignment:
    """Compare the SVDs of two equally shaped matrices over their top ``k`` singular directions."""
    ua, sa, vha = torch.linalg.svd(a, full_matrices=False)
    ub, sb, vhb = torch.linalg.svd(b, full_matrices=False)
    k = min(k, sa.numel())
    cu = (ua[:, :k] * ub[:, :k]).sum(0).abs()
    cv = (vha[:k] * vhb[:k]).sum(1).abs()
    overlap_u = float((ua[:, :k].T @ ub[:, :k]).pow(2).sum()) / k
    overlap_v = float((vha[:k] @ vhb[:k].T).pow(2).sum()) / k
    return SingularAlignment(name, (a.shape[0], a.shape[1]), sa.tolist(), sb.tolist(), cu.tolist(), cv.tolist(), overlap_u, overlap_v)


def singular_report(params_a: Params, params_b: Params, k: int = 8, spec: Spec | None = None) -> dict[str, SingularAlignment]:
    """Per weight matrix of A, its alignment with the same matrix of (aligned) B."""
    ma, mb = weight_matrices(params_a, spec), weight_matrices(params_b, spec)
    return {n: singular_alignment(n, ma[n], mb[n], k) for n in ma if n in mb and ma[n].shape == mb[n].shape}


def plot_singular(reports: Mapping[str, Mapping[str, SingularAlignment]], path: str | Path, title: str = "", side: str = "auto") -> None:
    """One panel per weight matrix: ``|<u_i^A, u_i^B>|`` (``side="u"``, output side) or ``|<v_i^A, v_i^B>|``
    (``"v"``, input side) against ``i`` for every method (``{method: report}``), and the singular values of A on a
    twin axis. ``"auto"``: per matrix the larger side (the hidden units of a first or last layer, not the few
    inputs or classes that no permutation moves)."""
    if side not in ("auto", "u", "v"):
        raise ValueError(f"side must be 'auto', 'u' or 'v', got {side!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(reports)
    layers = list(next(iter(reports.values())))
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        shape = reports[methods[0]][layer].shape
        use_v = side == "v" or (side == "auto" and shape[1] > shape[0])
        for method in methods:
            r = reports[method][layer]
            cos, overlap = (r.cos_v, r.overlap_v) if use_v else (r.cos_u, r.overlap_u)
            ax.plot(range(1, len(cos) + 1), cos, marker="o", ms=3, label=f"{method} ({overlap:.2f})")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{layer} {shape}: {'v (input side)' if use_v else 'u (output side)'}", fontsize=8)
        ax.set_xlabel("singular index i", fontsize=7)
        ax.tick_params(labelsize=7)
        sv = reports[methods[0]][layer].sv_a[: len(reports[methods[0]][layer].cos_u)]
        twin = ax.twinx()
        twin.plot(range(1, len(sv) + 1), sv, color="0.6", ls=":", lw=1)
        twin.tick_params(labelsize=6, colors="0.5")
        ax.legend(fontsize=6, title="method (top-k overlap)", title_fontsize=6)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes[0][0].set_ylabel("|<u_i^A, u_i^B>| or |<v_i^A, v_i^B>|", fontsize=8)
    fig.suptitle(title or "top singular vectors of A vs aligned B (dotted: singular values of A)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["SingularAlignment", "batch_axis", "permutation_part", "plot_singular", "singular_alignment", "singular_report", "singular_values", "weight_matrices"]
