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
  ``meta``);
- ``write.lock`` while a writer runs (:mod:`zsbir.search.lock`).

Vector ``i`` of ``photos.faiss`` is the ``i``-th photo in path order. The SQLite database is
the source of truth: every embedded batch is committed in its own transaction (bumping the
``generation`` counter), so a killed build or update leaves the last committed state, and
the next ``build``/``update`` resumes (already embedded photos are not embedded again).
``photos.faiss`` is written (atomically) at the end, with the generation it reflects; a
reader that finds it older than the database rebuilds it in memory.

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
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from zsbir.progress import phase
from zsbir.search.errors import SearchError
from zsbir.search.lock import WriteLock

__all__ = ["IMAGE_SUFFIXES", "BuildSummary", "FaissIndex", "build_index", "connect",
           "load_faiss", "merge_indexes", "read_meta", "update_index"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
FORMAT_VERSION = 1
DB_NAME, MODEL_NAME, FAISS_NAME = "index.sqlite", "model.pt", "photos.faiss"
IVF_TARGET_RECALL = 0.95
IVF_RECALL_QUERIES = 500

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS photos (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,          -- relative to meta.photo_root, '/'-separated
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    label TEXT,                         -- the photo's folder name (NULL at the root)
    embedding BLOB NOT NULL,            -- float32, meta.dim values
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS photos_label ON photos(label);
CREATE TABLE IF NOT EXISTS skipped (
    path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
    reason TEXT NOT NULL
);
"""

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

    @property
    def photos_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["photos_per_s"] = self.photos_per_s
        return d


# ----------------------------------------------------------------------------- database
def connect(index_dir: str | Path, create: bool = False) -> sqlite3.Connection:
    """Open ``INDEX_DIR/index.sqlite`` (WAL mode: readers never block the writer)."""
    db = Path(index_dir) / DB_NAME
    if not create and not db.is_file():
        raise SearchError(f"{str(index_dir)!r} is not a zsbir index (no {DB_NAME}); "
                          "make one with `zsbir index build RUN_DIR PHOTO_DIR INDEX_DIR`")
    try:
        con = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        if create:
            con.executescript(SCHEMA)
    except sqlite3.DatabaseError as exc:
        raise SearchError(f"cannot read index database {str(db)!r}: {exc}") from exc
    return con


def read_meta(con: sqlite3.Connection) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}


def _set_meta(con: sqlite3.Connection, **items: Any) -> None:
    con.executemany("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
                    "SET value = excluded.value", [(k, json.dumps(v)) for k, v in items.items()])


@contextlib.contextmanager
def _transaction(con: sqlite3.Connection) -> Iterator[None]:
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _scan(root: Path) -> dict[str, os.stat_result]:
    """Image files under ``root`` (recursively, hidden entries left out): rel path -> stat."""
    found: dict[str, os.stat_result] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            p = Path(dirpath) / name
            with contextlib.suppress(OSError):
                found[p.relative_to(root).as_posix()] = p.stat()
    return found


def _label(rel: str) -> str | None:
    parent = Path(rel).parent
    return None if parent == Path(".") else parent.name


# ------------------------------------------------------------------------- build/update
def build_index(run_dir: str | Path, photo_dir: str | Path, index_dir: str | Path, *,
                hasher: str | None = None, ann: Literal["flat", "ivf"] = "flat",
                name: str | None = None, device: str = "auto", batch_size: int = 64,
                workers: int = -1, shard: tuple[int, int] | None = None) -> BuildSummary:
    """Create ``index_dir`` for the photos under ``photo_dir`` with the run's final weights.

    Run again on an unfinished index of the same run and folder, it resumes (as
    :func:`update_index`); any other existing index is refused. ``shard = (i, n)``: only
    shard ``i`` of ``n`` of the sorted photo list, for :func:`merge_indexes`.
    """
    run_dir, photo_dir, index_dir = Path(run_dir), Path(photo_dir), Path(index_dir)
    final = run_dir if run_dir.is_file() else run_dir / "checkpoints" / "final.pt"
    if not final.is_file():
        raise SearchError(f"{str(run_dir)!r} has no checkpoints/final.pt: only a finished "
                          "`zsbir run` can index photos")
    if not photo_dir.is_dir():
        raise SearchError(f"no photo folder {str(photo_dir)!r}")
    if ann not in ("flat", "ivf"):
        raise SearchError(f"ann must be 'flat' or 'ivf', not {ann!r}")
    model_sha = _sha256(final)
    if (index_dir / DB_NAME).is_file():
        meta = read_meta(connect(index_dir))
        same = (meta.get("photo_root") == str(photo_dir.resolve())
                and meta.get("model_sha256") == model_sha)
        if not same:
            raise SearchError(
                f"{str(index_dir)!r} already holds an index (of {meta.get('photo_root')!r}); "
                "update it with `zsbir index update`, or build into another directory")
        summary = update_index(index_dir, device=device, batch_size=batch_size,
                               workers=workers)
        summary.resumed = True
        return summary
    if index_dir.exists() and any(index_dir.iterdir()):
        raise SearchError(f"{str(index_dir)!r} exists and is not an empty folder or a zsbir "
                          "index; choose a new directory")
    index_dir.mkdir(parents=True, exist_ok=True)
    with WriteLock(index_dir) as lock:
        tmp = index_dir / (MODEL_NAME + ".tmp")
        shutil.copyfile(final, tmp)
        os.replace(tmp, index_dir / MODEL_NAME)
        tm = _load_model(index_dir, device)
        h = tm.hasher(hasher)
        con = connect(index_dir, create=True)
        with _transaction(con):
            _set_meta(con, format_version=FORMAT_VERSION,
                      name=name or index_dir.resolve().name,
                      photo_root=str(photo_dir.resolve()), model_file=MODEL_NAME,
                      model_sha256=model_sha, run_dir=str(run_dir.resolve()),
                      hasher=h.tag, binary=bool(h.binary), ann=ann,
                      created=time.time(), generation=0, faiss_generation=-1,
                      shard=list(shard) if shard else None)
        summary = _sync(con, index_dir, tm, batch_size, workers)
        summary.stale_lock = lock.broke_stale
        return summary


def update_index(index_dir: str | Path, *, device: str = "auto", batch_size: int = 64,
                 workers: int = -1) -> BuildSummary:
    """Embed new and changed photos, drop deleted ones, rewrite the faiss index."""
    index_dir = Path(index_dir)
    con = connect(index_dir)
    with WriteLock(index_dir) as lock:
        root = Path(read_meta(con)["photo_root"])
        if not root.is_dir():
            raise SearchError(f"the index's photo folder {str(root)!r} is gone")
        tm = _load_model(index_dir, device)
        summary = _sync(con, index_dir, tm, batch_size, workers)
        summary.stale_lock = lock.broke_stale
        return summary


def _load_model(index_dir: Path, device: str) -> Any:
    from zsbir.engine.index import load_trained

    return load_trained(index_dir / MODEL_NAME, device)


def _sync(con: sqlite3.Connection, index_dir: Path, tm: Any, batch_size: int,
          workers: int) -> BuildSummary:
    start = time.perf_counter()
    meta = read_meta(con)
    root = Path(meta["photo_root"])
    summary = BuildSummary(ann=meta["ann"])
    found = _scan(root)
    if meta.get("shard"):  # a shard index holds its block of the sorted photo list
        from zsbir.engine.distributed import partition_files

        mine = set(partition_files(list(found), *meta["shard"]))
        found = {rel: st for rel, st in found.items() if rel in mine}
    rows = {p: (size, mtime, sha) for p, size, mtime, sha in
            con.execute("SELECT path, size, mtime_ns, sha256 FROM photos")}
    old_skips = {p: (size, mtime, reason) for p, size, mtime, reason in
                 con.execute("SELECT path, size, mtime_ns, reason FROM skipped")}
    gone = [p for p in rows if p not in found]
    gone_skips = [p for p in old_skips if p not in found]
    if gone or gone_skips:
        with _transaction(con):
            con.executemany("DELETE FROM photos WHERE path = ?", [(p,) for p in gone])
            con.executemany("DELETE FROM skipped WHERE path = ?", [(p,) for p in gone_skips])
            _set_meta(con, generation=meta["generation"] + 1)
        meta["generation"] += 1
    summary.removed = len(gone)

    todo: list[str] = []
    touched: list[tuple[int, int, str]] = []
    for rel, st in sorted(found.items()):
        if rel in rows:
            size, mtime, sha = rows[rel]
            if (size, mtime) == (st.st_size, st.st_mtime_ns):
                summary.unchanged += 1
            elif _sha256(root / rel) == sha:  # touched, same content
                summary.unchanged += 1
                touched.append((st.st_size, st.st_mtime_ns, rel))
            else:
                summary.changed += 1
                todo.append(rel)
        elif rel in old_skips and old_skips[rel][:2] == (st.st_size, st.st_mtime_ns):
            summary.skipped.append((str(root / rel), old_skips[rel][2]))
        else:
            summary.new += 1
            todo.append(rel)
    if touched:
        with _transaction(con):
            con.executemany("UPDATE photos SET size = ?, mtime_ns = ? WHERE path = ?", touched)

    with phase("embedding photos", total=len(todo), unit="photos") as advance:
        for done, (kept, emb, skipped) in _embed_batches(tm, root, todo, batch_size, workers):
            _commit_batch(con, meta, root, found, kept, emb, skipped)
            summary.embedded += len(kept)
            summary.skipped += [(str(root / r), e) for r, e in skipped]
            advance(completed=done, info=f"{len(summary.skipped)} skipped")

    index, info = make_faiss(con, tm, meta)
    _write_faiss(index_dir, con, index, meta, info)
    summary.total = int(index.index.ntotal)
    summary.recall_at_10, summary.nprobe = info.get("recall_at_10"), info.get("nprobe")
    summary.seconds = time.perf_counter() - start
    return summary


def _commit_batch(con: sqlite3.Connection, meta: dict[str, Any], root: Path,
                  found: dict[str, os.stat_result], kept: list[str], emb: np.ndarray,
                  skipped: list[tuple[str, str]]) -> None:
    """One transaction: the batch's embeddings and skips, and a new generation."""
    records = []
    for rel, vec in zip(kept, emb):
        p = root / rel
        st = found[rel]
        records.append((rel, st.st_size, st.st_mtime_ns, _sha256(p), _label(rel),
                        np.ascontiguousarray(vec, dtype=np.float32).tobytes(), time.time()))
    with _transaction(con):
        con.executemany(
            "INSERT INTO photos(path, size, mtime_ns, sha256, label, embedding, indexed_at) "
            "VALUES(?, ?, ?, ?, ?, ?, ?) ON CONFLICT(path) DO UPDATE SET "
            "size = excluded.size, mtime_ns = excluded.mtime_ns, sha256 = excluded.sha256, "
            "label = excluded.label, embedding = excluded.embedding, "
            "indexed_at = excluded.indexed_at", records)
        # a file that became unreadable is no longer in the index
        con.executemany("DELETE FROM photos WHERE path = ?", [(r,) for r, _ in skipped])
        con.executemany(
            "INSERT INTO skipped(path, size, mtime_ns, reason) VALUES(?, ?, ?, ?) "
            "ON CONFLICT(path) DO UPDATE SET size = excluded.size, "
            "mtime_ns = excluded.mtime_ns, reason = excluded.reason",
            [(r, found[r].st_size, found[r].st_mtime_ns, e) for r, e in skipped])
        con.executemany("DELETE FROM skipped WHERE path = ?", [(r,) for r in kept])
        meta["generation"] += 1
        _set_meta(con, generation=meta["generation"], updated=time.time(),
                  dim=int(emb.shape[1]) if len(emb) else meta.get("dim"))


def _embed_batches(tm: Any, root: Path, todo: list[str], batch_size: int, workers: int
                   ) -> Iterator[tuple[int, tuple[list[str], np.ndarray, list[tuple[str, str]]]]]:
    """Embed ``todo`` through the training loader: (done count, (kept, emb, skipped))."""
    import torch

    from zsbir.data.base import PHOTO, Split, read_image_file
    from zsbir.data.loading import ImageDataset, make_loader, worker_count
    from zsbir.engine.threads import use_threads

    if not todo:
        return
    split = Split([str(root / r) for r in todo], np.zeros(len(todo), np.int64),
                  np.full(len(todo), PHOTO, np.int64))
    ds = ImageDataset(split, read_image_file, tm.transform, "skip")
    batches = [list(range(i, min(i + batch_size, len(todo))))
               for i in range(0, len(todo), batch_size)]
    device = tm.device
    use_threads("train", device, workers=workers)  # zsbir.engine.threads: loaders + model
    loader = make_loader(ds, batches, worker_count(workers, device),
                         pin_memory=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    prefix = len(str(root)) + 1
    done = 0
    for batch, keys in zip(loader, batches):
        done += len(keys)
        skipped = [(src[prefix:], err) for src, err in batch["skipped"]]
        if "image" not in batch:
            yield done, ([], np.zeros((0, 0), np.float32), skipped)
            continue
        with autocast:
            emb = np.asarray(tm.embed_batch(batch), dtype=np.float32)
        kept = [todo[i] for i in batch["index"].tolist()]
        yield done, (kept, emb, skipped)


def merge_indexes(shard_dirs: list[str | Path], index_dir: str | Path) -> BuildSummary:
    """Join shard indexes (``build_index(..., shard=(i, n))``) into a new index at
    ``index_dir``: their photo rows and stored embeddings are copied (nothing is embedded
    again) and one faiss index is built. Every shard 0..n-1 must be given once, all built
    with the same model file, hasher and search structure, else :class:`SearchError`."""
    start = time.perf_counter()
    index_dir = Path(index_dir)
    metas, dirs = {}, [Path(d) for d in shard_dirs]
    for d in dirs:
        if not (d / DB_NAME).is_file():
            raise SearchError(f"{str(d)!r} is not a zsbir index")
        meta = read_meta(connect(d))
        if not meta.get("shard"):
            raise SearchError(f"{str(d)!r} is not a shard index (built without --shard i/n)")
        if meta.get("faiss_generation") != meta.get("generation"):
            raise SearchError(f"{str(d)!r} is unfinished; finish it with "
                              "`zsbir index update` first")
        i, n = meta["shard"]
        if i in metas:
            raise SearchError(f"shard {i}/{n} given twice ({metas[i][0]} and {d})")
        metas[i] = (d, meta)
    first = metas[min(metas)][1]
    n = first["shard"][1]
    for i, (d, meta) in metas.items():
        for key in ("model_sha256", "hasher", "ann"):
            if meta.get(key) != first.get(key):
                raise SearchError(f"{str(d)!r} differs from the other shards in {key} "
                                  f"({meta.get(key)!r} vs {first.get(key)!r})")
        if meta["shard"][1] != n:
            raise SearchError(f"{str(d)!r} is shard {i}/{meta['shard'][1]}, others of {n}")
    missing = sorted(set(range(n)) - set(metas))
    if missing:
        raise SearchError("missing shard(s) " + ", ".join(f"{i}/{n}" for i in missing))
    if index_dir.exists() and any(index_dir.iterdir()):
        raise SearchError(f"{str(index_dir)!r} exists and is not an empty folder")
    index_dir.mkdir(parents=True, exist_ok=True)
    summary = BuildSummary(ann=first["ann"])
    with WriteLock(index_dir):
        shutil.copyfile(metas[0][0] / MODEL_NAME, index_dir / (MODEL_NAME + ".tmp"))
        os.replace(index_dir / (MODEL_NAME + ".tmp"), index_dir / MODEL_NAME)
        con = connect(index_dir, create=True)
        with _transaction(con):
            keep = {k: v for k, v in first.items() if k not in ("shard", "count", "nprobe",
                                                                  "nlist", "recall_at_10",
                                                                  "recall_queries")}
            _set_meta(con, **{**keep, "name": index_dir.resolve().name, "generation": 1,
                              "faiss_generation": -1, "created": time.time(),
                              "merged_from": [str(metas[i][0]) for i in range(n)]})
            for i in range(n):
                src = sqlite3.connect(metas[i][0] / DB_NAME)
                try:
                    _copy_rows(src, con)
                except sqlite3.IntegrityError as exc:
                    raise SearchError(f"a photo is in two shards ({exc}): the folder changed "
                                      "between the shard builds; build them again") from exc
                finally:
                    src.close()
        meta = read_meta(con)
        tm = _load_model(index_dir, "cpu")
        fx, info = make_faiss(con, tm, meta)
        _write_faiss(index_dir, con, fx, meta, info)
    summary.total = int(fx.index.ntotal)
    summary.unchanged = summary.total
    summary.recall_at_10, summary.nprobe = info.get("recall_at_10"), info.get("nprobe")
    summary.seconds = time.perf_counter() - start
    return summary


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
    paths: list[str]                  # relative paths
    labels: list[str | None]
    binary: bool
    generation: int


def _load_rows(con: sqlite3.Connection) -> tuple[np.ndarray, list[str], list[str | None],
                                                  np.ndarray]:
    ids, paths, labels, vecs = [], [], [], []
    for i, p, lab, blob in con.execute(
            "SELECT id, path, label, embedding FROM photos ORDER BY path"):
        ids.append(i)
        paths.append(p)
        labels.append(lab)
        vecs.append(np.frombuffer(blob, dtype=np.float32))
    emb = np.stack(vecs) if vecs else np.zeros((0, 1), np.float32)
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

    ids, paths, labels, emb = _load_rows(con)
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
                 meta: dict[str, Any], info: dict[str, Any]) -> None:
    import faiss

    tmp = index_dir / (FAISS_NAME + ".tmp")
    (faiss.write_index_binary if fx.binary else faiss.write_index)(fx.index, str(tmp))
    os.replace(tmp, index_dir / FAISS_NAME)
    with _transaction(con):
        _set_meta(con, faiss_generation=fx.generation, count=int(fx.index.ntotal), **info)


def load_faiss(index_dir: Path, con: sqlite3.Connection, tm: Any) -> FaissIndex:
    """The saved faiss index when it reflects the database, else one rebuilt in memory."""
    import faiss

    meta = read_meta(con)
    path = index_dir / FAISS_NAME
    if meta.get("faiss_generation") != meta["generation"] or not path.is_file():
        fx, info = make_faiss(con, tm, meta)  # an interrupted build/update: last commit
        return fx
    try:
        index = (faiss.read_index_binary if meta["binary"] else faiss.read_index)(str(path))
    except RuntimeError as exc:
        raise SearchError(f"cannot read {str(path)!r}: {exc}") from exc
    ids, paths, labels = [], [], []
    for i, p, lab in con.execute("SELECT id, path, label FROM photos ORDER BY path"):
        ids.append(i)
        paths.append(p)
        labels.append(lab)
    if index.ntotal != len(ids):  # a writer committed between the two reads
        fx, _ = make_faiss(con, tm, read_meta(con))
        return fx
    if meta.get("nprobe"):
        index.nprobe = int(meta["nprobe"])
    return FaissIndex(index, np.asarray(ids, np.int64), paths, labels, bool(meta["binary"]),
                      meta["generation"])


def gallery_embeddings(con: sqlite3.Connection, ids: np.ndarray) -> np.ndarray:
    """Stored float32 embeddings of the photos ``ids`` (in that order)."""
    out = []
    for chunk in range(0, len(ids), 900):
        part = [int(i) for i in ids[chunk:chunk + 900]]
        got = dict(con.execute(f"SELECT id, embedding FROM photos WHERE id IN "
                               f"({','.join('?' * len(part))})", part))
        out += [np.frombuffer(got[i], np.float32) for i in part]
    return np.stack(out) if out else np.zeros((0, 1), np.float32)
