"""The evaluator's thread pool: numpy work on row blocks, one job per block.

numpy releases the GIL, and a plain thread pool has no OpenMP team barrier to stall on a
busy machine (torch's intra-op threads made the many small (n, P) operations ~6x slower
there; :mod:`zsbir.evaluation.ranking`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__: list[str] = []

_POOL: ThreadPoolExecutor | None = None


def _workers() -> int:
    """The pool's size: torch's intra-op threads (set per phase by zsbir.engine.threads),
    at most the CPUs this process may use (affinity and cgroup quota)."""
    from zsbir.engine.threads import usable_cpus

    return max(1, min(torch.get_num_threads(), usable_cpus().cpus))


def _parallel(jobs: list[Callable[[], None]]) -> None:
    """Run the jobs on the evaluator's thread pool (inline when single-threaded)."""
    global _POOL
    workers = _workers()
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    if _POOL is None or _POOL._max_workers != workers:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zsbir-eval")
    for f in [_POOL.submit(job) for job in jobs]:
        f.result()
