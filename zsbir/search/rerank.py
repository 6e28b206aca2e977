"""Rerankers (kind ``rerankers``, :mod:`zsbir.rerankers`) on a search index.

``zsbir search --rerank NAME`` / ``Index.search(..., rerank=NAME)`` builds the registered
reranker with its default parameters and ranks the index's photos with
:func:`zsbir.rerankers.rerank_topk`. The gallery is the index's L2-normalized real-valued
embeddings (reconstructed from a flat faiss index); binary (Hamming) indexes and
test-time-augmentation rerankers (which need extra image views) are refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from zsbir.search.errors import SearchError

__all__ = ["make_reranker", "rerank_search"]


def make_reranker(name: str) -> Any:
    """The registered reranker ``name`` with default parameters, resolved and built as a
    manifest's ``[[rerankers]]`` entry is."""
    from zsbir.build import build_component
    from zsbir.context import BuildContext
    from zsbir.manifest import ManifestError, resolve_component
    from zsbir.registry import RegistryError

    try:
        table = resolve_component("rerankers", {"name": name}, "--rerank")
        r = build_component("rerankers", table, BuildContext())
    except ManifestError as exc:
        raise SearchError("; ".join(str(p) for p in exc.problems)) from exc
    except (RegistryError, ValueError) as exc:
        raise SearchError(f"--rerank {name}: {exc}") from exc
    if getattr(r, "needs_model", False):
        raise SearchError(f"reranker {name!r} needs extra image views (test-time "
                          "augmentation); the search index cannot use it")
    if getattr(r, "uses_queries", False):
        raise SearchError(f"reranker {name!r} is fitted on the whole query set (hubness "
                          "statistics); a search's few sketches are not one: use it in "
                          "evaluation instead")
    return r


def rerank_search(reranker: Any, queries: np.ndarray, gallery: np.ndarray, top: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, gallery positions), each (Q, min(top, G)), best first."""
    from zsbir.rerankers import rerank_topk

    if len(gallery) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    try:
        return rerank_topk(reranker, np.asarray(queries, np.float32), gallery, top)
    except ValueError as exc:  # e.g. a gallery smaller than the reranker's k
        raise SearchError(f"reranker {reranker.tag}: {exc}") from exc
