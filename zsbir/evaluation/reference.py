"""Naive per-query references for every metric, written as literally as the sources allow.

These are the ground truth the fast evaluator (:mod:`zsbir.evaluation.ranking`) is tested
against, and the baseline the benchmark times. One query at a time, plain numpy, no
vectorization tricks:

* :func:`ap_sake` / :func:`voc_ap` transcribe SAKE's ``eval_AP_inner`` and ``VOCap``
  (Liu et al., ICCV 2019; the same code is ZSE-SBIR's ``utils/ap.py``, Lin et al.,
  CVPR 2023), including the backwards Python loop of the PASCAL VOC devkit envelope.
* :func:`precision_sake` is SAKE's ``eval_precision``; :func:`precision_zse` is ZSE-SBIR's
  variant: the first min(K, #positives) items' mean relevance.
* :func:`ap_sklearn` re-derives ``sklearn.metrics.average_precision_score``
  (``_binary_clf_curve`` + ``precision_recall_curve``, ties grouped at one threshold) so the
  tests need no sklearn; SEM-PCYC (Dutta & Akata, CVPR 2019) and Doodle2Search (Dey et al.,
  CVPR 2019) call sklearn per query. :func:`ap_sempcyc_at_k` is their mAP@K: sklearn AP on
  the top K items.
* :func:`map_yelamarthi_at_k`: Yelamarthi et al. (ECCV 2018), (1/K) sum_{k<=K} rel_k P@k.

Deviations from the published code, shared with the fast evaluator (see
:mod:`zsbir.evaluation.metrics`): the ranking is ``np.argsort(-scores, kind="stable")``
(ties by gallery index ascending) instead of quicksort; a query with no positive in the
gallery scores 0 (SAKE's code would return NaN); K is capped at the gallery size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from .metrics import parse_metric

__all__ = [
    "ranking",
    "voc_ap",
    "ap_sake",
    "precision_sake",
    "precision_zse",
    "ap_sklearn",
    "ap_sempcyc_at_k",
    "map_yelamarthi_at_k",
    "reference_metric",
    "reference_evaluate",
    "reference_scores",
]


def ranking(scores: np.ndarray) -> np.ndarray:
    """Gallery indices by descending score, ties by ascending index (stable sort)."""
    return np.argsort(-scores, kind="stable")


def voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    """PASCAL VOC all-point AP, as SAKE's ``VOCap`` (envelope loop kept as published)."""
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    msk = mrec[1:] != mrec[:-1]
    return float(np.sum((mrec[1:][msk] - mrec[:-1][msk]) * mpre[1:][msk]))


def ap_sake(scores: np.ndarray, relevant: np.ndarray, top: int | None = None) -> float:
    """SAKE ``eval_AP_inner``: VOC AP, optionally on the top ``top`` items, / min(top, #pos)."""
    tot = scores.shape[0]
    tot_pos = int(np.sum(relevant))
    tp = relevant[ranking(scores)].astype(bool)
    fp = np.logical_not(tp)
    if top is not None:
        top = min(top, tot)
        tp = tp[:top]
        fp = fp[:top]
        tot_pos = min(top, tot_pos)
    if tot_pos == 0:
        return 0.0  # convention: no positive -> 0 (SAKE: NaN)
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / tot_pos
    prec = tp / (tp + fp)
    return voc_ap(rec, prec)


def precision_sake(scores: np.ndarray, relevant: np.ndarray, top: int = 100) -> float:
    """SAKE ``eval_precision``: hits in the top K / min(K, gallery size)."""
    top = min(top, scores.shape[0])
    return float(np.sum(relevant[ranking(scores)][:top]) / top)


def precision_zse(scores: np.ndarray, relevant: np.ndarray, top: int = 100) -> float:
    """ZSE-SBIR ``precision_eval``: ``top = min(top, tot_pos); mean(sorted[:top])``, the
    hits in the top min(K, #positives) / min(K, #positives); 0 with no positive."""
    tot_pos = int(np.sum(relevant))
    if tot_pos == 0:
        return 0.0
    top = min(top, tot_pos)
    return float(np.sum(relevant[ranking(scores)][:top]) / top)


def ap_sklearn(scores: np.ndarray, relevant: np.ndarray) -> float:
    """``sklearn.metrics.average_precision_score(relevant, scores)``, re-derived.

    Follows sklearn's ``_binary_clf_curve`` (one threshold per distinct score),
    ``precision_recall_curve`` and ``-sum(diff(recall) * precision[:-1])``. With no
    positive, recent sklearn sets recall to 1 everywhere and returns 0; so does this.
    """
    y_true = np.asarray(relevant, dtype=np.float64)
    y_score = np.asarray(scores)
    desc = np.argsort(y_score, kind="mergesort")[::-1]
    y_score = y_score[desc]
    y_true = y_true[desc]
    distinct = np.where(np.diff(y_score))[0]
    threshold_idxs = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true)[threshold_idxs]
    fps = 1 + threshold_idxs - tps
    precision = tps / (tps + fps)
    if tps[-1] == 0:
        recall = np.ones_like(tps)
    else:
        recall = tps / tps[-1]
    precision = np.r_[precision[::-1], 1.0]
    recall = np.r_[recall[::-1], 0.0]
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def ap_sempcyc_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """SEM-PCYC/Doodle2Search mAP@K: sklearn AP on the top K items; 0 if none is relevant."""
    top = ranking(scores)[:k]
    if not np.any(relevant[top]):
        return 0.0
    return ap_sklearn(scores[top], relevant[top])


def map_yelamarthi_at_k(scores: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Yelamarthi et al.: (1/K) * sum_{k<=K} rel_k * P@k, K capped at the gallery size."""
    k = min(k, scores.shape[0])
    rel = relevant[ranking(scores)][:k].astype(np.float64)
    total = 0.0
    hits = 0
    for i in range(k):
        if rel[i]:
            hits += 1
            total += hits / (i + 1)  # rel_k * P@k
    return total / k


def reference_metric(name: str, scores: np.ndarray, relevant: np.ndarray) -> float:
    """One query's value of metric ``name`` from its score row and 0/1 relevance row."""
    spec = parse_metric(name)
    relevant = np.asarray(relevant).astype(bool)
    if spec.pattern == "map@all":
        return ap_sake(scores, relevant)
    if spec.pattern == "map@all-sklearn":
        return ap_sklearn(scores, relevant)
    assert spec.k is not None
    if spec.pattern == "map@K":
        return ap_sake(scores, relevant, top=spec.k)
    if spec.pattern == "map@K-sempcyc":
        return ap_sempcyc_at_k(scores, relevant, spec.k)
    if spec.pattern == "map@K-yelamarthi":
        return map_yelamarthi_at_k(scores, relevant, spec.k)
    if spec.pattern == "p@K":
        return precision_sake(scores, relevant, top=spec.k)
    return precision_zse(scores, relevant, top=spec.k)


def reference_evaluate(scores: np.ndarray, query_labels: np.ndarray,
                       gallery_labels: np.ndarray,
                       metrics: Sequence[str]) -> dict[str, np.ndarray]:
    """Per-query values of each metric (name -> (Q,) float64), one query at a time."""
    scores = np.asarray(scores)
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    out = {parse_metric(m).name: np.zeros(len(query_labels)) for m in metrics}
    for q in range(len(query_labels)):
        relevant = gallery_labels == query_labels[q]
        for name in out:
            out[name][q] = reference_metric(name, scores[q], relevant)
    return out


def reference_scores(query: np.ndarray, gallery: np.ndarray,
                     distance: Literal["cosine", "euclidean", "hamming"] = "cosine",
                     dtype: type = np.float64) -> np.ndarray:
    """Brute-force score matrix (higher = closer), for checking the fast scores.

    cosine: dot product of L2-normalized rows; euclidean: ``-||q - g||`` from explicit
    differences; hamming: ``-`` the number of differing bits of ``np.unpackbits`` codes.
    """
    if distance == "hamming":
        qb = np.unpackbits(np.asarray(query, dtype=np.uint8), axis=1)
        gb = np.unpackbits(np.asarray(gallery, dtype=np.uint8), axis=1)
        return -np.stack([(row != gb).sum(1) for row in qb]).astype(dtype)
    q = np.asarray(query, dtype=dtype)
    g = np.asarray(gallery, dtype=dtype)
    if distance == "cosine":
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        gn = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
        return qn @ gn.T
    if distance == "euclidean":
        return -np.sqrt(((q[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    raise ValueError(f"unknown distance {distance!r}")
