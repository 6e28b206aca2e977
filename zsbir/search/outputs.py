"""Per-photo model outputs stored in an index (contract 1 of issue 25): the outputs a pair
scorer or a reranker reads (``tokens``, ``logits``, ...), kept beside each photo's row so
that ``zsbir search --pair-scorer`` and ``zsbir serve`` re-score without re-running the
model on any photo.

**Storage: a table of ``index.sqlite``**, ``outputs(photo_id, name, data)``, one BLOB per
photo and output (C-order values of ``meta.output_dtype``, shape ``meta.outputs[name]``),
keyed by the photo's id; a trigger deletes a photo's outputs with its row. Chosen over a
memory-mapped side file because the database is the index's source of truth: every
embedded batch commits its rows *and* their outputs in one transaction, so a killed build
resumes, an update replaces or drops them, and a merge copies them, with nothing else to
keep consistent (no compaction after deletions, no second generation counter). Size: a
ViT-B/16's 197 x 768 tokens are 605 KB per photo in float32, 303 KB with
``--output-dtype float16`` (SQLite keeps such a BLOB in overflow pages, read
sequentially); top-K re-scoring reads K of them per query
(``benchmarks/bench_pairs.py`` measures it). float16 halves the index and changes
scores by float16's rounding (relative ~1e-3; tested).

Which outputs: those the run's ``[pair_scorer]`` and ``[[rerankers]]`` declare
(``outputs``) plus ``zsbir index build --outputs NAME[,NAME]``; recorded in ``meta``
(``output_names``, ``output_dtype``, ``outputs``: name -> per-photo shape) at the build and
kept by updates, resumes and merges.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from zsbir.search.errors import SearchError

__all__ = ["DTYPES", "copy_outputs", "ensure_schema", "read_outputs", "stored_output_names",
           "write_outputs"]

#: the storage types offered (``zsbir index build --output-dtype``)
DTYPES = ("float32", "float16")

#: the table and the trigger that drops a photo's outputs with its row
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS outputs (
    photo_id INTEGER NOT NULL,          -- photos.id
    name TEXT NOT NULL,                 -- the model output's name (meta.output_names)
    data BLOB NOT NULL,                 -- meta.output_dtype values, shape meta.outputs[name]
    PRIMARY KEY (photo_id, name))""",
    """CREATE TRIGGER IF NOT EXISTS photo_outputs_gone AFTER DELETE ON photos
    BEGIN DELETE FROM outputs WHERE photo_id = old.id; END""",
)


def ensure_schema(con: sqlite3.Connection) -> None:
    """Create the outputs table and its trigger (inside the caller's transaction)."""
    for stmt in SCHEMA:
        con.execute(stmt)


def stored_output_names(tm: Any, extra: Sequence[str] = ()) -> list[str]:
    """The outputs an index of the trained model ``tm`` stores: those its pair scorer and
    rerankers declare, then ``extra``; checked on a blank photo, so that a model that does
    not give one is refused (SearchError) before anything is written."""
    from PIL import Image

    from zsbir.data.base import PHOTO
    from zsbir.pairs import needed_outputs

    names = list(needed_outputs([tm.pair_scorer, *tm.rerankers], extra))
    if names:
        size = int(getattr(tm.transform.for_domain(PHOTO), "size", 0) or 32)
        tm.forward_images([Image.new("RGB", (size, size), "white")], PHOTO,
                          ("embedding", *names))
    return names


def write_outputs(con: sqlite3.Connection, meta: dict[str, Any], paths: Sequence[Any],
                  outs: Mapping[str, np.ndarray]) -> dict[str, list[int]]:
    """Store the outputs of the photos ``paths`` (database names of rows just written,
    row ``i`` of every array in ``outs`` is ``paths[i]``'s), replacing older ones; inside
    the caller's transaction. Returns ``meta``'s ``outputs`` (name -> per-photo shape),
    checked: a model that gives another shape than the index holds is a SearchError."""
    names = list(meta.get("output_names") or [])
    shapes: dict[str, list[int]] = dict(meta.get("outputs") or {})
    if not names or not paths:
        return shapes
    dtype = np.dtype(meta.get("output_dtype") or "float32")
    ids = [con.execute("SELECT id FROM photos WHERE path = ?", (p,)).fetchone()[0]
           for p in paths]
    for name in names:
        arr = outs.get(name)
        if arr is None:
            raise SearchError(f"the model gave no output {name!r}, which the index stores")
        shape = list(arr.shape[1:])
        if shapes.setdefault(name, shape) != shape:
            raise SearchError(f"the model gives {name!r} of shape {tuple(shape)}, the index "
                              f"holds {tuple(shapes[name])}")
        data = np.ascontiguousarray(arr, dtype=dtype)
        if dtype != arr.dtype and not np.isfinite(data).all():
            raise SearchError(f"output {name!r} exceeds the {dtype} range (values up to "
                              f"{float(np.abs(arr).max()):.3g}): build the index with "
                              "--output-dtype float32")
        con.executemany(
            "INSERT INTO outputs(photo_id, name, data) VALUES(?, ?, ?) "
            "ON CONFLICT(photo_id, name) DO UPDATE SET data = excluded.data",
            [(i, name, data[k].tobytes()) for k, i in enumerate(ids)])
    return shapes


def copy_outputs(src: sqlite3.Connection, dst: sqlite3.Connection) -> None:
    """A shard's stored outputs into the merged index (whose photo rows, copied first, have
    new ids: matched by path)."""
    if not _has_table(src):
        return
    ensure_schema(dst)
    rows = src.execute("SELECT p.path, o.name, o.data FROM outputs o "
                       "JOIN photos p ON p.id = o.photo_id ORDER BY p.path")
    dst.executemany("INSERT INTO outputs(photo_id, name, data) "
                    "SELECT id, ?, ? FROM photos WHERE path = ?",
                    ((name, data, path) for path, name, data in rows))


def _has_table(con: sqlite3.Connection) -> bool:
    return con.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = "
                       "'outputs'").fetchone() is not None


def read_outputs(con: sqlite3.Connection, meta: dict[str, Any], name: str,
                 ids: Iterable[int]) -> tuple[np.ndarray, list[int]]:
    """The stored output ``name`` of the photos ``ids`` (in that order) as float32
    (N, *shape), and the ids that have none (a photo removed meanwhile, or a damaged
    index: the caller decides)."""
    ids = [int(i) for i in ids]
    shape = tuple((meta.get("outputs") or {}).get(name, ()))
    dtype = np.dtype(meta.get("output_dtype") or "float32")
    width = int(np.prod(shape)) if shape else 0
    out = np.zeros((len(ids), *shape), np.float32)
    missing: list[int] = []
    if name not in (meta.get("output_names") or []) or not ids:
        return out, ids if name not in (meta.get("output_names") or []) else []
    got: dict[int, bytes] = {}
    for lo in range(0, len(ids), 900):
        part = ids[lo:lo + 900]
        got.update(con.execute(
            f"SELECT photo_id, data FROM outputs WHERE name = ? AND photo_id IN "
            f"({','.join('?' * len(part))})", [name, *part]))
    for k, i in enumerate(ids):
        blob = got.get(i)
        if blob is None or len(blob) != width * dtype.itemsize:
            missing.append(i)
            continue
        out[k] = np.frombuffer(blob, dtype=dtype).reshape(shape)
    return out, missing
