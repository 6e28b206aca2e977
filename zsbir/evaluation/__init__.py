"""Evaluation: every published ZS-SBIR metric, exact and fast, by name.

>>> from zsbir.evaluation import evaluate_retrieval
>>> res = evaluate_retrieval(sketch_feats, sketch_labels, photo_feats, photo_labels,
...                          metrics=("map@all", "p@100"))            # doctest: +SKIP
>>> res.metrics["map@all"], res.formulas["map@all"]                   # doctest: +SKIP

Formulas and tie rules: :mod:`zsbir.evaluation.metrics`. The ranking engine:
:mod:`zsbir.evaluation.ranking`. Naive per-query references: :mod:`zsbir.evaluation.reference`.
"""

from .metrics import METRICS, MetricSpec, metric_info, parse_metric
from .ranking import (
    MEMORY_BUDGET_BYTES,
    EvalResult,
    auto_chunk_size,
    evaluate_retrieval,
    evaluate_score_fn,
    evaluate_scores,
    hamming_distances,
    pairwise_scores,
)

__all__ = [
    "METRICS",
    "MEMORY_BUDGET_BYTES",
    "EvalResult",
    "MetricSpec",
    "auto_chunk_size",
    "evaluate_retrieval",
    "evaluate_score_fn",
    "evaluate_scores",
    "hamming_distances",
    "metric_info",
    "pairwise_scores",
    "parse_metric",
]
