"""Rerankers (kind ``rerankers``, :mod:`zsbir.rerankers`) on a search index.

``zsbir search --rerank NAME[:KEY=VALUE,...]`` / ``Index.search(..., rerank=...)`` builds
the registered reranker and ranks the index's photos with
:func:`zsbir.rerankers.rerank_topk`. Its parameters: those given after the colon, else the
run's own ``[[rerankers]]`` table of that name (e.g. ``seen_gate`` with the values ``zsbir
tune`` chose: the index records ``RUN_DIR/manifest.resolved.toml``'s tables when it is
built, and again at each ``zsbir index update`` while the run folder is there; else the
tables inside the checkpoint), else the reranker's defaults. The gallery
is the index's L2-normalized real-valued embeddings (reconstructed from a flat faiss
index); a reranker that reads model outputs (``outputs``, e.g. the seen-class ``logits``
of :mod:`zsbir.rerankers.seen`) gets the photos' stored outputs (the index stores every
output the run's rerankers declare; others: ``zsbir index build --outputs logits``) and the
sketch's from the same forward pass as its embedding. Binary (Hamming) indexes and
test-time-augmentation rerankers (which need extra image views) are refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.search.errors import SearchError

__all__ = ["make_reranker", "rerank_search", "run_tables", "table_outputs"]


def reranker_table(spec: str, run_tables: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """The ``[[rerankers]]`` table of ``spec`` (``NAME`` or ``NAME:KEY=VALUE,...``, values
    TOML literals): the given parameters, else the run's table named ``NAME``, else
    ``{"name": NAME}`` (defaults)."""
    from zsbir.manifest import ManifestError, apply_overrides

    name, sep, rest = spec.partition(":")
    name = name.strip()
    if sep:
        try:
            return {"name": name, **apply_overrides({}, [i for i in rest.split(",") if i],
                                                    "--rerank")}
        except ManifestError as exc:
            raise SearchError(f"--rerank {spec!r}: "
                              + "; ".join(str(p) for p in exc.problems)) from exc
    own = [dict(t) for t in run_tables if t.get("name") == name]
    return own[0] if own else {"name": name}


def run_tables(run_dir: Path) -> list[dict[str, Any]]:
    """``RUN_DIR/manifest.resolved.toml``'s ``[[rerankers]]`` tables: the run's own, with
    the values ``zsbir tune`` chose (it writes them there, not into the checkpoint); empty
    for a checkpoint file, a folder without that manifest, or a manifest that does not
    read (the search then uses the tables inside the checkpoint, as before)."""
    from zsbir.engine.rundir import RESOLVED
    from zsbir.manifest import ManifestError, load

    path = Path(run_dir) / RESOLVED
    if not path.is_file():
        return []
    try:
        tables = load(path).get("rerankers") or []
    except (ManifestError, OSError, ValueError):
        return []
    return [dict(t) for t in tables if isinstance(t, Mapping) and t.get("name")]


def table_outputs(tables: Sequence[Mapping[str, Any]]) -> list[str]:
    """The model outputs the rerankers of ``tables`` read (their ``outputs``, built as a
    search builds them)."""
    names: list[str] = []
    for t in tables:
        try:
            r = make_reranker(str(t["name"]), [t])
        except SearchError:
            continue  # a table a search cannot use is reported when a search asks for it
        names += [n for n in getattr(r, "outputs", ()) if n not in names]
    return names


def make_reranker(spec: str, run_tables: Sequence[Mapping[str, Any]] = ()) -> Any:
    """The registered reranker of ``spec`` (:func:`reranker_table`), resolved and built as
    a manifest's ``[[rerankers]]`` entry is."""
    from zsbir.build import build_component
    from zsbir.context import BuildContext
    from zsbir.manifest import ManifestError, resolve_component
    from zsbir.registry import RegistryError

    table = reranker_table(spec, run_tables)
    name = table["name"]
    try:
        table = resolve_component("rerankers", table, "--rerank")
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


def rerank_search(reranker: Any, queries: np.ndarray, gallery: np.ndarray, top: int,
                  query_outputs: Mapping[str, np.ndarray] | None = None,
                  gallery_outputs: Mapping[str, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, gallery positions), each (Q, min(top, G)), best first; a reranker with
    ``outputs`` reads ``query_outputs``/``gallery_outputs`` (rows aligned)."""
    from zsbir.rerankers import rerank_topk

    if len(gallery) == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    kw = {"query_outputs": query_outputs, "gallery_outputs": gallery_outputs} \
        if getattr(reranker, "outputs", ()) else {}
    try:
        return rerank_topk(reranker, np.asarray(queries, np.float32), gallery, top, **kw)
    except ValueError as exc:  # e.g. a gallery smaller than the reranker's k
        raise SearchError(f"reranker {reranker.tag}: {exc}") from exc
