"""Retrieval post-processing (kind ``rerankers``): query expansion, database-side
augmentation, k-reciprocal re-ranking, hubness corrections, test-time augmentation and, for
the generalized task, seen-class suppression and gating from the model's classifier, scored
side by side with the plain ranking (``[[rerankers]]`` in a manifest).

>>> from zsbir.registry import rerankers
>>> r = rerankers.get("alpha_qe")(k=5)                                 # doctest: +SKIP
>>> r.fit(gallery); s = r.scores(queries, gallery)                     # doctest: +SKIP
>>> scores, idx = rerank_topk(r, queries, gallery, k=10)               # doctest: +SKIP

Contract: :mod:`zsbir.rerankers.base`. Naive per-query references: :mod:`.reference`.
"""

from . import expansion, hubness, kreciprocal, seen, tta  # noqa: F401 - registers the built-ins
from .base import VIEWS, Reranker, rerank_topk

__all__ = ["VIEWS", "Reranker", "rerank_topk"]
