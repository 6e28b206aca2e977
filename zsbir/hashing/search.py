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

import faiss
import numpy as np

__all__ = ["hamming_distance_matrix", "search"]

#: popcount of every byte value
_POPCOUNT = np.array([i.bit_count() for i in range(256)], dtype=np.uint8)


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
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, 1e-12), dtype=np.float32)


def hamming_distance_matrix(a_packed: np.ndarray, b_packed: np.ndarray) -> np.ndarray:
    """Brute-force (Na, Nb) int32 Hamming distances between packed uint8 codes.

    XOR of every pair of codes, popcount through a 256-entry lookup table; processed in
    chunks of ``a`` rows to bound memory. A reference for :func:`search`, not a fast path.
    """
    a = _as_codes(a_packed, "a_packed")
    b = _as_codes(b_packed, "b_packed")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"code lengths differ: {a.shape[1]} vs {b.shape[1]} bytes")
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.int32)
    chunk = max(1, (1 << 24) // max(1, b.shape[0] * b.shape[1]))
    for i in range(0, a.shape[0], chunk):
        xor = a[i : i + chunk, None, :] ^ b[None, :, :]
        out[i : i + chunk] = _POPCOUNT[xor].sum(axis=2, dtype=np.int32)
    return out


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

    # Ask for more than k so that a tie group at the cut-off is seen whole: once the value
    # at the last returned place differs from the k-th, no unseen item can tie with it.
    k_eff = min(n, 2 * k)
    values, labels = _sorted_rows(*index.search(q, k_eff), binary)
    out_v, out_l = values[:, :k].copy(), labels[:, :k].copy()
    todo = np.flatnonzero(values[:, k - 1] == values[:, -1]) if k_eff < n else np.array([], int)
    while todo.size:
        k_eff = min(n, 2 * k_eff)
        values, labels = _sorted_rows(*index.search(q[todo], k_eff), binary)
        out_v[todo], out_l[todo] = values[:, :k], labels[:, :k]
        if k_eff == n:
            break
        todo = todo[values[:, k - 1] == values[:, -1]]
    return out_v, out_l.astype(np.int64, copy=False)
