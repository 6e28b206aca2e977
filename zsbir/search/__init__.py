"""Sketch search over your own photos, as a product.

- :mod:`zsbir.search.store`: the self-contained index directory (model copy, SQLite
  metadata, faiss index), built and updated incrementally under a write lock
  (``zsbir index build|update``);
- :mod:`zsbir.search.api`: :class:`~zsbir.search.api.Index` for notebooks and servers
  (``zsbir.Index.open(path).search(sketch, top=10)``; ``zsbir search``);
- :mod:`zsbir.search.strokes`: vector strokes (QuickDraw's ``drawing``) to sketch images;
- :mod:`zsbir.search.server`: the Starlette app of ``zsbir serve`` and its page (``static/``).

Importing this package is light; the submodules import torch and faiss.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Index", "SearchError", "SearchResult"]

from zsbir.search.errors import SearchError


def __getattr__(name: str) -> Any:
    if name in ("Index", "SearchResult"):
        from zsbir.search import api

        return getattr(api, name)
    raise AttributeError(f"module 'zsbir.search' has no attribute {name!r}")
