"""Joining shard indexes (``zsbir index build --shard i/n``) into one: ``zsbir index merge``.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from zsbir.search.embedding import _load_model
from zsbir.search.errors import SearchError
from zsbir.search.faiss_index import _write_faiss, make_faiss
from zsbir.search.files import (
    MODEL_NAME,
    connect,
    copy_atomic,
    disk_errors,
    index_state,
    read_meta,
    remove_leftovers,
    removing_temporaries,
    set_meta,
    transaction,
)
from zsbir.search.lock import WriteLock
from zsbir.search.outputs import copy_outputs
from zsbir.search.rows import _copy_rows, _stored_meta
from zsbir.search.summary import BuildSummary

__all__ = ["MERGE_SAME", "merge_indexes"]

MERGE_SAME = ("photo_root", "model_sha256", "hasher", "ann", "follow_outside_links",
              "output_names", "output_dtype")


def merge_indexes(shard_dirs: list[str | Path], index_dir: str | Path) -> BuildSummary:
    """Join shard indexes (``build_index(..., shard=(i, n))``) into a new index at
    ``index_dir``: their photo rows and stored embeddings are copied (nothing is embedded
    again) and one faiss index is built. Every shard 0..n-1 must be given once, all built
    from the same photo folder with the same model file, hasher and search structure,
    else :class:`SearchError`. A merge that was killed or failed is started over by the
    same command."""
    start = time.perf_counter()
    index_dir = Path(index_dir)
    metas, dirs = {}, [Path(d) for d in shard_dirs]
    for d in dirs:
        con = connect(d)
        try:
            meta = read_meta(con)
        finally:
            con.close()
        if not meta.get("shard"):
            raise SearchError(f"{str(d)!r} is not a shard index (built without --shard i/n)")
        if meta.get("faiss_generation") != meta.get("generation"):
            raise SearchError(f"{str(d)!r} is unfinished; finish it with "
                              "`zsbir index update` first")
        i, n = meta["shard"]
        if i in metas:
            raise SearchError(f"shard {i}/{n} given twice ({metas[i][0]} and {d})")
        metas[i] = (d, meta)
    first_dir, first = metas[min(metas)]
    n = first["shard"][1]
    for i, (d, meta) in metas.items():
        if meta.get("photo_root") != first.get("photo_root"):
            raise SearchError(
                f"the shards index different photo folders: {first.get('photo_root')!r} "
                f"({str(first_dir)!r}) and {meta.get('photo_root')!r} ({str(d)!r}); build "
                "every shard from the same folder")
        for key in MERGE_SAME:
            if meta.get(key, None) != first.get(key, None):
                raise SearchError(f"{str(d)!r} differs from the other shards in {key} "
                                  f"({meta.get(key)!r} vs {first.get(key)!r})")
        if meta["shard"][1] != n:
            raise SearchError(f"{str(d)!r} is shard {i}/{meta['shard'][1]}, others of {n}")
    missing = sorted(set(range(n)) - set(metas))
    if missing:
        raise SearchError("missing shard(s) " + ", ".join(f"{i}/{n}" for i in missing))
    sources = [str(metas[i][0]) for i in range(n)]
    if not _merge_restartable(index_dir, sources):
        raise SearchError(f"{str(index_dir)!r} exists and is not an empty folder")
    index_dir.mkdir(parents=True, exist_ok=True)
    summary = BuildSummary(ann=first["ann"])
    with disk_errors(index_dir), WriteLock(index_dir, "index merge"), \
            removing_temporaries(index_dir):
        remove_leftovers(index_dir, keep_damaged=False)
        copy_atomic(metas[0][0] / MODEL_NAME, index_dir / MODEL_NAME, first["model_sha256"])
        con = connect(index_dir, create=True)
        try:
            with transaction(con):
                keep = {k: v for k, v in first.items() if k not in (
                    "shard", "count", "nprobe", "nlist", "recall_at_10", "recall_queries",
                    "faiss_sha256", "faiss_bytes")}
                set_meta(con, **{**keep, "name": index_dir.resolve().name, "generation": 1,
                                 "faiss_generation": -1, "created": time.time(),
                                 "merged_from": sources})
                for i in range(n):
                    src = connect(metas[i][0])
                    try:
                        _copy_rows(src, con)
                        copy_outputs(src, con)  # stored outputs follow their rows
                    except sqlite3.IntegrityError as exc:
                        raise SearchError(f"a photo is in two shards ({exc}): the folder "
                                          "changed between the shard builds; build them "
                                          "again") from exc
                    finally:
                        src.close()
                set_meta(con, outputs={k: v for _, m in metas.values()  # every shard's shapes
                                       for k, v in (m.get("outputs") or {}).items()})
            meta = read_meta(con)
            tm = _load_model(index_dir / MODEL_NAME, "cpu")
            fx, info = make_faiss(con, tm, meta)
            _write_faiss(index_dir, con, fx, info)
        finally:
            con.close()
    summary.total = int(fx.index.ntotal)
    summary.unchanged = summary.total
    summary.recall_at_10, summary.nprobe = info.get("recall_at_10"), info.get("nprobe")
    summary.seconds = time.perf_counter() - start
    return summary


def _merge_restartable(index_dir: Path, sources: list[str]) -> bool:
    """An empty or absent directory, or one left by a merge of these shards that did not
    finish (or whose database is damaged): merged (again) from scratch."""
    state = index_state(index_dir)
    if state in ("new", "leftovers"):
        return True
    if state == "foreign":
        return False
    meta = _stored_meta(index_dir)
    if meta is None:
        return True
    return meta.get("merged_from") == sources and \
        meta.get("faiss_generation") != meta.get("generation")
