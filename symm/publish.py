"""All-or-nothing output folders: a lock per output, a staging folder, publication by rename, crash recovery.

A run that writes a set of entries (files or folders) into ``out``:

1. takes an exclusive, non-blocking ``flock`` on a lock file beside ``out`` (a second run fails at once);
2. recovers what earlier killed runs left for this ``out`` (their lock is not held, since we hold it);
3. writes the whole set into a staging folder named ``.symm-stage-<key>-<token>`` (``key`` hashes ``out``);
4. publishes: if ``out`` does not exist the staging folder *becomes* ``out`` with one ``rename`` (atomic).
   If ``out`` already holds other files, a commit marker is written into the staging folder (inside ``out``),
   old entries are moved into the staging folder's trash (the report first), and the new entries are renamed in
   (the report last). A run killed between those renames is rolled forward by the next run on ``out``. Readers
   can rely on: if the report exists, every entry it lists exists and belongs to the same run.

Staging folders and published entries get the umask's default modes. ``SYMM_TEST_FAULT=<stage>[:kill|:enospc|:sleepN]``
makes :func:`fault_point` kill the process (raise ENOSPC, sleep N s) at a named stage, for fault-injection tests.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError
from .io import default_mode

log = logging.getLogger(__name__)

FAULT_ENV = "SYMM_TEST_FAULT"
STAGE_PREFIX = ".symm-stage-"
COMMIT = ".symm-commit.json"
TRASH = ".symm-trash"


def fault_point(stage: str) -> None:
    """Test hook: die (SIGKILL), raise ENOSPC or sleep here if ``$SYMM_TEST_FAULT`` names this stage."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, action = spec.partition(":")
    if not spec or name != stage:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stage)
    if action.startswith("sleep"):
        time.sleep(float(action[5:] or 1))
        return
    os.kill(os.getpid(), signal.SIGKILL)


def out_key(out: Path) -> str:
    """A short stable name for an output folder (its real path hashed)."""
    return hashlib.sha1(os.path.realpath(out).encode()).hexdigest()[:12]


def lock_path(out: Path) -> Path:
    """The lock file beside ``out``: ``.<name>.symm-lock`` (hashed if the name would be too long).

    An existing ``out`` whose parent is not writable (``--out .`` in a read-only parent) is locked from inside.
    """
    if out.is_dir() and not os.access(out.parent, os.W_OK | os.X_OK):
        return out / ".symm-lock"
    name = f".{out.name}.symm-lock"
    return out.parent / (name if len(os.fsencode(name)) <= 200 else f".symm-lock-{out_key(out)}")


class OutputLock:
    """Exclusive, non-blocking lock on an output folder (``fcntl.flock`` on a lock file beside it)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = lock_path(out)
        self.fd: int | None = None

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, default_mode())
            except OSError as exc:
                raise OutputError(f"cannot create the lock file {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise OutputError(
                    f"another run is writing to {self.out} ({holder or 'lock held'}; lock file {self.path}); "
                    "wait for it to finish or choose another --out"
                ) from None
            if self._still_ours(fd):
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}".encode())
                self.fd = fd
                return self
            os.close(fd)  # the previous holder removed the file between our open and flock: retry

    def _still_ours(self, fd: int) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it, so a waiter sees a different inode and retries
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _stage_dirs(folder: Path, key: str) -> list[Path]:
    try:
        return [p for p in folder.iterdir() if p.name.startswith(f"{STAGE_PREFIX}{key}-") and p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def _committed(stage: Path) -> list[str]:
    """The entries a staging folder committed to publish (empty if it never reached its commit point)."""
    try:
        names = json.loads((stage / COMMIT).read_text())["entries"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")]


def recover(out: Path) -> list[str]:
    """Clean up after killed runs on ``out`` (call with the lock held): roll committed publications forward,
    delete uncommitted staging folders. Returns what was done, for the log."""
    key, done = out_key(out), []
    for stage in _stage_dirs(out.parent, key):
        shutil.rmtree(stage, ignore_errors=True)
        done.append(f"removed unfinished staging folder {stage}")
    if out.is_dir():
        for stage in _stage_dirs(out, key):
            names = _committed(stage)
            if names:
                _move_in(stage, out, names)
                done.append(f"completed an interrupted publication of {', '.join(names)} in {out}")
            shutil.rmtree(stage, ignore_errors=True)
            done.append(f"removed staging folder {stage}")
    for line in done:
        log.warning("%s", line)
    return done


def make_staging(out: Path) -> Path:
    """A fresh staging folder: beside ``out`` if ``out`` does not exist (published by one rename), else inside it
    (an existing ``out`` may be a mount point: entries are moved within its file system)."""
    home = out if out.exists() else out.parent
    stage = home / f"{STAGE_PREFIX}{out_key(out)}-{secrets.token_hex(8)}"
    try:
        stage.mkdir(mode=0o700)
    except OSError as exc:
        raise OutputError(f"cannot write to {home}: {exc.strerror}") from None
    return stage


def _set_modes(root: Path) -> None:
    """Umask-default modes on ``root`` and everything below it (not following symlinks)."""
    file_mode, dir_mode = default_mode(False), default_mode(True)
    for folder, dirs, files in os.walk(root):
        os.chmod(folder, dir_mode)
        for name in files:
            p = os.path.join(folder, name)
            if not os.path.islink(p):
                os.chmod(p, file_mode)


def _move_in(stage: Path, out: Path, names: Sequence[str]) -> None:
    """Idempotent publication step: trash old entries that still have a staged replacement, then move staged in.

    ``names`` is in publication order (the report last); old entries are trashed in reverse (the report first).
    """
    trash = stage / TRASH
    for name in reversed(names):
        if (stage / name).exists() and (out / name).exists():
            trash.mkdir(exist_ok=True)
            os.rename(out / name, trash / name)
            fault_point("publish-trashed")
    for name in names:
        if (stage / name).exists() or (stage / name).is_symlink():
            os.rename(stage / name, out / name)
            fault_point("publish-partial")


def _roll_back(stage: Path, out: Path, names: Sequence[str]) -> None:
    """Undo a failed (not killed) publication: new entries back into staging, old ones back from the trash."""
    try:
        for name in names:
            if not os.path.lexists(stage / name) and os.path.lexists(out / name):
                os.rename(out / name, stage / name)
        trash = stage / TRASH
        for name in names:
            if os.path.lexists(trash / name):
                os.rename(trash / name, out / name)
        os.unlink(stage / COMMIT)
    except OSError as exc:
        log.error("could not undo the partial publication in %s (%s); the next run on it completes it", out, exc)


def publish(stage: Path, out: Path, names: Sequence[str]) -> None:
    """Make the staged entries ``names`` (publication order, the report last) appear in ``out``."""
    _set_modes(stage)
    fault_point("publish")
    if stage.parent != out:
        try:
            os.rename(stage, out)  # out absent: one atomic step
            fault_point("published")
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
        # someone created out meanwhile: publish into it entry by entry from a staging folder inside it
        inner = make_staging(out)
        for name in names:
            os.rename(stage / name, inner / name)
        shutil.rmtree(stage, ignore_errors=True)
        stage = inner
    tmp = stage / f"{COMMIT}.tmp"
    tmp.write_text(json.dumps({"entries": list(names), "pid": os.getpid()}))
    os.rename(tmp, stage / COMMIT)  # the commit point: from here on, recovery rolls forward
    try:
        _move_in(stage, out, names)
    except OSError:
        _roll_back(stage, out, names)
        raise
    fault_point("published")
    shutil.rmtree(stage, ignore_errors=True)


def discard(stage: Path | None) -> None:
    """Remove an unpublished staging folder (after an error)."""
    if stage is not None and stage.exists() and not (stage / COMMIT).exists():
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged_output(out: Path, check: Callable[[], None]) -> Iterator[Path]:
    """Lock ``out``, clean up what killed runs left, run ``check`` again under the lock and yield a fresh staging
    folder; the caller writes into it and :func:`publish` es it inside the block. On any exception the stage is
    discarded and nothing reaches ``out``; the lock is released either way."""
    stage: Path | None = None
    with OutputLock(out):
        try:
            recover(out)  # what killed runs left (their lock is free: we hold it)
            check()
            stage = make_staging(out)
            fault_point("locked")
            yield stage
        except BaseException:
            discard(stage)
            raise
