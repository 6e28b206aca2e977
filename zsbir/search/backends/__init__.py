"""Index backends (kind ``index_backends``, entry-point group ``zsbir.index_backends``):
where an index's search structure lives and how it is searched.

Every backend keeps the INDEX argument a local directory with the same files: ``model.pt``
(the model the photos were embedded with; its SHA-256 is in ``meta`` and checked when the
index is opened, so a query is never embedded with another model), ``index.sqlite`` (the
photo rows, their embeddings and the settings: the source of truth of incremental updates
and of resuming a killed build, :mod:`zsbir.search.store`) and ``write.lock``. The backend
holds the *searchable* copy of the rows:

- ``faiss`` (the default, :mod:`zsbir.search.backends.faiss_dir`): ``photos.faiss`` in the
  directory, exactly as before backends existed (an index made before has no ``backend``
  setting and is a faiss one);
- ``milvus`` (:mod:`zsbir.search.backends.milvus`, the ``zsbir[milvus]`` extra): a Milvus
  collection (a server or cluster, or milvus-lite in a local file) whose rows are the photo
  id, path, class, SHA-256, model identity and the vector.

A backend is a class registered with ``@index_backends.register("name")``, built from its
options (``zsbir index build --backend NAME``), which provides:

- ``settings(index_dir) -> dict``: the ``meta`` entries that reopen it (no secrets);
  ``from_meta(meta)`` (classmethod) reopens it;
- ``writer(index_dir, con, tm, meta)``: an object with ``committed(paths)`` (called after
  each committed batch of embedded photos, so rows reach the backend as they come),
  ``finish() -> (loaded, info)`` (called at the end of a build, update or merge: the
  backend's copy made equal to the database; ``info`` is stored in ``meta``) and
  ``close()``;
- ``load(index_dir, con, tm) -> loaded``: the photos in path order (``ids``, ``paths``,
  ``labels``, ``binary``, ``generation``) and either a faiss ``index`` or an ``engine``
  with ``search(codes, k, label) -> (values, positions)`` that filters by class itself.

:func:`search_loaded` ranks with either, in the one documented order: score descending
(cosine) or Hamming distance ascending, ties by photo path; a tie group at the cut-off is
completed. The contract suite (:func:`zsbir.testing.check_index_backend`) checks every
backend against a plain NumPy ranking of random vectors, with and without a class filter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from zsbir.search.errors import SearchError

__all__ = ["DEFAULT_BACKEND", "backend_of", "make_backend", "search_loaded"]

DEFAULT_BACKEND = "faiss"


def make_backend(name: str, **options: Any) -> Any:
    """The registered backend ``name`` built with ``options``, resolved and built as a
    manifest table ``{name = NAME, ...}`` is (:func:`zsbir.manifest.resolve_component`,
    :func:`zsbir.build.build_component`); an unknown name or option is a SearchError."""
    from zsbir.build import build_component
    from zsbir.context import BuildContext
    from zsbir.injection import supply
    from zsbir.manifest import ManifestError, resolve_component
    from zsbir.registry import RegistryError

    try:
        table = resolve_component("index_backends", {"name": name, **options}, "--backend")
        return build_component("index_backends", table, BuildContext(),
                               **supply("index_backends"))
    except ManifestError as exc:
        raise SearchError("; ".join(str(p) for p in exc.problems)) from exc
    except RegistryError as exc:
        raise SearchError(f"--backend {name}: {exc}") from exc


def backend_of(meta: dict[str, Any]) -> Any:
    """The backend an index was built with (its ``meta``; faiss when none is recorded)."""
    from zsbir.registry import RegistryError, get_registry

    name = meta.get("backend") or DEFAULT_BACKEND
    try:
        cls = get_registry("index_backends").get(name)
    except RegistryError as exc:
        raise SearchError(f"the index was built with backend {name!r}, which this "
                          f"installation lacks ({exc})") from exc
    return cls.from_meta(meta)


def search_loaded(fx: Any, codes: np.ndarray, top: int, label: str | None,
                  gallery: Callable[[np.ndarray], np.ndarray]) -> tuple[list, list]:
    """Top-``top`` (values, positions) per query of a loaded index ``fx``: its engine's
    search (filtering by ``label`` inside the engine), else its faiss index (a ``label``:
    exact search among that class's photos, whose codes ``gallery(positions)`` gives).
    Positions index ``fx.ids``; ties are ordered by position (= photo path)."""
    from zsbir.hashing.search import search, search_index

    engine = getattr(fx, "engine", None)
    if engine is not None:
        return engine.search(codes, top, label)
    if label is None:
        k = min(top, len(fx.ids))
        if k == 0:
            return ([np.zeros(0)] * len(codes), [np.zeros(0, np.int64)] * len(codes))
        out_v, out_p = [], []
        for row in codes:  # one query at a time: each tie group completed on its own
            v, lab, found = search_index(fx.index, row[None], k, binary=fx.binary)
            out_v.append(v[0, :found[0]])
            out_p.append(lab[0, :found[0]])
        return out_v, out_p
    subset = np.flatnonzero(np.array([lab == label for lab in fx.labels], dtype=bool))
    values, idx = search(codes, gallery(subset), top, binary=fx.binary)
    return list(values), list(subset[idx])
