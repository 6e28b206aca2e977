"""Search an index directory from Python: ``zsbir.Index.open(path).search(sketch)``.

>>> idx = zsbir.Index.open("my-photos.index")          # doctest: +SKIP
>>> idx.search("cat.png", top=5)                        # doctest: +SKIP
[SearchResult(id=12, path='/photos/cat/1.jpg', score=0.81, label='cat', rank=1), ...]

A query is a sketch image (a path, a ``PIL.Image``, or ``bytes`` of a PNG/JPEG file) or
vector strokes (QuickDraw's ``drawing`` field, rendered by :mod:`zsbir.search.strokes`).
Scores are cosine similarities (descending) for real-valued indexes and Hamming distances
(ascending) for binary ones (:attr:`Index.score_name`). Ties are ordered by photo path, so
a result never depends on the order photos were added in. The index's backend
(:mod:`zsbir.search.backends`: faiss in the directory, or a Milvus collection) searches;
the class filter runs inside the engine where it has one (Milvus). The model file is
checked when the index is opened (its SHA-256 against the one the photos were embedded
with), so a query is never embedded with another model.

An open index follows its directory: when ``zsbir index update`` (or a resumed build) has
committed since it was read (the database's ``generation``), the photo table and search
structure are reloaded before the next search, so filters and results see the current
photos. A sketch image's size is checked against ``max_sketch_pixels`` before it is
decoded (:mod:`zsbir.search.limits`); :meth:`Index.read_photo` returns a photo's bytes only
as they were indexed (:mod:`zsbir.search.photos`).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.search.backends import backend_of, search_loaded
from zsbir.search.errors import SearchError
from zsbir.search.faiss_index import encode
from zsbir.search.files import MODEL_NAME, connect, file_sha256, read_meta
from zsbir.search.limits import DEFAULT_SKETCH_PIXELS, ImageTooLarge, NotAnImage, open_image
from zsbir.search.photos import (
    DEFAULT_PHOTO_BYTES,
    PhotoGone,
    PhotoRecord,
    VerifiedPhoto,
    read_indexed,
)
from zsbir.search.rows import RowsGone, gallery_embeddings
from zsbir.search.scan import fs_name

__all__ = ["Index", "SearchResult"]


@dataclass(frozen=True)
class SearchResult:
    """One ranked photo: its id in the index, absolute path, score and folder label."""

    id: int
    path: str
    score: float
    label: str | None
    rank: int
    #: the pair scorer's score when the result was re-scored (``pair_scorer=``), else None
    pair_score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data; ``pair_score`` only when the result was re-scored."""
        out = asdict(self)
        if out["pair_score"] is None:
            del out["pair_score"]
        return out


class _Stale(Exception):
    """The database lost photos the in-memory index holds (a writer committed meanwhile)."""


class Index:
    """An open index directory: the model, the faiss index and the photo table in memory.

    ``max_sketch_pixels``: the largest sketch image decoded (width x height, checked from
    its header). Thread-safe: searches share one lock, photo look-ups a database lock.
    """

    #: while a writer is mid-way, reload its committed rows at most this often (seconds)
    reload_interval_s = 10.0

    def __init__(self, path: str | Path, device: str = "auto",
                 max_sketch_pixels: int = DEFAULT_SKETCH_PIXELS):
        from zsbir.engine.index import load_trained

        self.path = Path(path)
        self.max_sketch_pixels = int(max_sketch_pixels)
        self._con = connect(self.path)
        self._db = threading.Lock()  # the sqlite connection, shared by threads
        self.meta = read_meta(self._con)
        model_file = self.path / self.meta.get("model_file", MODEL_NAME)
        if not model_file.is_file():
            raise SearchError(f"index {str(self.path)!r} lacks its model ({model_file.name})")
        if self.meta.get("model_sha256") and file_sha256(model_file) != self.meta[
                "model_sha256"]:
            raise SearchError(f"{model_file.name} in {str(self.path)!r} is not the model the "
                              "photos were embedded with (another SHA-256): queries embedded "
                              "with it are refused; run the `zsbir index build` command "
                              "that made the index again")
        self.model = load_trained(model_file, device)
        self.hasher = self.model.hasher(self.meta["hasher"])
        self.binary = bool(self.meta["binary"])
        self.root = Path(self.meta["photo_root"])
        self._backend = backend_of(self.meta)
        self._fx = self._backend.load(self.path, self._con, self.model)
        self._loaded_at = time.monotonic()
        self._lock = threading.Lock()
        self._rerankers: dict[str, Any] = {}
        self._pair_scorers: dict[str, Any] = {}

    @classmethod
    def open(cls, path: str | Path, device: str = "auto",
             max_sketch_pixels: int = DEFAULT_SKETCH_PIXELS) -> Index:
        """Load an index made by ``zsbir index build`` (searching needs nothing else)."""
        return cls(path, device, max_sketch_pixels)

    # ---------------------------------------------------------------------- freshness
    @property
    def generation(self) -> int:
        """The database generation the in-memory photo table reflects."""
        return int(self._fx.generation)

    def refresh(self, force: bool = False) -> bool:
        """Reload the photo table and search structure when the database changed since they
        were read (``True`` when reloaded). While a writer is mid-way (its faiss file not
        written yet), its committed rows are loaded at most every :attr:`reload_interval_s`
        seconds (unless ``force``); a finished update is picked up at once."""
        with self._lock:
            return self._refresh(force)

    def _refresh(self, force: bool) -> bool:
        with self._db:
            meta = read_meta(self._con)
        gen = meta.get("generation")
        if gen == self._fx.generation and not force:
            return False
        writing = meta.get("faiss_generation") != gen
        if (writing and not force
                and time.monotonic() - self._loaded_at < self.reload_interval_s):
            return False
        with self._db:
            fx = self._backend.load(self.path, self._con, self.model)
            self.meta = read_meta(self._con)
        self.root = Path(self.meta["photo_root"])
        self._fx, self._loaded_at = fx, time.monotonic()
        return True

    # ------------------------------------------------------------------ description
    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.name))

    @property
    def score_name(self) -> str:
        return "Hamming distance" if self.binary else "cosine similarity"

    @property
    def labels(self) -> list[str]:
        return sorted({lab for lab in self._fx.labels if lab is not None})

    def __len__(self) -> int:
        return len(self._fx.ids)

    def describe(self) -> dict[str, Any]:
        """Plain data for people: name, size, model, hasher, score, search structure."""
        m = self.model.manifest
        run = getattr(getattr(m, "run", None), "name", None) or Path(
            self.meta.get("run_dir", "?")).name
        backbone = (getattr(m, "backbone", None) or {}).get("name", "?")
        return {"name": self.name, "size": len(self), "model": f"{run} ({backbone})",
                "hasher": self.meta["hasher"], "score": self.score_name,
                "ann": self.meta["ann"], "labels": self.labels,
                "backend": self._backend.name,
                "recall_at_10": self.meta.get("recall_at_10")}

    def photo_record(self, photo_id: int) -> PhotoRecord | None:
        """An indexed photo's current row (``None`` for an id the index does not hold)."""
        photo_id = int(photo_id)
        if not 0 <= photo_id < 2**63:
            return None
        with self._db:
            row = self._con.execute("SELECT id, path, size, sha256, label FROM photos "
                                    "WHERE id = ?", (photo_id,)).fetchone()
        if row is None:
            return None
        rid, path, size, sha, label = row  # names not valid UTF-8 are stored as BLOBs
        return PhotoRecord(rid, fs_name(path), size, sha, fs_name(label))

    def photo(self, photo_id: int) -> Path | None:
        """The file of an indexed photo (``None`` for an id the index does not hold)."""
        rec = self.photo_record(photo_id)
        return None if rec is None else self.root / rec.path

    def read_photo(self, photo_id: int, max_bytes: int = DEFAULT_PHOTO_BYTES
                   ) -> VerifiedPhoto:
        """A photo's bytes exactly as indexed (inside the photo folder, same size and
        SHA-256, an accepted image format), else a :class:`zsbir.search.photos.PhotoError`."""
        rec = self.photo_record(photo_id)
        if rec is None:
            raise PhotoGone(f"no photo {photo_id} in the index")
        return read_indexed(self.root, rec, max_bytes,
                            allow_outside=bool(self.meta.get("follow_outside_links")))

    # ----------------------------------------------------------------------- search
    def query_image(self, query: Any) -> Any:
        """A sketch as a PIL image (see the module docstring for the accepted forms)."""
        from PIL import Image

        from zsbir.search.strokes import render_strokes

        if isinstance(query, Image.Image):
            return query.convert("RGB")
        if isinstance(query, list):
            return render_strokes(query)
        upload = isinstance(query, (bytes, bytearray))
        what = "the uploaded sketch" if upload else f"sketch {str(query)!r}"
        try:
            if upload or isinstance(query, (str, Path)):
                with open_image(query, self.max_sketch_pixels, what) as im:
                    im.load()
                    return _flatten(im)
        except FileNotFoundError as exc:
            raise SearchError(f"no sketch file {str(query)!r}") from exc
        except ImageTooLarge:
            raise
        except NotAnImage as exc:
            if upload:
                raise
            raise SearchError(f"cannot read {what} as an image: not a PNG, JPEG, GIF, BMP or "
                              "WebP file") from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(query, (bytes, bytearray)):
                raise SearchError("the uploaded sketch is not an image PIL can read (PNG, "
                                  f"JPEG, ...): {type(exc).__name__}") from exc
            raise SearchError(f"cannot read sketch {str(query)!r} as an image: {exc}") from exc
        raise SearchError(f"a query is an image, a path, bytes or strokes, not "
                          f"{type(query).__name__}")

    def search(self, query: Any, top: int = 10, label: str | None = None,
               rerank: str | None = None, pair_scorer: str | None = None,
               top_k: int | None = None) -> list[SearchResult]:
        """The ``top`` photos for one sketch (image, path, bytes or strokes).

        ``pair_scorer``: re-score the top ``top_k`` of the ranking with that registered
        pair scorer (``""``: the run's ``[pair_scorer]``) from the photos' stored outputs
        (:meth:`pair_scorer`); ``top_k`` alone: the run's scorer."""
        return self.search_many([query], top, label, rerank, pair_scorer, top_k)[0]

    def search_many(self, queries: list[Any], top: int = 10, label: str | None = None,
                    rerank: str | None = None, pair_scorer: str | None = None,
                    top_k: int | None = None) -> list[list[SearchResult]]:
        """:meth:`search` for several sketches at once (one batch through the model)."""
        from zsbir.data.base import SKETCH

        if isinstance(top, bool) or not isinstance(top, int) or top < 1:
            raise SearchError(f"top must be a positive integer, got {top!r}")
        pair = None
        if pair_scorer is not None or top_k is not None:
            if rerank is not None:
                raise SearchError("re-scoring pairs and --rerank are separate re-rankings: "
                                  "use one of them")
            pair = (self.pair_scorer(pair_scorer or None), self._top_k(top_k))
        self.refresh()
        self._check_label(label)
        images = [self.query_image(q) for q in queries]
        reads = tuple(getattr(self._reranker(rerank), "outputs", ())) if rerank else ()
        names = ("embedding", *(pair[0].outputs if pair else ()), *reads)
        with self._lock:
            got = self.model.forward_images(images, SKETCH, names)  # one pass, every output
            emb = got.pop("embedding")
            for attempt in range(3):  # a writer may commit between reading and searching
                self._refresh(force=attempt > 0)
                self._check_label(label)
                try:
                    if pair is not None:
                        return self._pair_scored(emb, got, top, label, *pair)
                    return self._search_embedded(emb, top, label, rerank, got)
                except _Stale:
                    continue
        raise SearchError("the index changed three times during one search (an update is "
                          "running); search again")

    # ------------------------------------------------------------------ stored outputs
    @property
    def output_names(self) -> tuple[str, ...]:
        """The per-photo model outputs the index stores besides the embedding
        (:mod:`zsbir.search.outputs`; ``zsbir index build --outputs``)."""
        return tuple(self.meta.get("output_names") or ())

    def outputs(self, name: str, photo_ids: Any) -> np.ndarray:
        """The stored output ``name`` of the photos ``photo_ids`` (in that order), float32
        (N, ...); a SearchError for an output the index does not store or a photo it does
        not hold."""
        if name not in self.output_names:
            raise SearchError(self._no_output(name))
        ids = np.asarray(photo_ids, dtype=np.int64).ravel()
        try:
            return self._stored(name, ids)
        except _Stale as exc:
            raise SearchError(f"no photo {exc.args[0]} in the index") from None

    def query_outputs(self, queries: list[Any], names: Any = ()) -> dict[str, np.ndarray]:
        """The model's outputs ``names`` (and ``"embedding"``) for sketches, from one pass
        through the model: what pair scorers compare with :meth:`outputs`."""
        from zsbir.data.base import SKETCH

        images = [self.query_image(q) for q in queries]
        with self._lock:
            return self.model.forward_images(images, SKETCH, ("embedding", *names))

    def _stored(self, name: str, ids: np.ndarray) -> np.ndarray:
        """Stored outputs in one snapshot; :class:`_Stale` (with the id) for a photo no
        longer in the database, damaged for a photo without the output."""
        from zsbir.search.files import damaged
        from zsbir.search.outputs import read_outputs

        with self._db:
            self._con.execute("BEGIN")
            try:
                out, missing = read_outputs(self._con, self.meta, name, ids)
                if missing:
                    held = self._con.execute("SELECT path FROM photos WHERE id = ?",
                                             (missing[0],)).fetchone()
                    if held is None:
                        raise _Stale(missing[0])
                    raise damaged(self.path, f"photo {fs_name(held[0])!r} has no stored "
                                             f"{name!r} output")
                return out
            finally:
                self._con.execute("COMMIT")

    def _no_output(self, name: str) -> str:
        held = ", ".join(map(repr, self.output_names)) or "none"
        return (f"index {str(self.path)!r} stores no {name!r} output per photo (it stores: "
                f"{held}); build one that does: `zsbir index build RUN_DIR PHOTO_DIR "
                f"NEW_INDEX --outputs {name}`")

    # --------------------------------------------------------------------- pair scoring
    def pair_scorer(self, name: str | None = None) -> Any:
        """The pair scorer ``name`` around the index's model (``None``: the run's
        ``[pair_scorer]`` with its parameters; another name: its defaults), checked to read
        only outputs the index stores (else a SearchError naming them)."""
        run_table = getattr(self.model.manifest, "pair_scorer", None)
        key = name or (run_table or {}).get("name")
        if key is None:
            raise SearchError("the index's run has no [pair_scorer]: name one "
                              "(`zsbir list pair_scorers`)")
        if key not in self._pair_scorers:
            if run_table is not None and run_table["name"] == key:
                scorer = self.model.pair_scorer
            else:
                scorer = _make_pair_scorer(key, self.model)
            missing = [n for n in scorer.outputs if n not in self.output_names]
            if missing:
                raise SearchError(f"pair scorer {key!r} reads the output {missing[0]!r}: "
                                  + self._no_output(missing[0]))
            self._pair_scorers[key] = scorer
        return self._pair_scorers[key]

    def _top_k(self, top_k: int | None) -> int:
        if top_k is None:
            run_k = int((getattr(self.model.manifest, "pair_scorer", None) or {}).get(
                "top_k", 0))
            return run_k or 100
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise SearchError(f"top_k must be a positive integer, got {top_k!r}")
        return top_k

    def _pair_scored(self, emb: np.ndarray, q_out: dict[str, np.ndarray], top: int,
                     label: str | None, scorer: Any, k: int) -> list[list[SearchResult]]:
        """Each query's top ``k`` re-scored by ``scorer`` from the stored outputs and
        re-ordered by it (ties by path), the rest below in embedding order."""
        from zsbir.pairs import PairBatcher, rescore_order

        codes = encode(self.hasher, emb)
        n = max(top, k)
        values, positions = self._ranking(codes, n, label)
        table = getattr(self.model.manifest, "pair_scorer", None) or {}
        out = []
        for i, (v, p) in enumerate(zip(values, positions)):
            p = np.asarray(p, np.int64)
            kk = min(k, len(p))
            stored = {name: self._stored(name, self._fx.ids[p[:kk]]) for name in scorer.outputs}
            query = {name: q_out[name][i:i + 1] for name in scorer.outputs}
            try:
                batcher = PairBatcher(scorer, query, stored, table.get("batch_pairs", 256),
                                      self.model.device)
                pair = batcher.score(np.zeros(kk, np.int64), np.arange(kk))
            except ValueError as exc:  # e.g. non-finite scores of float16-stored outputs
                raise SearchError(f"pair scorer {getattr(scorer, 'tag', '?')!r}: {exc}"
                                  ) from exc
            order, ordered = rescore_order(p[None, :kk], pair[None])
            value = dict(zip(p.tolist(), np.asarray(v).tolist()))
            final = [*order[0].tolist(), *p[kk:].tolist()][:top]
            recs = self._records(np.array([value[q] for q in final]), np.array(final))
            out.append([dataclasses.replace(r, pair_score=float(ordered[0][j]))
                        if j < kk else r for j, r in enumerate(recs)])
        return out

    def _check_label(self, label: str | None) -> None:
        if label is not None and label not in set(self._fx.labels):
            known = ", ".join(self.labels[:20]) or "none: the photos sit in one folder"
            raise SearchError(f"no photos labelled {label!r} in the index (labels: {known})")

    def _search_embedded(self, emb: np.ndarray, top: int, label: str | None,
                         rerank: str | None, outputs: dict[str, np.ndarray] | None = None
                         ) -> list[list[SearchResult]]:
        if rerank is not None:
            return self._reranked(emb, top, label, rerank, outputs or {})
        codes = encode(self.hasher, emb)
        values, positions = self._ranking(codes, top, label)
        return [self._records(v, p) for v, p in zip(values, positions)]

    def _ranking(self, codes: np.ndarray, top: int, label: str | None
                 ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions) of each query's top ``top`` photos (of ``label`` only, when
        given) from the index's backend (:func:`zsbir.search.backends.search_loaded`)."""
        return search_loaded(self._fx, codes, top, label,
                             lambda pos: encode(self.hasher, self._embeddings(self._fx.ids[pos])))

    def _records(self, values: np.ndarray, positions: np.ndarray) -> list[SearchResult]:
        fx = self._fx
        return [SearchResult(int(fx.ids[p]), str(self.root / fx.paths[p]),
                             int(v) if self.binary else float(v), fx.labels[p], r + 1)
                for r, (v, p) in enumerate(zip(values, positions))]

    def _reranker(self, spec: str) -> Any:
        """The reranker of ``--rerank`` ``spec`` (:func:`zsbir.search.rerank.make_reranker`:
        the run's own table of that name by default), kept once built (a fitted reranker is
        reused); one that reads outputs the index does not store is refused."""
        from zsbir.search.rerank import make_reranker

        if self.binary:
            raise SearchError("--rerank needs a real-valued index (this one holds "
                              f"{self.meta['hasher']} binary codes)")
        if spec not in self._rerankers:
            tables = (self.meta.get("rerankers")  # the run's, with zsbir tune's values
                      or getattr(self.model.manifest, "rerankers", None) or ())
            r = make_reranker(spec, tables)
            missing = [n for n in getattr(r, "outputs", ()) if n not in self.output_names]
            if missing:
                raise SearchError(f"reranker {r.tag!r} reads the photos' {missing[0]!r}: "
                                  + self._no_output(missing[0]))
            self._rerankers[spec] = r
        return self._rerankers[spec]

    def _reranked(self, emb: np.ndarray, top: int, label: str | None, spec: str,
                  query_outputs: dict[str, np.ndarray]) -> list[list[SearchResult]]:
        from zsbir.search.rerank import rerank_search

        r = self._reranker(spec)
        positions = (np.arange(len(self)) if label is None else
                     np.flatnonzero(np.array([lab == label for lab in self._fx.labels])))
        reads = tuple(getattr(r, "outputs", ()))
        gallery_outputs = {n: self._stored(n, self._fx.ids[positions]) for n in reads}
        values, idx = rerank_search(r, emb, self._gallery(positions), top,
                                    {n: query_outputs[n] for n in reads}, gallery_outputs)
        return [self._records(v, positions[i]) for v, i in zip(values, idx)]

    def _gallery(self, positions: np.ndarray) -> np.ndarray:
        """Unit-norm gallery vectors: reconstructed from a flat index, else read back."""
        index = self._fx.index
        if self._fx.index is not None and self.meta["ann"] == "flat" and \
                len(positions) == len(self):
            return index.reconstruct_n(0, index.ntotal)
        return encode(self.hasher, self._embeddings(self._fx.ids[positions]))

    def _embeddings(self, ids: np.ndarray) -> np.ndarray:
        """Stored float32 embeddings of the photos ``ids`` (in that order), read in one
        snapshot; :class:`_Stale` when one of them is no longer in the database."""
        with self._db:
            self._con.execute("BEGIN")
            try:
                return gallery_embeddings(self._con, ids)  # checked: finite, right width
            except RowsGone as exc:
                raise _Stale from exc
            finally:
                self._con.execute("COMMIT")

    def close(self) -> None:
        self._con.close()
        close = getattr(self._backend, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Index({str(self.path)!r}, photos={len(self)}, hasher={self.meta['hasher']!r},"
                f" ann={self.meta['ann']!r})")


def _make_pair_scorer(name: str, tm: Any) -> Any:
    """The registered pair scorer ``name`` with default parameters around the trained
    model ``tm`` (resolved and built as a ``[pair_scorer]`` table is)."""
    from zsbir.pairs import make_pair_scorer

    try:
        return make_pair_scorer(name, tm.model, tm.device)
    except ValueError as exc:
        raise SearchError(str(exc)) from exc


def _flatten(im: Any) -> Any:
    """RGB on white: a transparent PNG (a canvas export) would otherwise turn black."""
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")
