"""Run zoo chunks as Ray tasks on an existing cluster (``pip install symm[ray]``)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from ..errors import UsageError
from .train import ChunkResult, ChunkTask, train_chunk

log = logging.getLogger(__name__)


def run_on_ray(tasks: Sequence[ChunkTask], address: str) -> Iterator[ChunkResult]:
    """One single-CPU Ray task per chunk; results are yielded as they finish (the caller commits them).

    ``address`` is ``auto`` (the cluster this machine belongs to), ``host:port`` / ``ray://...``, or ``local`` to
    use the Ray runtime this process already initialised (e.g. ``ray.init(num_cpus=2)``).
    """
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'symm[ray]'") from None
    if not ray.is_initialized():
        if address == "local":
            raise UsageError("--ray local needs ray.init() to have been called in this process")
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
    remote = ray.remote(num_cpus=1, max_retries=2)(train_chunk)
    pending = [remote.remote(t) for t in tasks]
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
