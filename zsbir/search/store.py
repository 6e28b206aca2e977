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

Incremental updates compare each file's size and mtime with its row; when either changed,
the content hash decides whether the photo is embedded again. Deleted files are removed.

Large collections (docs/scaling.md): ``build_index(..., shard=(i, n))`` indexes only shard
``i`` of ``n`` of the folder's sorted photo list
(:func:`zsbir.engine.distributed.partition_files`), so n processes or machines embed
their shards independently; :func:`merge_indexes` then joins the n shard indexes into one
(the stored embeddings are copied, nothing is embedded again) and builds its faiss index.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zsbir.progress import phase
from zsbir.search import scan
from zsbir.search.errors import IndexDamagedError, SearchError
from zsbir.search.files import (
    DB_NAME,
    FAISS_NAME,
    MODEL_NAME,
    connect,
    copy_atomic,
    damaged,
    db_dir,
    disk_errors,
    file_sha256,
    index_state,
    read_faiss,
    read_meta,
    remove_leftovers,
    removing_temporaries,
    save_faiss,
    set_meta,
    transaction,
)
from zsbir.search.lock import WriteLock
from zsbir.search.scan import IMAGE_SUFFIXES, db_name, fs_name, shown

__all__ = ["DB_NAME", "FAISS_NAME", "IMAGE_SUFFIXES", "MODEL_NAME", "BuildSummary",
           "FaissIndex", "RowsGone", "build_index", "connect", "encode", "gallery_embeddings",
           "load_faiss", "make_faiss", "merge_indexes", "read_meta", "update_index"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
IVF_TARGET_RECALL = 0.95
IVF_RECALL_QUERIES = 500


@dataclass
class BuildSummary:
    """What a build or update did."""

    embedded: int = 0                 # photos embedded by this call (new or changed)
    new: int = 0
    changed: int = 0
    unchanged: int = 0                # rows kept as they were (incl. touched, same content)
    removed: int = 0                  # files gone from the folder, rows deleted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    total: int = 0                    # photos in the index afterwards
    seconds: float = 0.0
    ann: str = "flat"
    recall_at_10: float | None = None  # IVF only: against exact search
    nprobe: int | None = None
    resumed: bool = False
    stale_lock: dict | None = None
    notes: list[str] = field(default_factory=list)  # e.g. a damaged database set aside

    @property
    def photos_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["photos_per_s"] = self.photos_per_s
        return d


def _label(rel: str) -> str | None:
    parent = Path(rel).parent
    return None if parent == Path(".") else parent.name


# ------------------------------------------------------------------------- build/update
def build_index(run_dir: str | Path, photo_dir: str | Path, index_dir: str | Path, *,
                hasher: str | None = None, ann: Literal["flat", "ivf"] = "flat",
                name: str | None = None, device: str = "auto", batch_size: int = 64,
                workers: int = -1, shard: tuple[int, int] | None = None,
                follow_outside_links: bool = False) -> BuildSummary:
    """Create ``index_dir`` for the photos under ``photo_dir`` with the run's final weights.

    Run again on an unfinished index of the same run, folder and settings, it resumes (as
    :func:`update_index`); a directory left by a build killed before its database held
    its settings, or holding a damaged database, is built again; any other existing
    index is refused. ``shard = (i, n)``: only shard ``i`` of ``n`` of the sorted photo
    list, for :func:`merge_indexes`. ``follow_outside_links``: also index files that
    symlinks lead to outside ``photo_dir`` (kept by updates)."""
    run_dir, photo_dir, index_dir = Path(run_dir), Path(photo_dir), Path(index_dir)
    final = run_dir if run_dir.is_file() else run_dir / "checkpoints" / "final.pt"
    if not final.is_file():
        raise SearchError(f"{str(run_dir)!r} has no checkpoints/final.pt: only a finished "
                          "`zsbir run` can index photos")
    if not photo_dir.is_dir():
        raise SearchError(f"no photo folder {str(photo_dir)!r}")
    if ann not in ("flat", "ivf"):
        raise SearchError(f"ann must be 'flat' or 'ivf', not {ann!r}")
    settings = {"photo_root": str(photo_dir.resolve()), "model_sha256": file_sha256(final),
                "ann": ann, "shard": list(shard) if shard else None,
                "follow_outside_links": bool(follow_outside_links)}
    state = index_state(index_dir)
    if state == "foreign":
        raise SearchError(f"{str(index_dir)!r} exists and is not an empty folder or a zsbir "
                          "index; choose a new directory")
    resume = state == "index" and _resumable(index_dir, settings, hasher)
    tm = None
    if not resume:  # checked before anything is written: a wrong --hasher creates nothing
        tm = _load_model(final, device)
        tm.hasher(hasher)
    index_dir.mkdir(parents=True, exist_ok=True)
    with disk_errors(index_dir), WriteLock(index_dir) as lock, removing_temporaries(index_dir):
        if resume:
            con = connect(index_dir, write=True)
            try:
                summary = _update(con, index_dir, device, batch_size, workers, final)
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
                             faiss_generation=-1, **settings)
                summary = _sync(con, index_dir, tm, batch_size, workers, summary)
            finally:
                con.close()
        summary.stale_lock = lock.broke_stale
        return summary


def _stored_meta(index_dir: Path) -> dict[str, Any] | None:
    """The ``meta`` table of the index in ``index_dir``, or None when it is damaged."""
    try:
        con = connect(index_dir, read_only=False)
    except IndexDamagedError:
        return None
    try:
        return read_meta(con)
    finally:
        con.close()


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
    for key, value in wanted.items():
        have = meta.get(key, False if key == "follow_outside_links" else None)
        if have != value:
            what = "model" if key == "model_sha256" else key
            raise SearchError(
                f"{str(index_dir)!r} already holds an index of this folder with another "
                f"{what} ({have!r}, not {value!r}); update it with `zsbir index update`, or "
                "build into another directory")
    return True


def update_index(index_dir: str | Path, *, device: str = "auto", batch_size: int = 64,
                 workers: int = -1) -> BuildSummary:
    """Embed new and changed photos, drop deleted ones, rewrite the faiss index."""
    index_dir = Path(index_dir)
    connect(index_dir, read_only=False).close()  # an index, not damaged: before the lock
    with disk_errors(index_dir), WriteLock(index_dir) as lock, removing_temporaries(index_dir):
        con = connect(index_dir, write=True)
        try:
            summary = _update(con, index_dir, device, batch_size, workers)
        finally:
            con.close()
        summary.stale_lock = lock.broke_stale
        return summary


def _update(con: sqlite3.Connection, index_dir: Path, device: str, batch_size: int,
            workers: int, final: Path | None = None) -> BuildSummary:
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
    return _sync(con, index_dir, _load_model(model, device), batch_size, workers)


def _load_model(model_file: Path, device: str) -> Any:
    from zsbir.engine.index import load_trained

    return load_trained(model_file, device)


def _scan(meta: dict[str, Any]) -> scan.Scan:
    """The index's photos in its folder (its shard of them, for a shard index)."""
    found = scan.scan_photos(meta["photo_root"], bool(meta.get("follow_outside_links")))
    if meta.get("shard"):  # a shard index holds its block of the sorted photo list
        from zsbir.engine.distributed import partition_files

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
          workers: int, summary: BuildSummary | None = None) -> BuildSummary:
    start = time.perf_counter()
    meta = read_meta(con)
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

    with phase("embedding photos", total=len(todo), unit="photos") as advance:
        for done, (kept, emb, skipped) in _embed_batches(tm, root, todo, batch_size, workers):
            _commit_batch(con, meta, found, kept, emb, skipped)
            summary.embedded += len(kept) - sum(1 for v in emb if not np.isfinite(v).all())
            summary.skipped += [(str(root / r), e) for r, e in skipped]
            advance(completed=done, info=f"{len(summary.skipped)} skipped")

    index, info = make_faiss(con, tm, meta)
    _write_faiss(index_dir, con, index, info)
    summary.total = int(index.index.ntotal)
    summary.recall_at_10, summary.nprobe = info.get("recall_at_10"), info.get("nprobe")
    summary.seconds = time.perf_counter() - start
    return summary


def _commit_batch(con: sqlite3.Connection, meta: dict[str, Any],
                  found: dict[str, os.stat_result],
                  kept: list[tuple[str, tuple[str, int, int]]], emb: np.ndarray,
                  skipped: list[tuple[str, str]]) -> None:
    """One transaction: the batch's embeddings (each with the SHA-256, size and mtime of
    the bytes it was computed from) and skips, and a new generation. A non-finite
    embedding is not stored: the photo is skipped."""
    records, skipped = [], list(skipped)
    for (rel, (sha, size, mtime)), vec in zip(kept, emb):
        if not np.isfinite(vec).all():
            skipped.append((rel, "the model gave a non-finite embedding"))
            continue
        records.append((db_name(rel), size, mtime, sha, db_name(_label(rel)),
                        np.ascontiguousarray(vec, dtype=np.float32).tobytes(), time.time()))
    with transaction(con):
        con.executemany(
            "INSERT INTO photos(path, size, mtime_ns, sha256, label, embedding, indexed_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, "
            "label = excluded.label, embedding = excluded.embedding, "
            "indexed_at = excluded.indexed_at", records)
        # a file that became unreadable is no longer in the index
        con.executemany("DELETE FROM photos WHERE path = ?",
                        [(db_name(r),) for r, _ in skipped])
        con.executemany(
            "INSERT INTO skipped(path, size, mtime_ns, reason) VALUES(?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, reason = excluded.reason",
            [(db_name(r), found[r].st_size, found[r].st_mtime_ns, e) for r, e in skipped])
        con.executemany("DELETE FROM skipped WHERE path = ?", [(r[0],) for r in records])
        meta["generation"] += 1
        set_meta(con, generation=meta["generation"], updated=time.time(),
                 dim=int(emb.shape[1]) if len(records) else meta.get("dim"))


def _embed_batches(tm: Any, root: Path, todo: list[str], batch_size: int, workers: int
                   ) -> Iterator[tuple[int, tuple[list[tuple[str, tuple[str, int, int]]],
                                                  np.ndarray, list[tuple[str, str]]]]]:
    """Embed ``todo`` through the training loader: (done count, (kept, emb, skipped));
    ``kept`` pairs each photo with (sha256, size, mtime_ns) of the bytes embedded."""
    import torch
    from torch.utils.data import DataLoader

    from zsbir.data.base import PHOTO
    from zsbir.data.loading import worker_count
    from zsbir.engine.threads import use_threads, worker_init

    if not todo:
        return
    ds = scan.PhotoDataset(root, todo, tm.transform, PHOTO)
    batches = [list(range(i, min(i + batch_size, len(todo))))
               for i in range(0, len(todo), batch_size)]
    device = tm.device
    use_threads("train", device, workers=workers)  # zsbir.engine.threads: loaders + model
    n_workers = worker_count(workers, device)
    loader = DataLoader(ds, batch_sampler=batches, num_workers=n_workers,  # type: ignore
                        collate_fn=scan.collate_photos, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if n_workers > 0 else None,
                        generator=torch.Generator().manual_seed(0),
                        worker_init_fn=worker_init if n_workers > 0 else None)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    done = 0
    for batch, keys in zip(loader, batches):
        done += len(keys)
        skipped = list(batch["skipped"])
        if "image" not in batch:
            yield done, ([], np.zeros((0, 0), np.float32), skipped)
            continue
        with autocast:
            emb = np.asarray(tm.embed_batch(batch), dtype=np.float32)
        kept = [(todo[i], f) for i, f in zip(batch["index"].tolist(), batch["files"])]
        yield done, (kept, emb, skipped)


# ------------------------------------------------------------------------------- merge
MERGE_SAME = ("photo_root", "model_sha256", "hasher", "ann", "follow_outside_links")


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
                    except sqlite3.IntegrityError as exc:
                        raise SearchError(f"a photo is in two shards ({exc}): the folder "
                                          "changed between the shard builds; build them "
                                          "again") from exc
                    finally:
                        src.close()
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


def _copy_rows(src: sqlite3.Connection, dst: sqlite3.Connection) -> None:
    """A shard's photo rows (with their embeddings) and skipped files, as they are."""
    dst.executemany(
        "INSERT INTO photos(path, size, mtime_ns, sha256, label, embedding, indexed_at) "
        "VALUES(?, ?, ?, ?, ?, ?, ?)",
        src.execute("SELECT path, size, mtime_ns, sha256, label, embedding, indexed_at "
                    "FROM photos ORDER BY path"))
    dst.executemany("INSERT INTO skipped(path, size, mtime_ns, reason) VALUES(?, ?, ?, ?)",
                    src.execute("SELECT path, size, mtime_ns, reason FROM skipped"))


# ------------------------------------------------------------------------------- faiss
@dataclass
class FaissIndex:
    """The loaded search structure and the photos in its vector order."""

    index: Any
    ids: np.ndarray                   # sqlite ids, in vector order (= path order)
    paths: list[str]                  # relative paths (as os.fsdecode gives them)
    labels: list[str | None]
    binary: bool
    generation: int


def _vectors(con: sqlite3.Connection, rows: list[tuple[Any, bytes]], dim: int | None
             ) -> np.ndarray:
    """Stored embeddings ``(path, blob)``, checked: float32, ``dim`` values, all finite
    (else :class:`~zsbir.search.errors.IndexDamagedError` naming the photo)."""
    vecs = []
    for path, blob in rows:
        if not isinstance(blob, bytes) or len(blob) % 4 or (dim and len(blob) != 4 * dim):
            raise damaged(db_dir(con), f"photo {shown(fs_name(path) or '?')!r} has a "
                                       "malformed embedding")
        vecs.append(np.frombuffer(blob, dtype=np.float32))
    if not vecs:
        return np.zeros((0, dim or 1), np.float32)
    emb = np.stack(vecs)
    finite = np.isfinite(emb).all(axis=1)
    if not finite.all():
        path = rows[int(np.flatnonzero(~finite)[0])][0]
        raise damaged(db_dir(con), f"photo {shown(fs_name(path) or '?')!r} has a "
                                   "non-finite embedding")
    return emb


def _load_rows(con: sqlite3.Connection, dim: int | None = None
               ) -> tuple[np.ndarray, list[str], list[str | None], np.ndarray]:
    ids, paths, labels, blobs = [], [], [], []
    for i, p, lab, blob in con.execute(
            "SELECT id, path, label, embedding FROM photos ORDER BY path"):
        ids.append(i)
        paths.append(fs_name(p))
        labels.append(fs_name(lab))
        blobs.append((p, blob))
    emb = _vectors(con, blobs, dim)
    return np.asarray(ids, np.int64), paths, labels, emb


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))


def encode(hasher: Any, emb: np.ndarray) -> np.ndarray:
    """Codes for faiss: packed uint8 (binary hashers) or L2-normalized float32."""
    return np.ascontiguousarray(hasher.encode(emb)) if hasher.binary else _unit(emb)


def make_faiss(con: sqlite3.Connection, tm: Any, meta: dict[str, Any]) -> tuple[Any, dict]:
    """Build the faiss index of every stored embedding (path order)."""
    import faiss

    ids, paths, labels, emb = _load_rows(con, meta.get("dim"))
    h = tm.hasher(meta["hasher"])
    binary = bool(meta["binary"])
    n = len(ids)
    codes = encode(h, emb) if n else None
    width = (codes.shape[1] if n else 1) if binary else (emb.shape[1] if n else
                                                          meta.get("dim") or 1)
    info: dict[str, Any] = {}
    if meta["ann"] == "ivf" and n >= 2:
        from zsbir.hashing.ann import build_binary_ivf, build_ivf

        ann = build_binary_ivf(codes, nprobe=1) if binary else build_ivf(codes, nprobe=1)
        info = _tune_nprobe(ann, codes, binary)
        index = ann.index
    elif binary:
        index = faiss.IndexBinaryFlat(8 * width)
        if n:
            index.add(codes)
    else:
        index = faiss.IndexFlatIP(width)
        if n:
            index.add(codes)
    return FaissIndex(index, ids, paths, labels, binary, meta["generation"]), info


def _tune_nprobe(ann: Any, codes: np.ndarray, binary: bool) -> dict[str, Any]:
    """The smallest power-of-two ``nprobe`` whose recall@10 against exact search reaches
    0.95 (:func:`zsbir.hashing.ann.recall_at_k`; Hamming ties at the 10th distance count as
    hits), measured with up to 500 photos of the collection as queries and their 10 nearest
    *other* photos (each query's own entry, first in both rankings, is left out)."""
    from zsbir.hashing.ann import build_exact, recall_at_k

    n = codes.shape[0]
    q = codes[np.random.default_rng(0).choice(n, min(n, IVF_RECALL_QUERIES), replace=False)]
    k = min(10, n - 1)
    exact = build_exact(codes, binary=binary).search(q, k + 1)
    exact = (exact[0][:, 1:], exact[1][:, 1:])
    nlist = int(ann.params["nlist"])
    nprobe = 1
    while True:
        ann.set_nprobe(nprobe)
        v, i = ann.search(q, k + 1)
        recall = recall_at_k((v[:, 1:], i[:, 1:]), exact, k, binary=binary)
        if recall >= IVF_TARGET_RECALL or nprobe >= nlist:
            break
        nprobe = min(nlist, nprobe * 2)
    return {"nlist": nlist, "nprobe": nprobe, "recall_at_10": recall,
            "recall_queries": int(q.shape[0])}


def _write_faiss(index_dir: Path, con: sqlite3.Connection, fx: FaissIndex,
                 info: dict[str, Any]) -> None:
    """Write ``photos.faiss`` and record it: marked stale first, so a kill between the file
    and the record leaves an index that readers rebuild in memory, never a mismatch."""
    with transaction(con):
        set_meta(con, faiss_generation=-1)
    written = save_faiss(index_dir, fx.index, fx.binary)
    with transaction(con):
        set_meta(con, faiss_generation=fx.generation, count=int(fx.index.ntotal),
                 **written, **info)


def load_faiss(index_dir: Path, con: sqlite3.Connection, tm: Any) -> FaissIndex:
    """The saved faiss index when it reflects the database and is the file that was
    written (size and SHA-256 in ``meta``); else one rebuilt in memory from the stored
    embeddings (with a warning when the file is damaged: ``zsbir index update`` rewrites
    it)."""
    index_dir = Path(index_dir)
    meta = read_meta(con)
    path = index_dir / FAISS_NAME
    if meta.get("faiss_generation") != meta["generation"] or not path.is_file():
        fx, _ = make_faiss(con, tm, meta)  # an interrupted build/update: last commit
        return fx
    index, why = read_faiss(index_dir, meta)
    ids, paths, labels = [], [], []
    for i, p, lab in con.execute("SELECT id, path, label FROM photos ORDER BY path"):
        ids.append(i)
        paths.append(fs_name(p))
        labels.append(fs_name(lab))
    if index is not None:
        if index.ntotal != len(ids):  # a writer committed between the two reads
            fx, _ = make_faiss(con, tm, read_meta(con))
            return fx
        if not meta["binary"] and meta.get("dim") and index.d != meta["dim"]:
            index, why = None, f"{index.d}-dimensional vectors, not {meta['dim']}"
    if index is None:
        log.warning("%s in %s cannot be trusted (%s): rebuilt in memory from %s; `zsbir index "
                    "update %s` rewrites it", FAISS_NAME, shown(index_dir), why, DB_NAME,
                    shown(index_dir))
        fx, _ = make_faiss(con, tm, meta)
        return fx
    if meta.get("nprobe"):
        index.nprobe = int(meta["nprobe"])
    return FaissIndex(index, np.asarray(ids, np.int64), paths, labels, bool(meta["binary"]),
                      meta["generation"])


class RowsGone(LookupError):
    """Some of the photos asked for are no longer in the database (an update removed them)."""


def gallery_embeddings(con: sqlite3.Connection, ids: np.ndarray) -> np.ndarray:
    """Stored float32 embeddings of the photos ``ids`` (in that order), checked finite;
    :class:`RowsGone` when one of them is no longer in the database."""
    dim = read_meta(con).get("dim")
    out = []
    for chunk in range(0, len(ids), 900):
        part = [int(i) for i in ids[chunk:chunk + 900]]
        got = {i: (p, e) for i, p, e in con.execute(
            f"SELECT id, path, embedding FROM photos WHERE id IN "
            f"({','.join('?' * len(part))})", part)}
        if len(got) != len(part):
            raise RowsGone(sorted(set(part) - set(got))[:5])
        out.append(_vectors(con, [got[i] for i in part], dim))
    return np.concatenate(out) if out else np.zeros((0, dim or 1), np.float32)
