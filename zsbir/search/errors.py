"""Errors a user of the search index can fix; the CLI prints them on one line."""

from __future__ import annotations

__all__ = ["IndexDamagedError", "IndexLockedError", "SearchError"]


class SearchError(ValueError):
    """A problem with an index directory, a photo folder or a sketch (user-fixable)."""


class IndexLockedError(SearchError):
    """Another process holds the index directory's write lock."""


class IndexDamagedError(SearchError):
    """An index file is empty, truncated or corrupted (rebuild the index)."""
