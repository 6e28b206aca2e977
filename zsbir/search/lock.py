"""The write lock of an index directory: ``INDEX_DIR/write.lock``, one writer at a time,
stale locks (a dead process on this host) taken over; the same lock as a run directory's
(:class:`zsbir.engine.lock.DirLock`), refusing with :class:`IndexLockedError`."""

from __future__ import annotations

from zsbir.engine.lock import DirLock
from zsbir.search.errors import IndexLockedError

__all__ = ["LOCK_NAME", "WriteLock"]

LOCK_NAME = "write.lock"


class WriteLock(DirLock):
    """``with WriteLock(index_dir):`` holds the index's write lock for the block."""

    name = LOCK_NAME
    noun = "index"
    advice = "wait for it to finish"
    error = IndexLockedError

    def __init__(self, directory: object, what: str = "index build/update"):
        super().__init__(directory, what)  # type: ignore[arg-type]
