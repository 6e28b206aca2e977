"""The photo rows of ``index.sqlite``: committing embedded batches, copying a shard's rows,
reading the stored embeddings back (checked: float32, the index's width, finite).

The schema, connections and transactions live in :mod:`zsbir.search.files`; what a row
holds is described in :mod:`zsbir.search.store`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.search.errors import IndexDamagedError
from zsbir.search.files import connect, damaged, db_dir, read_meta, set_meta, transaction
from zsbir.search.outputs import write_outputs
from zsbir.search.scan import db_name, fs_name, shown

__all__ = ["RowsGone", "gallery_embeddings"]


def _label(rel: str) -> str | None:
    parent = Path(rel).parent
    return None if parent == Path(".") else parent.name


def _stored_meta(index_dir: Path) -> dict[str, Any] | None:
    """The ``meta`` table of the index in ``index_dir``, or None when it is damaged."""
    try:
        con = connect(index_dir, read_only=False)
    except IndexDamagedError:
        return None
    try:
        return read_meta(con)
    finally:
        con.close()


def _commit_batch(con: sqlite3.Connection, meta: dict[str, Any],
                  found: dict[str, os.stat_result],
                  kept: list[tuple[str, tuple[str, int, int]]], emb: np.ndarray,
                  skipped: list[tuple[str, str]],
                  outs: dict[str, np.ndarray] | None = None) -> None:
    """One transaction: the batch's embeddings (each with the SHA-256, size and mtime of
    the bytes it was computed from), their other stored outputs (``outs``,
    :mod:`zsbir.search.outputs`) and skips, and a new generation. A non-finite embedding
    or output is not stored: the photo is skipped."""
    records, skipped, rows = [], list(skipped), []
    for k, ((rel, (sha, size, mtime)), vec) in enumerate(zip(kept, emb)):
        if not np.isfinite(vec).all() or not all(np.isfinite(a[k]).all()
                                                 for a in (outs or {}).values()):
            skipped.append((rel, "the model gave a non-finite embedding"))
            continue
        rows.append(k)
        records.append((db_name(rel), size, mtime, sha, db_name(_label(rel)),
                        np.ascontiguousarray(vec, dtype=np.float32).tobytes(), time.time()))
    with transaction(con):
        con.executemany(
            "INSERT INTO photos(path, size, mtime_ns, sha256, label, embedding, indexed_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, "
            "label = excluded.label, embedding = excluded.embedding, "
            "indexed_at = excluded.indexed_at", records)
        # a file that became unreadable is no longer in the index
        con.executemany("DELETE FROM photos WHERE path = ?",
                        [(db_name(r),) for r, _ in skipped])
        con.executemany(
            "INSERT INTO skipped(path, size, mtime_ns, reason) VALUES(?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, reason = excluded.reason",
            [(db_name(r), found[r].st_size, found[r].st_mtime_ns, e) for r, e in skipped])
        con.executemany("DELETE FROM skipped WHERE path = ?", [(r[0],) for r in records])
        if outs:  # the photos' other outputs, with their rows (zsbir.search.outputs)
            meta["outputs"] = write_outputs(con, meta, [r[0] for r in records],
                                            {n: a[rows] for n, a in outs.items()})
            set_meta(con, outputs=meta["outputs"])
        meta["generation"] += 1
        set_meta(con, generation=meta["generation"], updated=time.time(),
                 dim=int(emb.shape[1]) if len(records) else meta.get("dim"))


def _copy_rows(src: sqlite3.Connection, dst: sqlite3.Connection) -> None:
    """A shard's photo rows (with their embeddings) and skipped files, as they are."""
    dst.executemany(
        "INSERT INTO photos(path, size, mtime_ns, sha256, label, embedding, indexed_at) "
        "VALUES(?, ?, ?, ?, ?, ?, ?)",
        src.execute("SELECT path, size, mtime_ns, sha256, label, embedding, indexed_at "
                    "FROM photos ORDER BY path"))
    dst.executemany("INSERT INTO skipped(path, size, mtime_ns, reason) VALUES(?, ?, ?, ?)",
                    src.execute("SELECT path, size, mtime_ns, reason FROM skipped"))


def _vectors(con: sqlite3.Connection, rows: list[tuple[Any, bytes]], dim: int | None
             ) -> np.ndarray:
    """Stored embeddings ``(path, blob)``, checked: float32, ``dim`` values, all finite
    (else :class:`~zsbir.search.errors.IndexDamagedError` naming the photo)."""
    vecs = []
    for path, blob in rows:
        if not isinstance(blob, bytes) or len(blob) % 4 or (dim and len(blob) != 4 * dim):
            raise damaged(db_dir(con), f"photo {shown(fs_name(path) or '?')!r} has a "
                                       "malformed embedding")
        vecs.append(np.frombuffer(blob, dtype=np.float32))
    if not vecs:
        return np.zeros((0, dim or 1), np.float32)
    emb = np.stack(vecs)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        path = rows[int(np.flatnonzero(~finite)[0])][0]
        raise damaged(db_dir(con), f"photo {shown(fs_name(path) or '?')!r} has a "
                                   "non-finite embedding")
    return emb


def _load_rows(con: sqlite3.Connection, dim: int | None = None
               ) -> tuple[np.ndarray, list[str], list[str | None], np.ndarray]:
    ids, paths, labels, blobs = [], [], [], []
    for i, p, lab, blob in con.execute(
            "SELECT id, path, label, embedding FROM photos ORDER BY path"):
        ids.append(i)
        paths.append(fs_name(p))
        labels.append(fs_name(lab))
        blobs.append((p, blob))
    emb = _vectors(con, blobs, dim)
    return np.asarray(ids, np.int64), paths, labels, emb


class RowsGone(LookupError):
    """Some of the photos asked for are no longer in the database (an update removed them)."""


def gallery_embeddings(con: sqlite3.Connection, ids: np.ndarray) -> np.ndarray:
    """Stored float32 embeddings of the photos ``ids`` (in that order), checked finite;
    :class:`RowsGone` when one of them is no longer in the database."""
    dim = read_meta(con).get("dim")
    out = []
    for chunk in range(0, len(ids), 900):
        part = [int(i) for i in ids[chunk:chunk + 900]]
        got = {i: (p, e) for i, p, e in con.execute(
            f"SELECT id, path, embedding FROM photos WHERE id IN "
            f"({','.join('?' * len(part))})", part)}
        if len(got) != len(part):
            raise RowsGone(sorted(set(part) - set(got))[:5])
        out.append(_vectors(con, [got[i] for i in part], dim))
    return np.concatenate(out) if out else np.zeros((0, dim or 1), np.float32)
