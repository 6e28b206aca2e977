"""The files of an index directory: opened safely, verified, written atomically.

- :func:`connect` opens ``index.sqlite``: writers in WAL mode; readers (``zsbir search``,
  :class:`zsbir.Index`) with ``mode=ro``, so a search never writes. A read-only index
  directory (``chmod -R a-w``, a read-only mount; or ``ZSBIR_INDEX_READ_ONLY=1``) is opened
  ``immutable=1`` when no write-ahead log is pending (SQLite could not create the WAL's
  ``-shm`` file there). Every open runs ``PRAGMA quick_check`` and checks the tables and
  settings: a damaged, empty or truncated database is :class:`IndexDamagedError`.
- :func:`write_atomic` / :func:`copy_atomic` write ``NAME.tmp`` and rename it; the
  temporary file is removed when the write fails.
- :func:`disk_errors` turns a full disk (``ENOSPC``, ``EDQUOT``, SQLite's "database or
  disk is full") and the SQLite errors a user can act on into one-line
  :class:`~zsbir.search.errors.SearchError` s naming the index directory.
- :func:`save_faiss` / :func:`read_faiss`: the faiss file is written with its size and
  SHA-256, which are recorded in ``meta`` and checked when it is loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from zsbir.digest import file_sha256  # noqa: F401 - re-exported (store, api)
from zsbir.search.errors import IndexDamagedError, SearchError
from zsbir.search.lock import LOCK_NAME

__all__ = ["DB_NAME", "FAISS_NAME", "MODEL_NAME", "READ_ONLY_ENV", "connect", "copy_atomic",
           "damaged", "db_dir", "disk_errors", "file_sha256", "index_state", "read_faiss",
           "read_meta", "remove_leftovers", "removing_temporaries", "save_faiss", "set_meta",
           "transaction", "write_atomic"]

DB_NAME, MODEL_NAME, FAISS_NAME = "index.sqlite", "model.pt", "photos.faiss"
READ_ONLY_ENV = "ZSBIR_INDEX_READ_ONLY"
TEMPORARIES = (MODEL_NAME + ".tmp", FAISS_NAME + ".tmp")
#: every name a finished or interrupted build/update/merge may leave in its directory
INDEX_FILES = frozenset({DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", DB_NAME + "-journal",
                         DB_NAME + ".damaged", MODEL_NAME, FAISS_NAME, LOCK_NAME,
                         *TEMPORARIES})
#: folders an index may hold: milvus-lite's database (backend milvus, its default URI)
INDEX_DIRS = frozenset({"milvus.db"})
REQUIRED_META = ("format_version", "photo_root", "hasher", "binary", "ann", "generation")
_FULL = "database or disk is full"


# ------------------------------------------------------------------------------ errors
def damaged(index_dir: str | Path, reason: str) -> IndexDamagedError:
    return IndexDamagedError(
        f"{DB_NAME} in {str(index_dir)!r} is damaged ({' '.join(reason.split())[:200]}): "
        "rebuild it with `zsbir index build RUN_DIR PHOTO_DIR INDEX_DIR` (into this "
        "directory: the damaged file is set aside)")


def no_space(index_dir: str | Path) -> SearchError:
    return SearchError(f"no space left on the device holding {str(index_dir)!r}: free some "
                       "space there, then run the same command again")


def _sqlite_error(exc: sqlite3.DatabaseError, index_dir: Path) -> SearchError | None:
    """A one-line error for the SQLite failures a user can act on; None for the others
    (a bug: it keeps its traceback)."""
    code = getattr(exc, "sqlite_errorcode", None)
    text = str(exc)
    if code == sqlite3.SQLITE_FULL or _FULL in text:
        return no_space(index_dir)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB) or \
            "malformed" in text or "not a database" in text:
        return damaged(index_dir, text)
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM) or \
            "readonly" in text or "unable to open" in text:
        return SearchError(f"cannot write or open {DB_NAME} in {str(index_dir)!r} ({text}): "
                           "check that the directory and its files are writable")
    if code == sqlite3.SQLITE_IOERR or "disk I/O error" in text:
        return SearchError(f"I/O error on {DB_NAME} in {str(index_dir)!r} ({text})")
    return None


@contextlib.contextmanager
def disk_errors(index_dir: str | Path) -> Iterator[None]:
    """Full disks and actionable SQLite errors inside the block -> one-line SearchError."""
    index_dir = Path(index_dir)
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise no_space(index_dir) from exc
        raise
    except sqlite3.DatabaseError as exc:
        err = _sqlite_error(exc, index_dir)
        if err is None:
            raise
        raise err from exc


@contextlib.contextmanager
def removing_temporaries(index_dir: str | Path) -> Iterator[None]:
    """On any failure in the block, delete the index's temporary files (``*.tmp``)."""
    try:
        yield
    except BaseException:
        for name in TEMPORARIES:
            with contextlib.suppress(OSError):
                (Path(index_dir) / name).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- the directory
def index_state(index_dir: Path) -> str:
    """``"new"`` (absent or empty), ``"leftovers"`` (only index files, no database: a
    build killed early), ``"index"`` (holds ``index.sqlite``) or ``"foreign"``."""
    if not index_dir.exists():
        return "new"
    if not index_dir.is_dir():
        return "foreign"
    names = [p.name for p in index_dir.iterdir()]
    if not names:
        return "new"
    ours = all(n in INDEX_FILES or n in INDEX_DIRS or
               (n.startswith(LOCK_NAME + ".") and n.endswith(".tmp")) for n in names)
    if not ours:
        return "foreign"
    return "index" if DB_NAME in names else "leftovers"


def remove_leftovers(index_dir: Path, keep_damaged: bool = True) -> None:
    """Clear an interrupted or damaged index before it is built again (the caller holds
    the write lock); a damaged database is kept as ``index.sqlite.damaged``."""
    db = index_dir / DB_NAME
    if keep_damaged and db.is_file() and db.stat().st_size:
        os.replace(db, index_dir / (DB_NAME + ".damaged"))
    for name in INDEX_FILES - {LOCK_NAME, DB_NAME + ".damaged"}:
        (index_dir / name).unlink(missing_ok=True)


def _read_only_dir(index_dir: Path) -> bool:
    if os.environ.get(READ_ONLY_ENV, "").strip() not in ("", "0"):
        return True
    db = index_dir / DB_NAME
    return not os.access(index_dir, os.W_OK) or not os.access(db, os.W_OK)


# ---------------------------------------------------------------------------- database
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,          -- relative to meta.photo_root, '/'-separated
                                        -- (a BLOB of the name's bytes if not UTF-8)
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,               -- of the very bytes that were embedded
    label TEXT,                         -- the photo's folder name (NULL at the root)
    embedding BLOB NOT NULL,            -- float32, meta.dim values
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_label ON photos(label);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""


def connect(index_dir: str | Path, *, write: bool = False, create: bool = False,
            read_only: bool | None = None) -> sqlite3.Connection:
    """Open ``INDEX_DIR/index.sqlite``, verified (see the module docstring).

    ``write``: a writer's connection (WAL mode); ``create``: make the tables (a new
    index). Otherwise a reader's; ``read_only`` forces (True) or forbids (False) the
    read-only-directory mode; ``None`` decides from :func:`os.access` and
    ``ZSBIR_INDEX_READ_ONLY``."""
    index_dir = Path(index_dir)
    db = index_dir / DB_NAME
    if not create:
        if not db.is_file():
            raise SearchError(f"{str(index_dir)!r} is not a zsbir index (no {DB_NAME}); "
                              "make one with `zsbir index build RUN_DIR PHOTO_DIR INDEX_DIR`")
        if db.stat().st_size == 0:
            raise damaged(index_dir, "an empty file")
    con = None
    try:
        if write or create:
            con = sqlite3.connect(db, timeout=30, isolation_level=None,
                                  check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=NORMAL")
            if create:
                con.executescript(SCHEMA)
                return con
        else:
            con = _reader(index_dir, _read_only_dir(index_dir) if read_only is None
                          else read_only)
        _verify(con, index_dir)
        return con
    except BaseException as exc:
        if con is not None:
            con.close()
        if isinstance(exc, sqlite3.DatabaseError):
            err = _sqlite_error(exc, index_dir)
            raise (err or SearchError(f"cannot read {DB_NAME} in {str(index_dir)!r}: "
                                      f"{exc}")) from exc
        raise


def _reader(index_dir: Path, read_only_dir: bool) -> sqlite3.Connection:
    db = index_dir / DB_NAME
    uri = db.resolve().as_uri() + "?mode=ro"
    wal = index_dir / (DB_NAME + "-wal")
    pending = wal.is_file() and wal.stat().st_size > 0
    if read_only_dir and not pending:
        uri += "&immutable=1"  # nothing can change it; no -shm file is needed
    try:
        return sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.OperationalError as exc:
        if read_only_dir and pending:
            raise SearchError(
                f"the index in {str(index_dir)!r} has uncommitted changes in {wal.name} (an "
                "interrupted build or update) and its directory is read-only: run `zsbir "
                "index update` on it once where it is writable") from exc
        raise


def _verify(con: sqlite3.Connection, index_dir: Path) -> None:
    rows = con.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        raise damaged(index_dir, "; ".join(str(r[0]) for r in rows[:3]))
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not {"meta", "photos", "skipped"} <= tables:
        raise damaged(index_dir, "no index tables: a build interrupted at its start?")
    meta = read_meta(con)
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise damaged(index_dir, f"settings missing: {', '.join(missing)}")


def db_dir(con: sqlite3.Connection) -> str:
    for _, name, file in con.execute("PRAGMA database_list"):
        if name == "main":
            return str(Path(file).parent)
    return "?"  # pragma: no cover


def read_meta(con: sqlite3.Connection) -> dict[str, Any]:
    """The ``meta`` table (JSON values); a damaged one is :class:`IndexDamagedError`."""
    try:
        return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}
    except (ValueError, TypeError) as exc:
        raise damaged(db_dir(con), f"unreadable settings: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        err = _sqlite_error(exc, Path(db_dir(con)))
        if err is None and "no such table" in str(exc):
            err = damaged(db_dir(con), str(exc))
        if err is None:
            raise
        raise err from exc


def set_meta(con: sqlite3.Connection, **items: Any) -> None:
    con.executemany("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
                    "SET value = excluded.value", [(k, json.dumps(v)) for k, v in items.items()])


@contextlib.contextmanager
def transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# -------------------------------------------------------------------------- other files
def write_atomic(path: Path, chunks: Iterable[bytes | memoryview]) -> str:
    """Write ``chunks`` to ``PATH.tmp``, fsync, rename to ``path``; the SHA-256 written.
    The temporary file is removed if anything fails."""
    tmp = path.with_name(path.name + ".tmp")
    h = hashlib.sha256()
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                h.update(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return h.hexdigest()


def copy_atomic(src: Path, dst: Path, sha256: str) -> None:
    """Copy ``src`` to ``dst`` atomically; its content must hash to ``sha256``."""
    with open(src, "rb") as f:
        got = write_atomic(dst, iter(lambda: f.read(1 << 20), b""))
    if got != sha256:
        dst.unlink(missing_ok=True)
        raise SearchError(f"{str(src)!r} changed while it was copied into "
                          f"{str(dst.parent)!r}; run the command again")


def save_faiss(index_dir: Path, index: Any, binary: bool) -> dict[str, Any]:
    """Write ``photos.faiss``; its ``faiss_sha256`` and ``faiss_bytes`` for ``meta``."""
    import faiss

    data = (faiss.serialize_index_binary if binary else faiss.serialize_index)(index)
    view = memoryview(data).cast("B")
    step = 1 << 24
    sha = write_atomic(index_dir / FAISS_NAME, (view[i:i + step]
                                                for i in range(0, len(view), step)))
    return {"faiss_sha256": sha, "faiss_bytes": len(view)}


def read_faiss(index_dir: Path, meta: dict[str, Any]) -> tuple[Any | None, str]:
    """The saved faiss index, or ``(None, why)`` when it cannot be trusted: no recorded
    checksum (an older index), another size or SHA-256 than recorded, unreadable."""
    import faiss
    import numpy as np

    path = index_dir / FAISS_NAME
    if "faiss_sha256" not in meta:
        return None, "no checksum recorded (an index made by an older zsbir)"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror})"
    if len(data) != meta.get("faiss_bytes") or \
            hashlib.sha256(data).hexdigest() != meta["faiss_sha256"]:
        return None, (f"its content differs from the one written ({len(data)} bytes, "
                      f"{meta.get('faiss_bytes')} recorded; or another SHA-256)")
    arr = np.frombuffer(data, np.uint8)
    try:
        read = faiss.deserialize_index_binary if meta["binary"] else faiss.deserialize_index
        return read(arr), ""
    except RuntimeError as exc:
        return None, f"faiss cannot read it ({' '.join(str(exc).split())[:120]})"
