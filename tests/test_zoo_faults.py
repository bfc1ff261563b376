"""Fault injection for ``symm zoo make``: SIGKILL at every commit stage and at random moments, then resume; the
finished zoo must equal an uninterrupted one byte for byte (metadata) and bit for bit (weights). Also the Ray path."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from symm.zoo import load, make_zoo
from symm.zoo.store import shard_paths

from test_zoo import TINY, tiny_plan

ROOT = Path(__file__).resolve().parent.parent
N = 8


def _cli(out: Path, space: Path, *extra: str, fault: str | None = None, wait: bool = True):
    env = {k: v for k, v in os.environ.items() if k != "SYMM_TEST_FAULT"}
    if fault:
        env["SYMM_TEST_FAULT"] = fault
    cmd = [sys.executable, "-m", "symm.cli", "zoo", "make", "--out", str(out), "--n-models", str(N), "--space", str(space),
           "--chunk-size", "2", "--workers", "1", "-q", *extra]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait:
        proc.communicate(timeout=300)
    return proc


@pytest.fixture(scope="module")
def space_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("space") / "space.json"
    path.write_text(json.dumps(TINY.to_json()))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, space_file) -> Path:
    out = tmp_path_factory.mktemp("ref") / "zoo"
    proc = _cli(out, space_file)
    assert proc.returncode == 0
    return out


def _assert_same_zoo(a: Path, b: Path) -> None:
    """Same manifest, same rows (every column but where the weights are stored), bit-identical weights."""
    assert json.loads((a / "manifest.json").read_text()) == json.loads((b / "manifest.json").read_text())
    za, zb = load(a), load(b)
    assert set(za.table.names) == set(zb.table.names)
    for col in set(za.table.names) - {"shard", "index"}:
        x, y = za.table[col], zb.table[col]
        assert x.dtype == y.dtype and (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else list(x) == list(y)), col
    for aid in np.unique(za.table["arch"]):
        wa, wb = za.select(arch=aid).weights(), zb.select(arch=aid).weights()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not [p for p in b.rglob(".tmp-*")], "temporary files left behind"


@pytest.mark.parametrize("stage", ["zoo-before-shard", "zoo-shard-written", "zoo-after-shard"])
def test_kill_at_commit_stage_then_resume(tmp_path, space_file, reference, stage):
    out = tmp_path / "zoo"
    finished = 0
    for _ in range(3):
        proc = _cli(out, space_file, fault=f"{stage}:kill")
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        zoo = load(out) if shard_paths(out) else None
        runs = len(np.unique(zoo.table["run_id"])) if zoo is not None else 0
        if zoo is not None:  # whatever is visible is whole and duplicate-free
            assert len(set(zoo.table["model_id"])) == len(zoo)
        # killed before the rename: nothing visible; killed after it: one more chunk each time
        assert (runs > finished) if stage == "zoo-after-shard" else runs == 0
        finished = runs
    assert _cli(out, space_file).returncode == 0
    _assert_same_zoo(reference, out)


def test_random_kills_then_resume(tmp_path, space_file, reference):
    out = tmp_path / "zoo"
    rng = random.Random(0)
    for _ in range(4):
        proc = _cli(out, space_file, wait=False)
        time.sleep(rng.uniform(2.0, 5.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if shard_paths(out):
            zoo = load(out)
            assert len(set(zoo.table["model_id"])) == len(zoo)
    assert _cli(out, space_file).returncode == 0
    _assert_same_zoo(reference, out)


def test_ray_and_local_paths_give_the_same_zoo(tmp_path):
    import ray

    local, remote = tmp_path / "local", tmp_path / "ray"
    plan = tiny_plan(6)
    make_zoo(local, plan, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        make_zoo(remote, plan, ray="local", chunk_size=2, progress=False)
    finally:
        ray.shutdown()
    _assert_same_zoo(local, remote)
