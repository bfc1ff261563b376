"""Fault injection for ``symm align``: SIGKILL at every stage, concurrent runs, disk full, read-only output.

After every fault the inputs are byte-identical and ``--out`` holds nothing or one complete result (a
``report.json`` whose listed outputs all exist and read back); the next run cleans what the killed run left.
Kills use the ``SYMM_TEST_FAULT`` hook in a forked child (deterministic stages, no re-import cost) and, once,
a real ``python -m symm.cli`` subprocess killed after random delays.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from symm.cli import main
from symm.io import load_state_dict, save_state_dict
from symm.publish import FAULT_ENV, OutputLock

NAMES = ("B_aligned.safetensors", "barrier.png", "report.json")
FRESH_STAGES = ["locked", "loaded", "matched", "staged-model", "staged-plot", "staged", "publish", "published"]
MERGE_STAGES = ["publish", "publish-trashed", "publish-partial", "published"]


def _save_pair(folder: Path) -> tuple[Path, Path]:
    """Two random 64-32-10 ReLU MLPs (digits-sized) as safetensors."""
    paths = []
    for name, seed in (("A", 0), ("B", 1)):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        paths.append(save_state_dict(model.state_dict(), folder / f"{name}.safetensors"))
    return paths[0], paths[1]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    return _save_pair(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def warm_png(pair, tmp_path_factory) -> bytes:
    """One real run in this process (every import done, so forked children start warm) and its plot."""
    out = tmp_path_factory.mktemp("warm") / "out"
    assert main(_args(pair, out)) == 0
    return (out / "barrier.png").read_bytes()


@pytest.fixture(autouse=True)
def fast_plot(warm_png, monkeypatch):
    """Runs write the cached plot (same size, same atomic writer) instead of rendering it again (most of a run)."""
    from symm.io import atomic_write

    monkeypatch.setattr("aligners.outputs.plot_barrier", lambda report, path, title="": atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(warm_png)))


def _args(pair, out: Path, *extra: str) -> list[str]:
    return ["align", str(pair[0]), str(pair[1]), "--out", str(out), "--quiet", "--points", "3", "--activation", "relu", *extra]


def run_forked(argv: list[str], fault: str | None = None, stderr: Path | None = None) -> int:
    """Run ``main(argv)`` in a forked child (``fault`` sets the hook); returns the wait status."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 3
        try:
            os.environ.pop(FAULT_ENV, None)
            if fault:
                os.environ[FAULT_ENV] = fault
            if stderr is not None:
                sys.stderr = open(stderr, "w")
            code = main(argv)
        finally:
            sys.stderr.flush()
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def snapshot(paths) -> dict[Path, bytes]:
    return {Path(p): Path(p).read_bytes() for p in paths}


def state(out: Path, inputs: dict[Path, bytes]) -> str:
    """'nothing', 'complete' or 'partial' (our files without a report); asserts the invariants."""
    for p, data in inputs.items():
        assert p.read_bytes() == data, f"input {p} changed"
    if not out.exists():
        return "nothing"
    if (out / "report.json").exists():
        report = json.loads((out / "report.json").read_text())
        for path in report["outputs"].values():
            assert Path(path).exists(), f"report.json lists {path}, which does not exist"
        load_state_dict(report["outputs"]["aligned"])
        png = Path(report["outputs"]["plot"]).read_bytes()
        assert png.startswith(b"\x89PNG") and png.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82"), "barrier.png incomplete"
        return "complete"
    return "partial" if any((out / n).exists() for n in NAMES) else "nothing"


def leftovers(*folders: Path) -> list[str]:
    found = []
    for folder in folders:
        if folder.is_dir():
            found += [p.name for p in folder.iterdir() if p.name.startswith(".") and ("symm" in p.name or p.name.endswith(".tmp"))]
    return found


@pytest.mark.parametrize("stage", FRESH_STAGES)
def test_sigkill_at_each_stage_new_out(pair, tmp_path, stage):
    inputs = snapshot(pair)
    out = tmp_path / "out"
    status = run_forked(_args(pair, out), fault=stage)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"the run was not killed at {stage!r}"
    after_kill = state(out, inputs)
    assert after_kill in ("nothing", "complete"), after_kill
    assert (after_kill == "complete") == (stage == "published")
    if stage in ("staged-model", "staged", "publish"):
        assert any(n.startswith(".symm-stage-") for n in leftovers(tmp_path)), "expected the killed run's staging folder"
    rerun = run_forked(_args(pair, out))
    assert os.WEXITSTATUS(rerun) == (2 if after_kill == "complete" else 0)
    assert state(out, inputs) == "complete"
    assert leftovers(tmp_path, out) == []


@pytest.mark.parametrize("stage", MERGE_STAGES)
def test_sigkill_while_replacing_results_in_shared_folder(pair, tmp_path, stage):
    """``--out`` already holds other files and an earlier result; ``--overwrite`` is killed while publishing."""
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("not ours")
    assert main(_args(pair, out)) == 0
    old_report = (out / "report.json").read_text()
    inputs = snapshot(pair)
    status = run_forked(_args(pair, out, "--overwrite", "--seed", "1"), fault=stage)
    assert os.WIFSIGNALED(status), f"the run was not killed at {stage!r}"
    assert state(out, inputs) in ("complete", "partial")  # partial = our files without report.json, rolled forward below
    assert (out / "notes.txt").read_text() == "not ours"
    if stage == "publish":
        assert (out / "report.json").read_text() == old_report
    assert main(_args(pair, out)) == 2  # recovery completes the killed publication; outputs now exist
    assert state(out, inputs) == "complete"
    assert json.loads((out / "report.json").read_text())["outputs"]["aligned"].endswith(NAMES[0])
    assert leftovers(tmp_path, out) == []
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, "notes.txt"])


def test_sigkill_real_subprocess_after_random_delays(pair, tmp_path):
    """``python -m symm.cli align`` killed after random delays (seeded); then a rerun completes cleanly."""
    inputs = snapshot(pair)
    rng = random.Random(11)
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    for i in range(2):
        out = tmp_path / f"out{i}"
        proc = subprocess.Popen([sys.executable, "-m", "symm.cli", *_args(pair, out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert state(out, inputs) in ("nothing", "complete")
        assert main(_args(pair, out, "--overwrite")) == 0
        assert state(out, inputs) == "complete" and leftovers(tmp_path, out) == []


def test_concurrent_run_fails_at_once(pair, tmp_path, capsys):
    out = tmp_path / "out"
    lock = OutputLock(out.resolve()).acquire()
    try:
        assert main(_args(pair, out)) == 2
        assert "another run is writing" in capsys.readouterr().err
        assert not out.exists() and lock.path.exists()  # the refused run did not touch our lock
    finally:
        lock.release()
    assert main(_args(pair, out)) == 0
    assert not lock.path.exists()


def test_two_overlapping_runs_one_wins(pair, tmp_path):
    """The first run holds the lock for 3 s; a second run into the same --out fails within that time."""
    inputs = snapshot(pair)
    out = tmp_path / "out"
    lock_file = tmp_path / ".out.symm-lock"
    pid = os.fork()
    if pid == 0:
        os.environ[FAULT_ENV] = "locked:sleep3"
        code = 3
        try:
            code = main(_args(pair, out))
        finally:
            os._exit(code)
    deadline = time.time() + 30
    while not lock_file.exists() and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    err = tmp_path / "second.err"
    second = run_forked(_args(pair, out, "--seed", "5"), stderr=err)
    assert time.time() - t0 < 3, "the second run waited for the lock"
    assert os.WEXITSTATUS(second) == 2 and "another run is writing" in err.read_text()
    first = os.waitpid(pid, 0)[1]
    assert os.WEXITSTATUS(first) == 0
    assert state(out, inputs) == "complete" and leftovers(tmp_path, out) == []


@pytest.mark.parametrize("stage", ["staged-model", "staged-plot", "staged"])
def test_enospc_while_staging_leaves_nothing(pair, tmp_path, monkeypatch, capsys, stage):
    inputs = snapshot(pair)
    monkeypatch.setenv(FAULT_ENV, f"{stage}:enospc")
    out = tmp_path / "out"
    assert main(_args(pair, out)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "nothing was written" in err and "Traceback" not in err
    assert state(out, inputs) == "nothing" and leftovers(tmp_path) == []


@pytest.mark.parametrize("fault", ["staged:enospc", "publish-trashed:enospc", "publish-partial:enospc"])
def test_os_error_in_shared_folder_keeps_old_result(pair, tmp_path, monkeypatch, fault):
    """ENOSPC while staging, or an OS error between the renames of a publication: the old result is restored."""
    out = tmp_path / "shared"
    assert main(_args(pair, out)) == 0
    before = {n: (out / n).read_bytes() for n in NAMES}
    monkeypatch.setenv(FAULT_ENV, fault)
    assert main(_args(pair, out, "--overwrite", "--seed", "3")) == 2
    assert {n: (out / n).read_bytes() for n in NAMES} == before
    assert leftovers(tmp_path, out) == []


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    _mount_tmpfs_at(where, options)


def _mount_tmpfs_at(where: Path, options: str) -> None:
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here ({getattr(exc, 'stderr', b'') or exc})")


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(name, options)`` -> a freshly mounted tmpfs; all are unmounted afterwards."""
    mounted = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, options)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], check=False, capture_output=True)


def test_disk_full_during_write(pair, tmpfs, monkeypatch, capsys):
    """A 64 KB file system: the aligned model fits, the plot does not; the space check is disabled to get there."""
    disk = tmpfs("disk", "size=64k")
    inputs = snapshot(pair)
    monkeypatch.setattr("aligners.outputs._check_space", lambda home, need: None)
    assert main(_args(pair, disk / "out")) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert state(disk / "out", inputs) == "nothing" and list(disk.iterdir()) == []


def test_disk_too_small_is_refused_up_front(pair, tmpfs, capsys):
    disk = tmpfs("disk", "size=256k")
    assert main(_args(pair, disk / "out")) == 2
    assert "not enough free space" in capsys.readouterr().err
    assert list(disk.iterdir()) == []


def test_read_only_file_system(pair, tmpfs, capsys):
    ro = tmpfs("ro", "ro,size=1m")
    for out in (ro / "out", ro):  # a new folder on it, and the (existing, read-only) mount point itself
        assert main(_args(pair, out)) == 2
        err = capsys.readouterr().err
        assert "read-only file system" in err and "Traceback" not in err
    assert list(ro.iterdir()) == []


def test_existing_out_in_a_read_only_parent(pair, tmpfs):
    """``--out`` is a writable folder inside a read-only one (think ``--out .``): locked and staged inside it."""
    parent = tmpfs("parent", "size=1m")
    (parent / "out").mkdir()
    _mount_tmpfs_at(parent / "out", "size=4m")
    subprocess.run(["mount", "-o", "remount,ro", str(parent)], check=True, capture_output=True)
    try:
        assert main(_args(pair, parent / "out")) == 0
        assert state(parent / "out", snapshot(pair)) == "complete"
        assert sorted(p.name for p in parent.iterdir()) == ["out"] and leftovers(parent / "out") == []
    finally:
        subprocess.run(["umount", str(parent / "out")], check=False, capture_output=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_folder(pair, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(_args(pair, parent / "out")) == 2
        assert "permission denied" in capsys.readouterr().err
    finally:
        parent.chmod(0o755)


def test_only_our_stale_temporaries_are_cleaned(pair, tmp_path):
    out = tmp_path / "out"
    foreign = [tmp_path / ".symm-stage-0123456789ab-00", tmp_path / ".notes.tmp", tmp_path / ".out.backup"]
    foreign[0].mkdir()
    foreign[1].write_text("x")
    foreign[2].write_text("y")
    status = run_forked(_args(pair, out), fault="staged")
    assert os.WIFSIGNALED(status)
    ours = [p for p in tmp_path.iterdir() if p.name.startswith(".symm-stage-") and p not in foreign]
    assert len(ours) == 1 and (ours[0] / NAMES[0]).exists()
    assert main(_args(pair, out)) == 0
    assert not ours[0].exists()
    assert all(p.exists() for p in foreign)
