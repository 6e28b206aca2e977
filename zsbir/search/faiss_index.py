"""The index's search structure, ``photos.faiss``, derived from the stored embeddings: built
(flat, or IVF with a measured ``nprobe``), written and recorded, and loaded back (rebuilt in
memory when it does not reflect the database or is not the file that was written).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.evaluation.distances import l2_normalize
from zsbir.search.files import (
    DB_NAME,
    FAISS_NAME,
    read_faiss,
    read_meta,
    save_faiss,
    set_meta,
    transaction,
)
from zsbir.search.rows import _load_rows
from zsbir.search.scan import fs_name, shown

__all__ = ["FaissIndex", "encode", "load_faiss", "make_faiss"]

log = logging.getLogger(__name__)

IVF_TARGET_RECALL = 0.95
IVF_RECALL_QUERIES = 500


@dataclass
class FaissIndex:
    """The loaded search structure and the photos in its vector order."""

    index: Any
    ids: np.ndarray                   # sqlite ids, in vector order (= path order)
    paths: list[str]                  # relative paths (as os.fsdecode gives them)
    labels: list[str | None]
    binary: bool
    generation: int


def encode(hasher: Any, emb: np.ndarray) -> np.ndarray:
    """Codes for faiss: packed uint8 (binary hashers) or L2-normalized float32."""
    return np.ascontiguousarray(hasher.encode(emb)) if hasher.binary else l2_normalize(emb)


def make_faiss(con: sqlite3.Connection, tm: Any, meta: dict[str, Any]) -> tuple[Any, dict]:
    """Build the faiss index of every stored embedding (path order)."""
    import faiss

    ids, paths, labels, emb = _load_rows(con, meta.get("dim"))
    h = tm.hasher(meta["hasher"])
    binary = bool(meta["binary"])
    n = len(ids)
    codes = encode(h, emb) if n else None
    width = (codes.shape[1] if n else 1) if binary else (emb.shape[1] if n else
                                                          meta.get("dim") or 1)
    info: dict[str, Any] = {}
    if meta["ann"] == "ivf" and n >= 2:
        from zsbir.hashing.ann import build_binary_ivf, build_ivf

        ann = build_binary_ivf(codes, nprobe=1) if binary else build_ivf(codes, nprobe=1)
        info = _tune_nprobe(ann, codes, binary)
        index = ann.index
    elif binary:
        index = faiss.IndexBinaryFlat(8 * width)
        if n:
            index.add(codes)
    else:
        index = faiss.IndexFlatIP(width)
        if n:
            index.add(codes)
    return FaissIndex(index, ids, paths, labels, binary, meta["generation"]), info


def _tune_nprobe(ann: Any, codes: np.ndarray, binary: bool) -> dict[str, Any]:
    """The smallest power-of-two ``nprobe`` whose recall@10 against exact search reaches
    0.95 (:func:`zsbir.hashing.ann.recall_at_k`; Hamming ties at the 10th distance count as
    hits), measured with up to 500 photos of the collection as queries and their 10 nearest
    *other* photos (each query's own entry, first in both rankings, is left out)."""
    from zsbir.hashing.ann import build_exact, recall_at_k

    n = codes.shape[0]
    q = codes[np.random.default_rng(0).choice(n, min(n, IVF_RECALL_QUERIES), replace=False)]
    k = min(10, n - 1)
    exact = build_exact(codes, binary=binary).search(q, k + 1)
    exact = (exact[0][:, 1:], exact[1][:, 1:])
    nlist = int(ann.params["nlist"])
    nprobe = 1
    while True:
        ann.set_nprobe(nprobe)
        v, i = ann.search(q, k + 1)
        recall = recall_at_k((v[:, 1:], i[:, 1:]), exact, k, binary=binary)
        if recall >= IVF_TARGET_RECALL or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    return {"nlist": nlist, "nprobe": nprobe, "recall_at_10": recall,
            "recall_queries": int(q.shape[0])}


def _write_faiss(index_dir: Path, con: sqlite3.Connection, fx: FaissIndex,
                 info: dict[str, Any]) -> None:
    """Write ``photos.faiss`` and record it: marked stale first, so a kill between the file
    and the record leaves an index that readers rebuild in memory, never a mismatch."""
    with transaction(con):
        set_meta(con, faiss_generation=-1)
    written = save_faiss(index_dir, fx.index, fx.binary)
    with transaction(con):
        set_meta(con, faiss_generation=fx.generation, count=int(fx.index.ntotal),
                 **written, **info)


def load_faiss(index_dir: Path, con: sqlite3.Connection, tm: Any) -> FaissIndex:
    """The saved faiss index when it reflects the database and is the file that was
    written (size and SHA-256 in ``meta``); else one rebuilt in memory from the stored
    embeddings (with a warning when the file is damaged: ``zsbir index update`` rewrites
    it)."""
    index_dir = Path(index_dir)
    meta = read_meta(con)
    path = index_dir / FAISS_NAME
    if meta.get("faiss_generation") != meta["generation"] or not path.is_file():
        fx, _ = make_faiss(con, tm, meta)  # an interrupted build/update: last commit
        return fx
    index, why = read_faiss(index_dir, meta)
    ids, paths, labels = [], [], []
    for i, p, lab in con.execute("SELECT id, path, label FROM photos ORDER BY path"):
        ids.append(i)
        paths.append(fs_name(p))
        labels.append(fs_name(lab))
    if index is not None:
        if index.ntotal != len(ids):  # a writer committed between the two reads
            fx, _ = make_faiss(con, tm, read_meta(con))
            return fx
        if not meta["binary"] and meta.get("dim") and index.d != meta["dim"]:
            index, why = None, f"{index.d}-dimensional vectors, not {meta['dim']}"
    if index is None:
        log.warning("%s in %s cannot be trusted (%s): rebuilt in memory from %s; `zsbir index "
                    "update %s` rewrites it", FAISS_NAME, shown(index_dir), why, DB_NAME,
                    shown(index_dir))
        fx, _ = make_faiss(con, tm, meta)
        return fx
    if meta.get("nprobe"):
        index.nprobe = int(meta["nprobe"])
    return FaissIndex(index, np.asarray(ids, np.int64), paths, labels, bool(meta["binary"]),
                      meta["generation"])
