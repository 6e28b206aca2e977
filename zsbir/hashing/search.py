"""Exact gallery search over hash codes with faiss.

- binary codes (packed ``uint8``, see :func:`zsbir.hashing.hashers.pack_bits`): Hamming
  ranking with ``faiss.IndexBinaryFlat(d)``, ``d = 8 * code bytes`` (pad bits are zero in
  every code, so they never add to a distance), returning int32 distances, ascending;
- real codes: cosine ranking with ``faiss.IndexFlatIP`` on L2-normalized float32 (the
  inputs are normalized here), returning float32 similarities, descending.

Tie rule (the toolkit's, shared with the brute-force evaluator): equal distances (or
scores) are ordered by gallery index ascending, and the top ``k`` keeps the lowest gallery
indices among the items tied at the ``k``-th place.

faiss documents no tie order. Observed with faiss 1.15: ``IndexBinaryFlat`` (heap search)
returned tied Hamming distances by ascending index and kept the lowest indices at the
cut-off, in every trial; ``IndexFlatIP`` kept the lowest indices at the cut-off but returned
tied scores in *descending* index order (e.g. scores ``[1, 1, 1, 1]`` came back as
indices ``[3, 2, 1, 0]``). So :func:`search` does not rely on either behaviour: it re-sorts
every returned row with a stable key ``(distance, index)``, and when the ``k``-th value is
tied with the last value returned it asks faiss for more neighbours (doubling ``k``) until
the tie group at the cut-off is complete.
"""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from zsbir.engine.threads import faiss_threads
from zsbir.evaluation.distances import hamming_distances, l2_normalize

__all__ = ["hamming_distance_matrix", "search", "search_index"]


def _as_codes(codes: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(codes)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, bytes) packed codes, got shape {a.shape}")
    if a.dtype != np.uint8:
        raise ValueError(
            f"{name} must be uint8 packed codes (np.packbits), got dtype {a.dtype}; "
            "pass binary=False for real-valued embeddings"
        )
    return np.ascontiguousarray(a)


def _as_unit_float(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {a.shape}")
    if a.dtype == np.uint8:
        raise ValueError(f"{name} is uint8 (packed codes?); pass binary=True for Hamming search")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return l2_normalize(a)


def hamming_distance_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """Brute-force (Na, Nb) int32 Hamming distances between packed uint8 codes.

    popcount(a xor b) by the toolkit's one Hamming kernel
    (:func:`zsbir.evaluation.distances.hamming_distances`, the evaluator's), computed
    without faiss: a reference for :func:`search`.
    """
    a = _as_codes(a_packed, "a_packed")
    b = _as_codes(b_packed, "b_packed")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"code lengths differ: {a.shape[1]} vs {b.shape[1]} bytes")
    return hamming_distances(a, b).numpy()


def _sorted_rows(values: np.ndarray, labels: np.ndarray, binary: bool) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Sort each row by (distance ascending | score descending, index ascending)."""
    key = values if binary else -values  # negating a float32 is exact
    order = np.lexsort((labels, key), axis=-1)
    return np.take_along_axis(values, order, -1), np.take_along_axis(labels, order, -1)


def search(
    query_codes: np.ndarray,
    gallery_codes: np.ndarray,
    k: int | None,
    *,
    binary: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` gallery items for every query.

    Args:
        query_codes: (Nq, B) packed uint8 codes if ``binary``, else (Nq, D) real embeddings.
        gallery_codes: (Ng, B) or (Ng, D), like ``query_codes``.
        k: neighbours per query; ``None`` ranks the whole gallery; capped at Ng.
        binary: Hamming ranking on packed codes (``True``) or cosine ranking (``False``).

    Returns:
        ``(values, indices)``, both (Nq, k): int32 Hamming distances (ascending) and int64
        gallery indices if ``binary``; float32 cosine similarities (descending) and int64
        indices otherwise. Ties are ordered by gallery index ascending (module docstring).
    """
    if binary:
        q = _as_codes(query_codes, "query_codes")
        g = _as_codes(gallery_codes, "gallery_codes")
    else:
        q = _as_unit_float(query_codes, "query_codes")
        g = _as_unit_float(gallery_codes, "gallery_codes")
    if q.shape[1] != g.shape[1]:
        unit = "bytes" if binary else "dimensions"
        raise ValueError(
            f"query and gallery widths differ: {q.shape[1]} vs {g.shape[1]} {unit}"
        )
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    n = g.shape[0]
    k = n if k is None else min(int(k), n)
    if n == 0 or q.shape[0] == 0:
        dtype = np.int32 if binary else np.float32
        return np.zeros((q.shape[0], 0), dtype), np.zeros((q.shape[0], 0), np.int64)

    index = faiss.IndexBinaryFlat(8 * g.shape[1]) if binary else faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    values, labels, _ = search_index(index, q, k, binary=binary)
    return values, labels


def _sorted_found(values: np.ndarray, labels: np.ndarray, binary: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_sorted_rows` with the places faiss left empty (label -1: an IVF index found
    fewer candidates in the probed lists) moved to the end of each row; also the number of
    found items per row."""
    missing = labels < 0
    key = values if binary else -values
    order = np.lexsort((labels, key, missing), axis=-1)
    return (np.take_along_axis(values, order, -1), np.take_along_axis(labels, order, -1),
            (~missing).sum(axis=-1))


def search_index(index: Any, queries: np.ndarray, k: int, *, binary: bool
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` of a built faiss ``index`` (flat or IVF, binary or inner product) for every
    query, in the toolkit's tie order, with the tie group at the cut-off completed.

    Each row is sorted by (distance ascending | score descending, index ascending). faiss
    is asked for ``2k``; while a row's ``k``-th value equals the last value it returned
    (an unseen item may tie with it), that row is asked again for twice as many, up to the
    whole index. ``queries`` are codes as the index holds them (packed uint8, or
    L2-normalized float32).

    Returns ``(values, labels, found)``: (Nq, k) values (faiss's dtype) and int64 labels,
    and (Nq,) the number of places filled (less than ``k`` only when an IVF index found
    fewer candidates; the rest of the row is label -1).
    """
    faiss_threads()  # faiss's own OpenMP: the plan's threads (zsbir.engine.threads)
    n = int(index.ntotal)
    k = min(int(k), n)
    k_eff = min(n, 2 * k)
    values, labels, found = _sorted_found(*index.search(queries, k_eff), binary)
    out_v, out_l = values[:, :k].copy(), labels[:, :k].copy()
    out_n = np.minimum(found, k)
    rows = np.arange(len(found))

    def tied(values: np.ndarray, found: np.ndarray) -> np.ndarray:
        last = values[np.arange(len(found)), np.maximum(found, 1) - 1]
        return (found > k) & (values[:, max(k, 1) - 1] == last)

    todo = rows[tied(values, found)] if k_eff < n and k > 0 else rows[:0]
    while todo.size:
        k_eff = min(n, 2 * k_eff)
        values, labels, found = _sorted_found(*index.search(queries[todo], k_eff), binary)
        out_v[todo], out_l[todo] = values[:, :k], labels[:, :k]
        out_n[todo] = np.minimum(found, k)
        if k_eff == n:
            break
        todo = todo[tied(values, found)]
    return out_v, out_l.astype(np.int64, copy=False), out_n
