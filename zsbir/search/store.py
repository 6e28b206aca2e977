"""A persistent, self-contained photo index: ``zsbir index build`` / ``zsbir index update``.

An index directory holds everything a search needs (the run directory is not read again):

- ``model.pt``: a copy of the run's ``checkpoints/final.pt`` (weights, manifest, fitted
  hashers; loaded with :func:`zsbir.engine.index.load_trained`);
- ``index.sqlite``: the metadata table (stdlib :mod:`sqlite3`, WAL journal): one row per
  photo (path relative to the photo folder, size, mtime, SHA-256 of the content, class label
  from the photo's folder name, and its float32 embedding), a ``skipped`` table (unreadable
  files and why) and a ``meta`` key/value table (JSON values);
- ``photos.faiss``: the search structure, derived from the stored embeddings:
  ``IndexFlatIP`` on L2-normalized embeddings for real-valued hashers, ``IndexBinaryFlat``
  for binary codes (ITQ, sign); with ``ann = "ivf"`` an ``IndexIVFFlat`` /
  ``IndexBinaryIVF`` (built by :mod:`zsbir.hashing.ann`) whose ``nprobe`` is the smallest
  power of two reaching recall@10 >= 0.95 against exact search (measured, and stored in
  ``meta``); its size and SHA-256 are stored in ``meta`` too;
- ``write.lock`` while a writer runs (:mod:`zsbir.search.lock`).

The photos are found and read by :mod:`zsbir.search.scan` (links, loops, FIFOs, undecodable
names; the stored SHA-256, size and mtime are those of the bytes embedded); the files are
opened, verified and written by :mod:`zsbir.search.files`.

Vector ``i`` of ``photos.faiss`` is the ``i``-th photo in path order. The SQLite database is
the source of truth: every embedded batch is committed in its own transaction (bumping the
``generation`` counter), so a killed build or update leaves the last committed state, and
the next ``build``/``update`` resumes (already embedded photos are not embedded again).
``photos.faiss`` is written (atomically) at the end, with the generation it reflects; a
reader that finds it older than the database, or not the file that was written (its
checksum), rebuilds it in memory from the stored embeddings (with a warning in the latter
case). A build killed before its database held its settings, or into a damaged database,
starts over in the same directory; a failed write removes its temporary files, and a full
disk is one line naming the index directory (:func:`zsbir.search.files.disk_errors`).

Per-photo model outputs besides the embedding (``tokens`` for a pair scorer, ...) are
stored in an ``outputs`` table of ``index.sqlite`` (:mod:`zsbir.search.outputs`), written in
the same transactions as their rows.

Incremental updates compare each file's size and mtime with its row; when either changed,
the content hash decides whether the photo is embedded again. Deleted files are removed.

Where the search structure lives is the index's *backend* (:mod:`zsbir.search.backends`,
``zsbir index build --backend``): ``faiss`` (``photos.faiss``, above: the default) or
``milvus`` (a Milvus collection; :mod:`zsbir.search.backends.milvus`); the database stays
the source of truth in both, and each committed batch reaches the backend as it comes
(its writer's ``committed``), the rest at the end (``finish``). With ``ray=`` the photos are
embedded in Ray actor pools (:mod:`zsbir.search.ray_embed`) instead of the local loader.

Large collections (docs/scaling.md): ``build_index(..., shard=(i, n))`` indexes only shard
``i`` of ``n`` of the folder's sorted photo list
(:func:`zsbir.engine.distributed.sharding.partition_files`, torch-free), so n processes or
machines embed their shards independently; :func:`merge_indexes` then joins the n shard
indexes into one (the stored embeddings are copied, nothing is embedded again) and builds
its faiss index.

This module builds and updates an index; the other jobs live in their own modules, and
every name imported from here before still is: :mod:`zsbir.search.rows` (the SQLite photo
rows), :mod:`zsbir.search.embedding` (the model and the embedding loader),
:mod:`zsbir.search.faiss_index` (the search structure: build, write, load),
:mod:`zsbir.search.merge` (shard indexes into one), :mod:`zsbir.search.summary`.
"""

from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zsbir.engine.distributed.sharding import partition_files
from zsbir.progress import phase
from zsbir.search import scan
from zsbir.search.backends import DEFAULT_BACKEND, backend_of, make_backend
from zsbir.search.embedding import _embed_batches, _load_model
from zsbir.search.errors import SearchError
from zsbir.search.faiss_index import (
    FaissIndex,
    _write_faiss,  # noqa: F401 - kept importable from here
    encode,
    load_faiss,
    make_faiss,
)
from zsbir.search.files import (
    DB_NAME,
    FAISS_NAME,
    MODEL_NAME,
    connect,
    copy_atomic,
    disk_errors,
    file_sha256,
    index_state,
    read_meta,
    remove_leftovers,
    removing_temporaries,
    set_meta,
    transaction,
)
from zsbir.search.lock import WriteLock
from zsbir.search.merge import merge_indexes
from zsbir.search.outputs import DTYPES, ensure_schema, stored_output_names
from zsbir.search.rerank import run_tables, table_outputs
from zsbir.search.rows import RowsGone, _commit_batch, _stored_meta, gallery_embeddings
from zsbir.search.scan import IMAGE_SUFFIXES, db_name, fs_name, shown
from zsbir.search.summary import BuildSummary, _search_param

__all__ = ["DB_NAME", "FAISS_NAME", "IMAGE_SUFFIXES", "MODEL_NAME", "BuildSummary",
           "FaissIndex", "RowsGone", "build_index", "connect", "encode", "gallery_embeddings",
           "load_faiss", "make_faiss", "merge_indexes", "read_meta", "update_index"]

FORMAT_VERSION = 1


# ------------------------------------------------------------------------- build/update
def build_index(run_dir: str | Path, photo_dir: str | Path, index_dir: str | Path, *,
                hasher: str | None = None, ann: Literal["flat", "ivf"] = "flat",
                name: str | None = None, device: str = "auto", batch_size: int = 64,
                workers: int = -1, shard: tuple[int, int] | None = None,
                follow_outside_links: bool = False, outputs: Sequence[str] = (),
                output_dtype: str = "float32", backend: Any = None,
                ray: Any = None) -> BuildSummary:
    """Create ``index_dir`` for the photos under ``photo_dir`` with the run's final weights.

    Run again on an unfinished index of the same run, folder and settings, it resumes (as
    :func:`update_index`); a directory left by a build killed before its database held
    its settings, or holding a damaged database, is built again; any other existing
    index is refused. ``shard = (i, n)``: only shard ``i`` of ``n`` of the sorted photo
    list, for :func:`merge_indexes`. ``follow_outside_links``: also index files that
    symlinks lead to outside ``photo_dir`` (kept by updates). ``outputs``: model outputs
    to store per photo besides those the run's pair scorer and rerankers read
    (:mod:`zsbir.search.outputs`), as ``output_dtype`` (``"float32"`` or ``"float16"``).
    ``backend``: an index backend (:func:`zsbir.search.backends.make_backend`; default
    faiss). ``ray``: a :class:`zsbir.search.ray_embed.RayOptions` to embed in Ray actor
    pools."""
    run_dir, photo_dir, index_dir = Path(run_dir), Path(photo_dir), Path(index_dir)
    final = run_dir if run_dir.is_file() else run_dir / "checkpoints" / "final.pt"
    if not final.is_file():
        raise SearchError(f"{str(run_dir)!r} has no checkpoints/final.pt: only a finished "
                          "`zsbir run` can index photos")
    if not photo_dir.is_dir():
        raise SearchError(f"no photo folder {str(photo_dir)!r}")
    backend = backend if backend is not None else make_backend(DEFAULT_BACKEND)
    if ann not in backend.ann_types:
        raise SearchError(f"ann must be one of {', '.join(backend.ann_types)} for the "
                          f"{backend.name} backend, not {ann!r}")
    if output_dtype not in DTYPES:
        raise SearchError(f"output dtype must be one of {', '.join(DTYPES)}, not "
                          f"{output_dtype!r}")
    settings = {"photo_root": str(photo_dir.resolve()), "model_sha256": file_sha256(final),
                "ann": ann, "shard": list(shard) if shard else None,
                "follow_outside_links": bool(follow_outside_links),
                "extra_outputs": list(dict.fromkeys(outputs)), "output_dtype": output_dtype,
                **backend.settings(index_dir, ann)}
    state = index_state(index_dir)
    if state == "foreign":
        raise SearchError(f"{str(index_dir)!r} exists and is not an empty folder or a zsbir "
                          "index; choose a new directory")
    resume = state == "index" and _resumable(index_dir, settings, hasher)
    tm = None
    tables = run_tables(run_dir) if run_dir.is_dir() else []  # with zsbir tune's values
    if not resume:  # checked before anything is written: a wrong --hasher creates nothing
        tm = _load_model(final, device)
        h = tm.hasher(hasher)
        # the outputs the run's rerankers read (its checkpoint's and its tuned tables'),
        # then --outputs; and a model without them is refused here
        names = stored_output_names(tm, [*table_outputs(tables), *outputs])
        if ann == "hnsw" and h.binary:
            raise SearchError("--ann hnsw is for real-valued codes; a binary hasher's codes "
                              "use flat or ivf (Hamming)")
        backend.check_new(index_dir, {**settings, "hasher": h.tag, "binary": bool(h.binary)})
    index_dir.mkdir(parents=True, exist_ok=True)
    with disk_errors(index_dir), WriteLock(index_dir) as lock, removing_temporaries(index_dir):
        if resume:
            con = connect(index_dir, write=True)
            try:
                summary = _update(con, index_dir, device, batch_size, workers, final, ray)
            finally:
                con.close()
            summary.resumed = True
        else:
            summary = BuildSummary()
            db = index_dir / DB_NAME
            if db.is_file() and db.stat().st_size:
                summary.notes.append(f"{DB_NAME} in {shown(index_dir)} was damaged or "
                                     "unfinished: set aside as index.sqlite.damaged, "
                                     "building it again")
            remove_leftovers(index_dir)
            copy_atomic(final, index_dir / MODEL_NAME, settings["model_sha256"])
            h = tm.hasher(hasher)
            con = connect(index_dir, create=True)
            try:
                with transaction(con):
                    set_meta(con, format_version=FORMAT_VERSION,
                             name=name or index_dir.resolve().name, model_file=MODEL_NAME,
                             run_dir=str(run_dir.resolve()), hasher=h.tag,
                             binary=bool(h.binary), created=time.time(), generation=0,
                             faiss_generation=-1, output_names=names, outputs={},
                             rerankers=tables, **settings)
                    if names:
                        ensure_schema(con)
                summary = _sync(con, index_dir, tm, batch_size, workers, summary, ray)
            finally:
                con.close()
        summary.stale_lock = lock.broke_stale
        return summary


def _resumable(index_dir: Path, settings: dict[str, Any], hasher: str | None) -> bool:
    """True: ``index_dir`` is an index of these settings (resume it); False: a damaged or
    unfinished one (build it again); otherwise SearchError naming the difference."""
    meta = _stored_meta(index_dir)
    if meta is None:
        return False
    if meta.get("photo_root") != settings["photo_root"]:
        raise SearchError(
            f"{str(index_dir)!r} already holds an index (of {meta.get('photo_root')!r}); "
            "update it with `zsbir index update`, or build into another directory")
    wanted = {**settings, "hasher": hasher or meta.get("hasher")}
    absent = {"follow_outside_links": False, "extra_outputs": [], "output_dtype": "float32",
              "backend": DEFAULT_BACKEND}
    for key, value in wanted.items():
        have = meta.get(key, absent.get(key))
        if have != value:
            what = "model" if key == "model_sha256" else key
            raise SearchError(
                f"{str(index_dir)!r} already holds an index of this folder with another "
                f"{what} ({have!r}, not {value!r}); update it with `zsbir index update`, or "
                "build into another directory")
    return True


def update_index(index_dir: str | Path, *, device: str = "auto", batch_size: int = 64,
                 workers: int = -1, ray: Any = None) -> BuildSummary:
    """Embed new and changed photos, drop deleted ones, bring the backend's search
    structure up to date (rewrite the faiss index)."""
    index_dir = Path(index_dir)
    connect(index_dir, read_only=False).close()  # an index, not damaged: before the lock
    with disk_errors(index_dir), WriteLock(index_dir) as lock, removing_temporaries(index_dir):
        con = connect(index_dir, write=True)
        try:
            summary = _update(con, index_dir, device, batch_size, workers, ray=ray)
        finally:
            con.close()
        summary.stale_lock = lock.broke_stale
        return summary


def _update(con: sqlite3.Connection, index_dir: Path, device: str, batch_size: int,
            workers: int, final: Path | None = None, ray: Any = None) -> BuildSummary:
    """Check the folder and the model copy (restored from ``final`` by a resumed build),
    then :func:`_sync`."""
    meta = read_meta(con)
    root = Path(meta["photo_root"])
    if not root.is_dir():
        raise SearchError(f"the index's photo folder {str(root)!r} is gone")
    model = index_dir / meta.get("model_file", MODEL_NAME)
    if final is not None and (not model.is_file() or file_sha256(model) != meta.get(
            "model_sha256")):
        copy_atomic(final, model, meta["model_sha256"])
    if not model.is_file():
        raise SearchError(f"index {str(index_dir)!r} lacks its model ({model.name}): run "
                          "the `zsbir index build` command that made it again")
    if meta.get("model_sha256") and file_sha256(model) != meta["model_sha256"]:
        raise SearchError(f"{model.name} in {str(index_dir)!r} is not the model the index "
                          "was built with (another SHA-256): run the `zsbir index build` "
                          "command that made it again")
    run_dir = Path(meta.get("run_dir") or "")
    if meta.get("run_dir") and run_dir.is_dir():  # `zsbir tune` run since the build
        tables = run_tables(run_dir)
        if tables and tables != meta.get("rerankers"):
            with transaction(con):
                set_meta(con, rerankers=tables)
    return _sync(con, index_dir, _load_model(model, device), batch_size, workers, ray=ray)


def _scan(meta: dict[str, Any]) -> scan.Scan:
    """The index's photos in its folder (its shard of them, for a shard index)."""
    found = scan.scan_photos(meta["photo_root"], bool(meta.get("follow_outside_links")))
    if meta.get("shard"):  # a shard index holds its block of the sorted photo list
        mine = set(partition_files(list(found.files), *meta["shard"]))
        found.files = {rel: st for rel, st in found.files.items() if rel in mine}
    return found


def _same_content(path: Path, sha: str) -> bool:
    try:
        data, _ = scan.read_photo(path)
    except OSError:
        return False
    return hashlib.sha256(data).hexdigest() == sha


def _sync(con: sqlite3.Connection, index_dir: Path, tm: Any, batch_size: int,
          workers: int, summary: BuildSummary | None = None, ray: Any = None
          ) -> BuildSummary:
    start = time.perf_counter()
    meta = read_meta(con)
    writer = backend_of(meta).writer(index_dir, con, tm, meta)
    root = Path(meta["photo_root"])
    summary = summary or BuildSummary()
    summary.ann = meta["ann"]
    scanned = _scan(meta)
    found = scanned.files
    summary.skipped += [(str(root / rel), why) for rel, why in scanned.skipped]
    rows = {fs_name(p): (size, mtime, sha) for p, size, mtime, sha in
            con.execute("SELECT path, size, mtime_ns, sha256 FROM photos")}
    old_skips = {fs_name(p): (size, mtime, reason) for p, size, mtime, reason in
                 con.execute("SELECT path, size, mtime_ns, reason FROM skipped")}
    gone = [p for p in rows if p not in found]
    gone_skips = [p for p in old_skips if p not in found]
    if gone or gone_skips:
        with transaction(con):
            con.executemany("DELETE FROM photos WHERE path = ?", [(db_name(p),) for p in gone])
            con.executemany("DELETE FROM skipped WHERE path = ?",
                            [(db_name(p),) for p in gone_skips])
            set_meta(con, generation=meta["generation"] + 1)
        meta["generation"] += 1
    summary.removed = len(gone)

    todo: list[str] = []
    touched: list[tuple[int, int, Any]] = []
    for rel, st in sorted(found.items()):
        if rel in rows:
            size, mtime, sha = rows[rel]
            if (size, mtime) == (st.st_size, st.st_mtime_ns):
                summary.unchanged += 1
            elif _same_content(root / rel, sha):  # touched, same content
                summary.unchanged += 1
                touched.append((st.st_size, st.st_mtime_ns, db_name(rel)))
            else:
                summary.changed += 1
                todo.append(rel)
        elif rel in old_skips and old_skips[rel][:2] == (st.st_size, st.st_mtime_ns):
            summary.skipped.append((str(root / rel), old_skips[rel][2]))
        else:
            summary.new += 1
            todo.append(rel)
    if touched:
        with transaction(con):
            con.executemany("UPDATE photos SET size = ?, mtime_ns = ? WHERE path = ?", touched)

    names = list(meta.get("output_names") or [])  # stored besides the embedding
    if ray is not None:
        from zsbir.search.ray_embed import ray_embed_batches

        batches = ray_embed_batches(ray, index_dir / meta.get("model_file", MODEL_NAME), root,
                                    todo, batch_size, names)
    else:
        batches = _embed_batches(tm, root, todo, batch_size, workers, names)
    with phase("embedding photos", total=len(todo), unit="photos") as advance:
        for done, (kept, emb, skipped, *outs) in batches:
            _commit_batch(con, meta, found, kept, emb, skipped, *outs)
            writer.committed([rel for rel, _ in kept])
            summary.embedded += len(kept) - sum(1 for v in emb if not np.isfinite(v).all())
            summary.skipped += [(str(root / r), e) for r, e in skipped]
            advance(completed=done, info=f"{len(summary.skipped)} skipped")

    try:
        index, info = writer.finish()
    finally:
        writer.close()  # a Milvus client: closed here, not at interpreter exit
    summary.total = len(index.ids)
    summary.recall_at_10, summary.nprobe = info.get("recall_at_10"), info.get("nprobe")
    summary.search_param = _search_param(info)
    summary.seconds = time.perf_counter() - start
    return summary

