"""The fast, exact ranking evaluator: every metric from one ranking per query chunk.

Per chunk of queries (queries are processed grouped by class, so a chunk splits into a few
segments that share one positive set)::

    scores (n, G)          one matmul (cosine / euclidean) or xor + popcount (hamming)
    sort each row's values one values-only sort per row (np.partition when only top-K
                           metrics are asked)
    positives' scores      (n, P), P = #gallery items of the query's class, sorted
    binary search          #items scoring above each positive -> its rank
    metrics                small (n, P) functions of those ranks (zsbir.evaluation.metrics)

Every published formula depends on the ranking only through the ranks of the positives
(plus, for the sklearn-style ones, the size of each positive's tie group), so after the one
(n, G) sort all work is on (n, P) arrays. A values-only sort (numpy's SIMD sort) is ~10x
cheaper on CPU than ``torch.sort``, which also returns indices; a positive's rank is the
number of items scoring above it (binary search in the sorted row) plus the positives
before it. That is exact unless a negative scores exactly the same as a positive (float32
scores of 17k items tie a few times per row): those few entries are counted directly, and
rows with many (quantized scores) take the *keys* path, which sorts one unique integer key
per item, ``score code << bits | gallery index``, and finds each positive's key in it.
Hamming distances (integers in [0, B]) always take the keys path, with int32 keys when
code and index fit in 31 bits.

Tie rule (see :mod:`zsbir.evaluation.metrics`): descending score, ties by gallery index
ascending, for rank-based formulas; sklearn-style formulas group equal scores. Scores are
float32; -0.0 and +0.0 are the same score.

Exactness: the metrics are exact for the float32 scores ranked (tested to 1e-12 against
the per-query references). The scores come from a BLAS matmul whose last bit can depend on
how queries are chunked (about 0.3% of the entries at SK-SH size), which can reorder
near-tied items and move an AP by ~1e-5; :func:`evaluate_scores` on a stored score matrix
gives bit-reproducible numbers.

On CPU the per-row work runs in numpy on a thread pool over row blocks (numpy releases the
GIL). It does not use torch's intra-op threads for the many small (n, P) operations: on a
busy 2-core machine their OpenMP barriers made those operations ~6x slower than
single-threaded ones. torch computes the scores (BLAS matmul with its own threads). On
other devices (CUDA) everything runs in torch (``torch.sort``, ``torch.searchsorted``), the
same algorithm with a full sort, and only the (n, P) ranks come back to the CPU.

Memory is bounded by processing ``chunk_size`` queries at a time; by default the chunk is
chosen so the (chunk, G) work arrays stay within :data:`MEMORY_BUDGET_BYTES`.

This module is the driver (chunks, class segments, per-query metrics, the public
``evaluate_*`` functions); the rank kernels are :mod:`zsbir.evaluation.kernels`, the scorers
:mod:`zsbir.evaluation.scorers`, the distances :mod:`zsbir.evaluation.distances` and the
thread pool :mod:`zsbir.evaluation.pool`. Every name importable from here before still is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from .distances import hamming_distances
from .kernels import Ranked, _np_ranks_float, _np_ranks_keys, _t_ranks_float, _t_ranks_keys
from .metrics import MetricSpec, compute_metric, parse_metric
from .pool import _parallel, _workers
from .scorers import (
    ArrayLike,
    _FunctionScorer,
    _PrecomputedScorer,
    _Scorer,
    pairwise_scores,
)

__all__ = [
    "EvalResult",
    "MEMORY_BUDGET_BYTES",
    "evaluate_retrieval",
    "evaluate_score_fn",
    "evaluate_scores",
    "pairwise_scores",
    "hamming_distances",
    "auto_chunk_size",
]

#: Default bound on the (chunk, G) work tensors of one chunk.
MEMORY_BUDGET_BYTES = 256 * 2**20
# Work memory per (query, gallery item) cell, generously: scores (4), their sorted copy (4),
# int64 keys of fallback rows (8) and temporaries; Hamming: distances (4) and keys (4-8).
_BYTES_PER_CELL = 24


@dataclass
class EvalResult:
    """Result of :func:`evaluate_retrieval`.

    ``metrics``: metric -> mean over all queries. ``per_class``: metric -> query label ->
    mean over that class's queries (empty unless ``per_class=True``). ``formulas``: metric
    -> one-line formula naming its source. ``per_query``: metric -> (Q,) values in query
    order (not part of :meth:`to_dict`). ``num_queries_without_positives``: queries whose
    class has no gallery item (they score 0 and count in the means).
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[int, float]]
    formulas: dict[str, str]
    num_queries: int
    num_gallery: int
    distance: str = "cosine"
    num_queries_without_positives: int = 0
    per_query: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (per-class labels become string keys; no per-query data)."""
        return {
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "per_class": {m: {str(c): float(v) for c, v in d.items()}
                          for m, d in self.per_class.items()},
            "formulas": dict(self.formulas),
            "num_queries": int(self.num_queries),
            "num_gallery": int(self.num_gallery),
            "distance": self.distance,
            "num_queries_without_positives": int(self.num_queries_without_positives),
        }


# ---------------------------------------------------------------------------------------
# The evaluator.
# ---------------------------------------------------------------------------------------

def auto_chunk_size(num_gallery: int, budget_bytes: int = MEMORY_BUDGET_BYTES) -> int:
    """Queries per chunk so that the (chunk, G) work tensors stay within ``budget_bytes``."""
    return max(1, budget_bytes // (_BYTES_PER_CELL * max(1, num_gallery)))


def _parse_metrics(metrics: Sequence[str] | str) -> list[MetricSpec]:
    if isinstance(metrics, str):
        metrics = [metrics]
    specs: dict[str, MetricSpec] = {}
    for m in metrics:
        spec = parse_metric(m)
        specs.setdefault(spec.name, spec)
    if not specs:
        raise ValueError("no metric requested")
    return list(specs.values())


def _labels(x: ArrayLike | Sequence[int], n: int, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(a.shape)}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer labels, got {a.dtype}")
    return a.astype(np.int64)


def _run(scorer: _Scorer | _PrecomputedScorer | _FunctionScorer, query_labels: ArrayLike,
         gallery_labels: ArrayLike, metrics: Sequence[str] | str, chunk_size: int | None,
         device: torch.device, per_class: bool, use_numpy: bool) -> EvalResult:
    specs = _parse_metrics(metrics)
    nq, ng = scorer.num_query, scorer.num_gallery
    if nq == 0 or ng == 0:
        raise ValueError(f"need at least one query and one gallery item, got {nq} and {ng}")
    ql = _labels(query_labels, nq, "query_labels")
    gl = _labels(gallery_labels, ng, "gallery_labels")
    if chunk_size is None:
        chunk_size = auto_chunk_size(ng)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    need_groups = any(s.needs_tie_groups for s in specs)
    code_bits = scorer.code_bits
    # Only top-K metrics, K well below G: partition instead of a full sort (numpy path).
    ks = [s.k for s in specs if s.k is not None]
    top = max(ks) if len(ks) == len(specs) and 4 * max(ks) <= ng else None

    order = np.argsort(ql, kind="stable")  # queries grouped by class
    sorted_labels = ql[order]
    values = {s.name: np.zeros(nq) for s in specs}
    positives: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # label -> (indices, neg mask)
    positives_t: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    no_pos = int(np.isin(ql, gl, invert=True).sum())

    def store(dest: np.ndarray, ranked: Ranked) -> None:
        ranks, ge, pos_ge = ranked
        for spec in specs:
            values[spec.name][dest] = compute_metric(spec, ranks, ng, ge, pos_ge)

    def numpy_job(s: np.ndarray, dest: np.ndarray, label: int) -> Callable[[], None]:
        pos_idx, neg_mask = positives[label]

        def job() -> None:
            if scorer.integer:
                store(dest, _np_ranks_keys(s, pos_idx, code_bits, need_groups))
            else:
                store(dest, _np_ranks_float(s, pos_idx, neg_mask, need_groups, top))

        return job

    for start in range(0, nq, chunk_size):
        rows = order[start:start + chunk_size]
        scores = scorer.chunk(rows)
        labels = sorted_labels[start:start + chunk_size]
        cut = np.flatnonzero(np.diff(labels)) + 1
        bounds = np.concatenate(([0], cut, [len(labels)]))
        # Pieces of about chunk / (2 * workers) rows, within one class segment each.
        piece = max(8, -(-len(rows) // (2 * _workers())))
        jobs: list[Callable[[], None]] = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            label = int(labels[a])
            if label not in positives:
                neg_mask = gl != label
                positives[label] = (np.flatnonzero(~neg_mask), neg_mask)
            if positives[label][0].size == 0:
                continue  # every metric is 0 for a query without positives
            if use_numpy:
                s_np = scores.numpy()
                for lo in range(a, b, piece):
                    hi = min(b, lo + piece)
                    jobs.append(numpy_job(s_np[lo:hi], rows[lo:hi], label))
                continue
            if label not in positives_t:
                pos_idx, neg_mask = positives[label]
                positives_t[label] = (torch.from_numpy(pos_idx).to(device),
                                      torch.from_numpy(neg_mask).to(device))
            pos_t, neg_t = positives_t[label]
            seg = scores[a:b]
            if scorer.integer:
                ranked_t = _t_ranks_keys(seg, pos_t, code_bits, need_groups)
            else:
                ranked_t = _t_ranks_float(seg, pos_t, neg_t, need_groups)
            store(rows[a:b], tuple(None if x is None else x.cpu().numpy() for x in ranked_t))
        _parallel(jobs)
        del scores

    means = {name: float(v.mean()) for name, v in values.items()}
    per_class_out: dict[str, dict[int, float]] = {}
    if per_class:
        uniq, inverse = np.unique(ql, return_inverse=True)
        n_per = np.bincount(inverse, minlength=len(uniq))
        for name, v in values.items():
            sums = np.bincount(inverse, weights=v, minlength=len(uniq))
            per_class_out[name] = {int(c): float(x) for c, x in zip(uniq, sums / n_per)}
    return EvalResult(
        metrics=means,
        per_class=per_class_out,
        formulas={s.name: s.formula for s in specs},
        num_queries=nq,
        num_gallery=ng,
        distance=scorer.distance,
        num_queries_without_positives=no_pos,
        per_query=values,
    )


def evaluate_retrieval(
    query: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    metrics: Sequence[str] = ("map@all", "p@100"),
    *,
    distance: Literal["cosine", "euclidean", "hamming"] = "cosine",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    per_class: bool = False,
) -> EvalResult:
    """Rank the gallery for every query and compute the named metrics, exactly.

    Args:
        query: (Q, D) float features, or (Q, B/8) uint8 packed codes for ``hamming``.
        query_labels: (Q,) integer class labels.
        gallery: (G, D) float features, or (G, B/8) uint8 packed codes.
        gallery_labels: (G,) integer class labels; a gallery item is relevant to a query
            when the labels are equal.
        metrics: names from :data:`zsbir.evaluation.METRICS` (e.g. ``map@all``, ``p@100``,
            ``map@200-sempcyc``); see :mod:`zsbir.evaluation.metrics` for the formulas.
        distance: ``cosine`` (L2-normalize both sides, score = dot product; ranks as SAKE's
            negative euclidean distance of normalized features), ``euclidean`` (score =
            ``-||q - g||``) or ``hamming`` (score = ``-`` Hamming distance of
            ``numpy.packbits`` codes, the layout of faiss ``IndexBinaryFlat``).
        chunk_size: queries per chunk; ``None`` chooses it from
            :data:`MEMORY_BUDGET_BYTES`.
        device: where scores are computed (``"cpu"``, ``"cuda"``...); off-CPU the ranking
            runs there too, in torch.
        per_class: also report each metric's mean per query class.

    Scores are float32. Ties are broken by gallery index (rank-based formulas) or grouped
    (sklearn-style); a query whose class has no gallery item scores 0 and counts in the
    means. ``EvalResult.per_query`` holds the per-query values.
    """
    dev = torch.device(device)
    use_numpy = dev.type == "cpu"
    scorer = _Scorer(query, gallery, distance, dev, use_numpy)
    return _run(scorer, query_labels, gallery_labels, metrics, chunk_size, dev, per_class,
                use_numpy)


def evaluate_scores(
    scores: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    metrics: Sequence[str] = ("map@all", "p@100"),
    *,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    per_class: bool = False,
) -> EvalResult:
    """:func:`evaluate_retrieval` from a precomputed (Q, G) score matrix (higher = closer).

    Scores are ranked as float32 with the same tie rules.
    """
    dev = torch.device(device)
    scorer = _PrecomputedScorer(scores, dev)
    return _run(scorer, query_labels, gallery_labels, metrics, chunk_size, dev, per_class,
                use_numpy=dev.type == "cpu")


def evaluate_score_fn(
    score_fn: Callable[[np.ndarray], torch.Tensor | np.ndarray],
    query_labels: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    metrics: Sequence[str] = ("map@all", "p@100"),
    *,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    per_class: bool = False,
) -> EvalResult:
    """:func:`evaluate_scores` with the scores computed chunk by chunk:
    ``score_fn(rows)`` returns the (len(rows), G) scores (higher = closer) of the queries
    ``rows`` (an int64 index array), so the full (Q, G) matrix never exists. A query's
    scores must not depend on which other rows are asked with it (rerankers:
    :meth:`zsbir.rerankers.Reranker.score_rows`).
    """
    dev = torch.device(device)
    ql = query_labels.detach().cpu().numpy() if isinstance(query_labels, torch.Tensor) \
        else np.asarray(query_labels)
    gl = gallery_labels.detach().cpu().numpy() if isinstance(gallery_labels, torch.Tensor) \
        else np.asarray(gallery_labels)
    scorer = _FunctionScorer(score_fn, len(ql), len(gl), dev)
    return _run(scorer, query_labels, gallery_labels, metrics, chunk_size, dev, per_class,
                use_numpy=dev.type == "cpu")
