"""One writer per directory (a run directory, a search index): a lock file holding the
owner's pid and host.

``zsbir run`` and ``zsbir run --resume`` hold ``RUN_DIR/.zsbir.lock`` while they write the
directory; a second writer (the same run name started twice, or a resume while the run is
still going) is refused with :class:`RunLockedError` naming the owner. The lock file is
plain JSON (``pid``, ``host``, ``started``, the process start time and the command) written
to a temporary file and hard-linked into place, so it is created atomically and is never
seen half-written.

A lock is *stale*, and silently taken over, when its host is this machine and its process
is gone (no such pid, or a pid reused by a process that started later than the recorded
start time). A lock held on another host cannot be checked from here: the error says so,
and tells how to remove it after making sure that run is over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["LOCK_NAME", "DirLock", "RunLock", "RunLockedError", "lock_owner"]

log = logging.getLogger(__name__)

LOCK_NAME = ".zsbir.lock"


class RunLockedError(RuntimeError):
    """Another process is writing the run directory."""


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), else ``None``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if start is not None:
        now = _process_start(pid)
        if now is not None and now != start:
            return False  # the pid was reused by another process
    return True


def lock_owner(run_dir: str | Path, name: str = LOCK_NAME) -> dict[str, Any] | None:
    """The lock file's contents (``None``: not locked, or unreadable)."""
    try:
        data = json.loads((Path(run_dir) / name).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _stale(owner: dict[str, Any] | None, host: str) -> bool:
    if owner is None:
        return True  # written atomically, so unreadable means damaged by hand
    if owner.get("host") != host:
        return False
    pid = owner.get("pid")
    start = owner.get("start")
    return not (isinstance(pid, int) and _alive(pid, start if isinstance(start, int) else None))


class DirLock:
    """``with DirLock(directory):`` holds the directory's lock for the block.

    ``what`` (e.g. "run", "resume", "index build") is recorded for the error another
    writer sees. Subclasses set the file ``name``, the ``noun`` and ``advice`` of the
    refusal and the ``error`` class; ``broke_stale`` is the stale owner taken over, if any.
    """

    name: str = LOCK_NAME
    noun: str = "directory"
    advice: str = "wait for it to finish"
    error: type[Exception] = RuntimeError

    def __init__(self, directory: str | Path, what: str = "run"):
        self.run_dir = Path(directory)
        self.path = self.run_dir / self.name
        self.what = what
        self.host = socket.gethostname()
        self.info: dict[str, Any] = {}
        self.held = False
        self.broke_stale: dict[str, Any] | None = None

    def acquire(self) -> DirLock:
        pid = os.getpid()
        self.info = {"pid": pid, "host": self.host, "start": _process_start(pid),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": self.what,
                     "command": " ".join(sys.argv)[:500]}
        tmp = self.run_dir / f"{self.name}.{pid}.tmp"
        tmp.write_text(json.dumps(self.info), "utf-8")
        try:
            for _ in range(3):
                try:
                    _link(tmp, self.path)
                    self.held = True
                    return self
                except FileExistsError:
                    owner = lock_owner(self.run_dir, self.name)
                    if not _stale(owner, self.host):
                        raise self.error(self._refusal(owner)) from None
                    log.warning("removed the stale lock of %s (%s)", self.run_dir,
                                _describe(owner))
                    self.broke_stale = owner or {}
                    self.path.unlink(missing_ok=True)
            raise self.error(f"could not lock {self.noun} {str(self.run_dir)!r}: "
                             "another process keeps taking it")
        finally:
            tmp.unlink(missing_ok=True)

    def _refusal(self, owner: dict[str, Any] | None) -> str:
        where = "" if (owner or {}).get("host") == self.host else (
            f"; it runs on another host, so this one cannot check it: if that run is over, "
            f"delete {str(self.path)!r}")
        return (f"{self.noun} {str(self.run_dir)!r} is in use by another zsbir process "
                f"({_describe(owner)}){where}; {self.advice}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        owner = lock_owner(self.run_dir, self.name)
        if owner is not None and owner.get("pid") == self.info["pid"] \
                and owner.get("host") == self.host:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


class RunLock(DirLock):
    """``with RunLock(run_dir):`` holds ``RUN_DIR/.zsbir.lock`` (``zsbir run``, resume)."""

    noun = "run directory"
    advice = "wait for it to finish, or choose another run.name"
    error = RunLockedError


def _link(tmp: Path, path: Path) -> None:
    """Create ``path`` with ``tmp``'s contents, failing with FileExistsError if it exists."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: exclusive create instead
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(tmp.read_bytes())


def _describe(owner: dict[str, Any] | None) -> str:
    if owner is None:
        return "unreadable lock file"
    return (f"{owner.get('what', 'run')} by pid {owner.get('pid')} on {owner.get('host')}, "
            f"started {owner.get('started', '?')}")
