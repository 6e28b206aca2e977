"""Checking an index backend without a model: an index directory made from given
embeddings (:func:`index_from_embeddings`), searched through the backend
(:func:`zsbir.search.backends.search_loaded`), against a plain NumPy ranking
(:func:`naive_ranking`: cosine similarity descending or Hamming distance ascending, ties by
photo path). Used by the contract suite (:func:`zsbir.testing.check_index_backend`) and
the tests that compare backends on the same embeddings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SignHasher", "StandInModel", "index_from_embeddings", "naive_ranking"]


@dataclass
class SignHasher:
    """Binary codes: bit j = embedding[j] > 0, packed (numpy.packbits order)."""

    tag: str = "sign"
    binary: bool = True

    def encode(self, emb: np.ndarray) -> np.ndarray:
        return np.packbits(np.asarray(emb) > 0, axis=1)


@dataclass
class _Real:
    tag: str = "real"
    binary: bool = False

    def encode(self, emb: np.ndarray) -> np.ndarray:
        return np.asarray(emb, np.float32)


class StandInModel:
    """What a backend's writer asks of the model: its hashers by tag."""

    def __init__(self, binary: bool):
        self._h = SignHasher() if binary else _Real()

    def hasher(self, tag: str | None) -> Any:
        return self._h


def index_from_embeddings(backend: Any, index_dir: Path, emb: np.ndarray, paths: list[str],
                          *, binary: bool, ann: str = "flat",
                          model_sha256: str = "0" * 64) -> tuple[Any, Any]:
    """An index directory holding ``paths`` (relative, their folder is the class) with
    these embeddings, its search structure written by ``backend``: ``(loaded, con)``."""
    from zsbir.search.files import connect, set_meta, transaction
    from zsbir.search.rows import _label
    from zsbir.search.scan import db_name

    index_dir = Path(index_dir)
    index_dir.mkdir(parents=True, exist_ok=True)
    tm = StandInModel(binary)
    con = connect(index_dir, create=True)
    with transaction(con):
        set_meta(con, format_version=1, name=index_dir.name, model_file="model.pt",
                 photo_root=str(index_dir / "photos"), hasher=tm.hasher(None).tag,
                 binary=binary, ann=ann, generation=1, faiss_generation=-1,
                 model_sha256=model_sha256, dim=int(emb.shape[1]), created=time.time(),
                 **backend.settings(index_dir, ann))
        con.executemany(
            "INSERT INTO photos(path, size, mtime_ns, sha256, label, embedding, indexed_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?)",
            [(db_name(p), 1, 1, f"{i:064x}", db_name(_label(p)),
              np.ascontiguousarray(e, np.float32).tobytes(), 0.0)
             for i, (p, e) in enumerate(zip(paths, emb))])
    from zsbir.search.files import read_meta

    meta = read_meta(con)
    fx, _ = backend.writer(index_dir, con, tm, meta).finish()
    return fx, con


def naive_ranking(query: np.ndarray, emb: np.ndarray, paths: list[str], top: int, *,
                  binary: bool, label: str | None = None) -> list[tuple[str, float]]:
    """``(path, score)`` best first: cosine similarity (float64) descending or Hamming
    distance of the sign codes ascending, ties by path; only ``label``'s photos if given."""
    keep = [i for i, p in enumerate(paths)
            if label is None or Path(p).parent.name == label]
    if binary:
        qb = np.asarray(query) > 0
        score = [float(np.count_nonzero(qb != (emb[i] > 0))) for i in keep]
        order = sorted(range(len(keep)), key=lambda j: (score[j], paths[keep[j]]))
    else:
        q = np.asarray(query, np.float64)
        q = q / np.linalg.norm(q)
        g = np.asarray(emb, np.float64)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        score = [float(g[i] @ q) for i in keep]
        order = sorted(range(len(keep)), key=lambda j: (-score[j], paths[keep[j]]))
    return [(paths[keep[j]], score[j]) for j in order[:top]]
