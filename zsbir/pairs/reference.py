"""Naive references for pair scoring, one pair or one query at a time (the tests compare
the batched code with these on random inputs)."""

from __future__ import annotations

import numpy as np

__all__ = ["maxsim_ref", "rescored_ranking_ref"]


def maxsim_ref(q: np.ndarray, d: np.ndarray, normalize: bool = True,
               reduce: str = "sum") -> float:
    """ColBERT's MaxSim of one pair, by loops: ``sum_i max_j <q_i, d_j>`` (Khattab &
    Zaharia, SIGIR 2020, Eq. 3), in float64."""
    q = np.atleast_2d(np.asarray(q, np.float64))
    d = np.atleast_2d(np.asarray(d, np.float64))
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    best = []
    for qi in q:
        best.append(max(float(np.dot(qi, dj)) for dj in d))
    return float(np.mean(best) if reduce == "mean" else np.sum(best))


def rescored_ranking_ref(scores: np.ndarray, pair: np.ndarray, k: int) -> list[int]:
    """One query's full ranking after top-``k`` re-scoring, by plain sorting: the
    embedding ranking (descending ``scores``, ties by index), its first ``k`` re-sorted by
    ``pair`` (a (G,) array; descending, ties by index), the others after them in their
    embedding order."""
    g = len(scores)
    ranking = sorted(range(g), key=lambda j: (-float(scores[j]), j))
    top, rest = ranking[:k], ranking[k:]
    top = sorted(top, key=lambda j: (-float(pair[j]), j))
    return top + rest
