"""The ``faiss`` index backend (the default): ``photos.faiss`` in the index directory,
rebuilt from the stored embeddings at the end of every build, update and merge
(:mod:`zsbir.search.faiss_index`: flat or IVF with a measured ``nprobe``). Nothing of the
directory's layout changed when backends became a kind: an index made before (no
``backend`` setting) is a faiss one.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from zsbir.registry import index_backends
from zsbir.search.errors import SearchError

__all__ = ["FaissBackend"]


@index_backends.register("faiss")
class FaissBackend:
    """The search structure in ``INDEX_DIR/photos.faiss`` (embedded, one machine)."""

    name = "faiss"
    #: the --ann choices this backend offers
    ann_types = ("flat", "ivf")

    def settings(self, index_dir: Path, ann: str) -> dict[str, Any]:
        if ann not in self.ann_types:
            raise SearchError(f"--ann {ann} is not offered by the faiss backend (flat or "
                              "ivf; hnsw: --backend milvus)")
        return {"backend": self.name}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> FaissBackend:
        return cls()

    def merged(self, index_dir: Path, ann: str) -> dict[str, Any]:
        """The settings of an index merged from shards of this backend."""
        return self.settings(index_dir, ann)

    def check_new(self, index_dir: Path, meta: dict[str, Any]) -> None:
        """Nothing outside the directory to check before a build."""

    def writer(self, index_dir: Path, con: sqlite3.Connection, tm: Any,
               meta: dict[str, Any]) -> _FaissWriter:
        return _FaissWriter(index_dir, con, tm, meta)

    def load(self, index_dir: Path, con: sqlite3.Connection, tm: Any) -> Any:
        from zsbir.search.faiss_index import load_faiss

        return load_faiss(index_dir, con, tm)

    def describe(self, meta: dict[str, Any]) -> str:
        return "faiss (photos.faiss)"


class _FaissWriter:
    def __init__(self, index_dir: Path, con: sqlite3.Connection, tm: Any,
                 meta: dict[str, Any]):
        self.index_dir, self.con, self.tm, self.meta = index_dir, con, tm, meta

    def committed(self, paths: list[str]) -> None:
        """The faiss file is written once, at the end."""

    def close(self) -> None:
        """Nothing held open."""

    def finish(self) -> tuple[Any, dict[str, Any]]:
        from zsbir.search.faiss_index import _write_faiss, make_faiss
        from zsbir.search.files import read_meta

        fx, info = make_faiss(self.con, self.tm, read_meta(self.con))
        _write_faiss(self.index_dir, self.con, fx, info)
        return fx, info
