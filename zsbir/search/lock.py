"""The write lock of an index directory: one writer at a time, stale locks detected.

The lock is a file ``INDEX_DIR/write.lock`` created with ``O_CREAT | O_EXCL`` (atomic on
local file systems) holding JSON ``{"pid", "host", "started"}``. A second writer finds it
and is refused with the holder's pid and host. A lock left by a process that died (same
host, pid no longer running) is stale: it is removed and taken over, with a note. A lock
from another host cannot be checked and is never broken automatically.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from zsbir.search.errors import IndexLockedError

__all__ = ["WriteLock"]

LOCK_NAME = "write.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WriteLock:
    """Context manager holding ``directory/write.lock`` (see the module docstring)."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self.broke_stale: dict | None = None
        self._held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        return True

    def acquire(self) -> WriteLock:
        for _ in range(3):
            if self._create():
                self._held = True
                return self
            try:
                holder = json.loads(self.path.read_text())
                pid, host = int(holder["pid"]), str(holder["host"])
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except (ValueError, KeyError, TypeError):
                # half-written by a writer that died between create and write, or junk
                if time.time() - self.path.stat().st_mtime < 5:
                    time.sleep(0.2)
                    continue
                holder, pid, host = {}, -1, socket.gethostname()
            if host == socket.gethostname() and (pid < 0 or not _pid_alive(pid)):
                self.broke_stale = holder
                self.path.unlink(missing_ok=True)
                continue
            raise IndexLockedError(
                f"index {str(self.path.parent)!r} is being written by pid {pid} on host "
                f"{host} (since {holder.get('started', '?')}); wait for it to finish"
                + ("" if host == socket.gethostname() else
                   f", or delete {str(self.path)!r} if that process is gone"))
        raise IndexLockedError(f"could not take the write lock {str(self.path)!r}")

    def release(self) -> None:
        if self._held:
            self.path.unlink(missing_ok=True)
            self._held = False

    def __enter__(self) -> WriteLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
