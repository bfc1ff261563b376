"""Outputs of the align job: what is written where, checks made before any work, the staged result set.

Nothing is ever written over or inside an input, nor over a folder that contains one; an aligned model is only
written after it is checked to compute B's function (:func:`check_same_function`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from symm.adapters.hf.gauge import checkpoint_state_dict
from symm.checkpoint import Checkpoint, load_checkpoint
from symm.errors import FunctionMismatch, OutputError
from symm.io import atomic_write_text, load_state_dict, save_state_dict
from symm.publish import STAGE_PREFIX, fault_point, lock_path

from .barrier import BarrierReport
from .plot import plot_barrier

log = logging.getLogger(__name__)

#: largest accepted relative output error of the aligned model vs B, by the checkpoint's dtype
FUNCTION_RTOL = {torch.float64: 1e-7, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}
_SIDE_FILE_SKIP = (".safetensors", ".bin", ".index.json")


@dataclass(frozen=True)
class OutputPlan:
    """The result set: ``aligned`` (file or folder), ``barrier.png`` and ``report.json`` in ``out``."""

    out: Path  # as given (for messages and the report)
    real: Path  # resolved (for the machinery)
    aligned: str
    plot: str | None = "barrier.png"  # None: no barrier measured (``--barrier none``), no plot
    report: str = "report.json"

    @property
    def names(self) -> list[str]:
        """Publication order: the report last (its presence means the set is complete)."""
        return [self.aligned, *([self.plot] if self.plot else []), self.report]

    def shown(self) -> dict[str, str]:
        shown = {"aligned": str(self.out / self.aligned), "report": str(self.out / self.report)}
        return shown | ({"plot": str(self.out / self.plot)} if self.plot else {})


def plan_outputs(path_b: Path, hf: bool, out: str | os.PathLike, plot: bool = True) -> OutputPlan:
    aligned = "aligned_model" if hf else f"{path_b.stem}_aligned{path_b.suffix}"
    return OutputPlan(Path(out), Path(os.path.realpath(os.path.abspath(out))), aligned, "barrier.png" if plot else None)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _check_folder(plan: OutputPlan) -> Path:
    """``out`` is a folder or does not exist yet; its nearest existing ancestor is a writable folder."""
    if plan.out.is_symlink() and not plan.out.exists():
        raise OutputError(f"--out {plan.out} is a dangling symbolic link")
    if plan.real.exists() and not plan.real.is_dir():
        via = f" (a link to {plan.real})" if plan.out.is_symlink() else ""
        raise OutputError(f"--out {plan.out} is an existing file{via}, not a folder")
    home = _existing_ancestor(plan.real)
    if not home.is_dir():
        raise OutputError(f"cannot create --out {plan.out}: {home} is a file")
    if os.statvfs(home).f_flag & os.ST_RDONLY:
        raise OutputError(f"cannot write to {home}: read-only file system")
    if not os.access(home, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {home}: permission denied")
    return home


def _check_names(plan: OutputPlan, home: Path) -> None:
    limit = os.pathconf(home, "PC_NAME_MAX")
    new_parts = plan.real.relative_to(home).parts if plan.real != home else ()
    names = [*new_parts, *plan.names, lock_path(plan.real).name, f"{STAGE_PREFIX}{'0' * 29}"]
    for name in names:
        if len(os.fsencode(name)) > limit:
            raise OutputError(
                f"output name {name!r} is {len(os.fsencode(name))} bytes, longer than the file system allows ({limit}); "
                "rename the input or choose a shorter --out"
            )
    longest = len(os.fsencode(str(plan.real / plan.aligned))) + 60
    if longest > os.pathconf(home, "PC_PATH_MAX"):
        raise OutputError(f"output paths under {plan.out} would be too long for the file system")


def _check_inputs(plan: OutputPlan, inputs: Sequence[Path]) -> None:
    for i in inputs:
        ri = os.path.realpath(i)
        if Path(ri).is_dir() and _inside(str(plan.real), ri):
            raise OutputError(f"--out {plan.out} is inside the input folder {i}; inputs are never modified")
        for name in plan.names:
            target = os.path.realpath(plan.real / name)
            if target == ri or (os.path.exists(target) and os.path.samefile(target, ri)):
                raise OutputError(f"output {plan.out / name} would overwrite input {i}")
            if _inside(ri, target):
                raise OutputError(f"output {plan.out / name} contains input {i}; it would be replaced (inputs are never deleted)")


def _check_existing(plan: OutputPlan, overwrite: bool) -> None:
    present = [n for n in plan.names if os.path.lexists(plan.real / n)]
    if present and not overwrite:
        raise OutputError(f"outputs already exist in {plan.out}: {', '.join(present)} (pass --overwrite to replace them)")


def _check_space(home: Path, need: int) -> None:
    st = os.statvfs(home)
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise OutputError(f"not enough free space in {home}: the results need about {need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free")


def disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def preflight(plan: OutputPlan, inputs: Sequence[Path], overwrite: bool | None, need_bytes: int = 0) -> None:
    """Every check of the outputs that can be made before any work; raises :class:`OutputError`.

    ``overwrite=None`` skips the check for existing outputs (made again under the lock, after recovery).
    """
    home = _check_folder(plan)
    _check_names(plan, home)
    _check_inputs(plan, inputs)
    if overwrite is not None:
        _check_existing(plan, overwrite)
    _check_space(home, need_bytes)


def make_parents(path: Path) -> list[Path]:
    """``mkdir -p path``; returns the folders it created (deepest last) so that a failed run can remove them."""
    created = []
    for p in reversed([path, *path.parents]):
        if not p.exists():
            try:
                p.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise OutputError(f"cannot create {p}: {exc.strerror}") from None
            created.append(p)
    return created


def remove_empty(folders: Sequence[Path]) -> None:
    for p in reversed(folders):
        try:
            p.rmdir()
        except OSError:
            break


Probe = Callable[[Mapping[str, torch.Tensor]], list[torch.Tensor]]


def output_error(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> float:
    """Worst relative output error ``max|y_c - y_r| / max|y_r|`` over paired outputs (inf if a candidate is not finite)."""
    worst = 0.0
    for yr, yc in zip(reference, candidate):
        yr, yc = yr.double(), yc.double()
        if not bool(torch.isfinite(yc).all()):
            return float("inf")
        worst = max(worst, float((yc - yr).abs().max() / yr.abs().max().clamp_min(1e-30)))
    return worst


def function_error(probe: Probe, reference: Mapping[str, torch.Tensor], candidate: Mapping[str, torch.Tensor]) -> float:
    """Worst relative output error ``max|f(c) - f(r)| / max|f(r)|`` over the probe's outputs."""
    with torch.no_grad():
        return output_error(probe(reference), probe(candidate))


def check_same_function(probe: Probe, b: Mapping[str, torch.Tensor], aligned: Mapping[str, torch.Tensor], dtype: torch.dtype, what: str) -> float:
    """Raise :class:`FunctionMismatch` unless ``aligned`` computes B's function up to ``dtype``'s tolerance."""
    return check_same_outputs(function_error(probe, b, aligned), dtype, what)


def check_same_outputs(err: float, dtype: torch.dtype, what: str) -> float:
    """Raise :class:`FunctionMismatch` unless the output error ``err`` is within ``dtype``'s tolerance."""
    tol = FUNCTION_RTOL.get(dtype, 1e-3)
    if not err <= tol:
        raise FunctionMismatch(
            f"refusing to write the aligned model: {what} does not compute B's function (worst output error "
            f"{err:.2e} relative to B's largest output on a probe batch, tolerance {tol:.0e} for {str(dtype)[6:]}); "
            "the symmetry spec used for this architecture is wrong. Nothing was written."
        )
    log.info("aligned model checked: relative output error %.2e (tolerance %.0e)", err, tol)
    return err


def save_aligned(b: Checkpoint, params: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write the aligned B into the staging folder, in B's own format (tokenizer and side files travel along)."""
    if b.fmt != "hf":
        save_state_dict(params, path)
        return
    assert b.model is not None
    b.model.load_state_dict(dict(params))
    b.model.save_pretrained(path, state_dict=checkpoint_state_dict(b.model))  # gauged blocks fused back
    for extra in b.path.iterdir():
        if extra.is_file() and not (path / extra.name).exists() and not extra.name.endswith(_SIDE_FILE_SKIP):
            shutil.copy2(extra, path / extra.name)


def check_written(b: Checkpoint, path: Path, aligned: Mapping[str, torch.Tensor], probe: Probe, cast, dtype: torch.dtype) -> None:
    """Read the written model back: a state dict must hold exactly ``aligned``; a folder must compute B's function."""
    if b.fmt != "hf":
        back = load_state_dict(path)
        bad = [k for k in aligned if k not in back or not torch.equal(back[k], aligned[k])]
        if bad or set(back) != set(aligned):
            raise FunctionMismatch(f"the written {path.name} does not read back as the aligned weights ({', '.join(bad[:4])}); nothing was published")
        return
    back = load_checkpoint(path)
    check_same_function(probe, cast(b.params), cast(back.params), dtype, f"the saved folder {path.name}")


def write_results(stage: Path, plan: OutputPlan, b: Checkpoint, aligned: Mapping[str, torch.Tensor], report: dict, barrier: BarrierReport | None, title: str) -> None:
    """The whole result set into the staging folder; the report last (no plot without a barrier)."""
    save_aligned(b, aligned, stage / plan.aligned)
    fault_point("staged-model")
    if plan.plot is not None and barrier is not None:
        plot_barrier(barrier, stage / plan.plot, title)
        fault_point("staged-plot")
    atomic_write_text(stage / plan.report, json.dumps(report, indent=2) + "\n")
    fault_point("staged")
