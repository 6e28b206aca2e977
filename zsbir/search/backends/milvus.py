"""The ``milvus`` index backend: the searchable rows of a photo index in a Milvus collection
(``zsbir index build --backend milvus [--uri URI] [--collection NAME]``; the
``zsbir[milvus]`` extra: pymilvus, and milvus-lite for local files).

``URI`` is ``http(s)://HOST:19530`` (a Milvus standalone server or cluster; a token from
``--token`` or the environment variable ``ZSBIR_MILVUS_TOKEN``, never stored) or a local
path (milvus-lite; default: ``INDEX_DIR/milvus.db``, so the index directory stays
self-contained). The collection (default ``zsbir_<directory name>_<8 hex digits of its
absolute path>``) holds one row per photo:

==================  ==========================================================
``id``              INT64 primary key: the photo's id in ``index.sqlite``
``path``            VARCHAR: the path relative to the photo folder
``label``           VARCHAR (nullable): the class (the photo's folder name)
``sha256``          VARCHAR(64): SHA-256 of the very bytes that were embedded
``model_sha256``    VARCHAR(64): SHA-256 of the model file that embedded it
``vector``          the code: FLOAT_VECTOR (L2-normalized embedding, metric IP =
                    cosine) for real-valued hashers; for binary ones (ITQ, sign)
                    BINARY_VECTOR with metric HAMMING on a server, and on
                    milvus-lite (which has no BINARY_VECTOR) FLOAT_VECTOR of the
                    bits as +-1 with metric IP
==================  ==========================================================

On milvus-lite a binary code of ``b`` bits is stored as ``x`` in {-1, +1}^b; for two codes
``<x, y> = b - 2 H(x, y)`` (each agreeing bit adds 1, each differing bit -1), so ranking by
inner product descending *is* ranking by Hamming distance ascending, and the distance shown
is ``H = (b - <x, y>) / 2`` (exact: sums of +-1 are integers in float32 up to 2^24 bits).

**Where things live.** The index directory keeps its ``model.pt``, ``index.sqlite`` and
``write.lock`` (:mod:`zsbir.search.store`): SQLite remains the ledger of what was embedded
(size, mtime, SHA-256, embedding), so incremental updates and resuming work as with faiss.
The collection's description records the model's SHA-256, the hasher and the vector form;
a build into a collection of another model, hasher or vector form is refused, and
:class:`zsbir.Index` refuses to open an index whose ``model.pt`` or collection is not the
model the rows were embedded with.

**Writing, resuming.** Each committed batch of embeddings is upserted into the collection
right after its SQLite transaction (rows reach Milvus as they come; with ``--ray`` too). At
the end of a build, update or merge the collection is reconciled with the database: rows
missing or with another SHA-256 are upserted, ids the database no longer holds deleted; the
ANN index is (re)built, loaded, and for IVF_FLAT/HNSW its ``nprobe``/``ef`` is the smallest
power of two whose recall@10 against exact search (computed here with faiss on the same
codes, up to 500 photos as queries) reaches 0.95, printed and stored in ``meta``. A killed
build therefore resumes like a faiss one: SQLite says what was embedded; the reconcile
repairs a collection that missed the last upsert.

**Search.** The class filter is a Milvus filter expression (``label == "..."``), run inside
the engine. Results are ordered by score, ties by photo path, as the faiss backend orders
them (:func:`zsbir.search.backends.search_loaded`): Milvus is asked for ``2k`` results;
while the last returned value equals the ``k``-th (an unseen row may tie), it is asked for
twice as many (at most 16,384, Milvus's limit). A row the loaded photo table does not hold
(a writer mid-way on a server) is left out. ``ann``: ``flat`` (FLAT / BIN_FLAT: exact),
``ivf`` (IVF_FLAT / BIN_IVF_FLAT), ``hnsw`` (HNSW, real-valued codes only). After a kill
between a batch's SQLite commit and its upsert, the collection lacks that batch until the
resumed build (or an update) reconciles it.

milvus-lite allows one process per database file: while ``zsbir index update`` writes a
milvus-lite index, ``zsbir serve`` on it cannot open it (use a Milvus server for that).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zsbir.registry import index_backends
from zsbir.search.errors import SearchError

__all__ = ["LITE_NAME", "TOKEN_ENV", "MilvusBackend", "pm1_codes"]

TOKEN_ENV = "ZSBIR_MILVUS_TOKEN"
LITE_NAME = "milvus.db"
EXTRA = "--backend milvus needs the milvus extra: pip install 'zsbir[milvus]'"
MAX_LIMIT = 16384   # Milvus's largest topk
CHUNK = 1000        # rows per upsert/delete request
TARGET_RECALL = 0.95
RECALL_QUERIES = 500
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 200
SCHEMA_VERSION = 1
PROPERTY, INDEX_PROPERTY = "zsbir", "zsbir.index"  # collection properties (JSON)


def _milvus() -> Any:
    """pymilvus, imported on first use (the core never imports it); its own error logs
    (tracebacks on stderr) are silenced: failures become one-line SearchErrors."""
    try:
        import pymilvus
    except ImportError as exc:
        raise SearchError(EXTRA) from exc
    for name in ("pymilvus", "pymilvus.decorators", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


def create_index(client: Any, collection: str, index_params: Any, index_type: str) -> None:
    """``client.create_index``, safe against pymilvus's retry of a long build.

    A large index (HNSW on 1e6 vectors: over 10 minutes on milvus-lite, measured) is built
    inside the CreateIndex call; when the connection is reset meanwhile (milvus-lite's
    local server answers the client's keepalive pings with GOAWAY "too_many_pings",
    seen at 1e6), pymilvus retries the call, and the retry fails with "index already
    exists" although the index the first call asked for is there. An existing index of
    the asked type is therefore accepted (another type is still an error)."""
    pm = _milvus()
    try:
        client.create_index(collection, index_params)
    except pm.exceptions.MilvusException as exc:
        if "already exists" not in _one_line(exc):
            raise
        names = list(client.list_indexes(collection))
        got = {n: client.describe_index(collection, n) for n in names}
        mine = [n for n, d in got.items()
                if str(d.get("index_type")).upper() == str(index_type).upper()]
        if not mine:
            raise
        while True:  # a server may still be building it (milvus-lite answers when built)
            state = str(client.describe_index(collection, mine[0]).get("state", "Finished"))
            if state.lower() == "failed":
                raise
            if state.lower() not in ("inprogress", "unissued", "retry"):
                return
            time.sleep(1.0)


def is_lite(uri: str) -> bool:
    """A local file (milvus-lite), not ``http(s)://``, ``tcp://`` or ``unix:``."""
    return not re.match(r"^(https?|tcp|grpc|unix)://|^unix:", uri)


def pm1_codes(packed: np.ndarray) -> np.ndarray:
    """Packed binary codes (uint8, :func:`numpy.packbits` order) as float32 +-1 vectors:
    bit 1 -> +1, bit 0 -> -1, so ``<x, y> = bits - 2 * Hamming``."""
    bits = np.unpackbits(np.ascontiguousarray(packed, dtype=np.uint8), axis=1)
    return bits.astype(np.float32) * 2.0 - 1.0


def _text(name: str | None) -> str | None:
    """A file name (str with surrogates for undecodable bytes) as valid UTF-8 text for a
    VARCHAR field (undecodable bytes as ``\\xNN``); the SQLite row keeps the exact name."""
    if name is None:
        return None
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def default_collection(index_dir: Path) -> str:
    path = str(Path(index_dir).resolve())
    stem = re.sub(r"[^A-Za-z0-9_]", "_", Path(path).name)[:40] or "index"
    return f"zsbir_{stem}_{hashlib.sha256(path.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


@index_backends.register("milvus")
class MilvusBackend:
    """Photo rows in a Milvus collection: a server or cluster (``http://HOST:19530``) or
    milvus-lite (a local file; default ``INDEX_DIR/milvus.db``). See the module docstring.

    Args:
        uri: ``http(s)://HOST:PORT`` or a local path (``""``: ``INDEX_DIR/milvus.db``).
        token: a server's token (``user:password`` or an API key); default: the
            environment variable ``ZSBIR_MILVUS_TOKEN``. Never stored.
        collection: the collection name (``""``: derived from the index directory).
    """

    name = "milvus"
    ann_types = ("flat", "ivf", "hnsw")

    def __init__(self, uri: str = "", token: str = "", collection: str = ""):
        self.uri, self.collection = str(uri or ""), str(collection or "")
        self.token = token or os.environ.get(TOKEN_ENV, "")
        self._client: Any = None

    # ------------------------------------------------------------------ settings
    def settings(self, index_dir: Path, ann: str) -> dict[str, Any]:
        if ann not in self.ann_types:
            raise SearchError(f"--ann {ann}: the milvus backend offers "
                              f"{', '.join(self.ann_types)}")
        _milvus()  # the extra, checked before anything is written
        uri = self.uri or str(Path(index_dir).resolve() / LITE_NAME)
        if is_lite(uri):
            uri = str(Path(uri).expanduser().resolve())
        coll = self.collection or default_collection(index_dir)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,254}$", coll):
            raise SearchError(f"--collection {coll!r}: a Milvus collection name is letters, "
                              "digits and underscores, not starting with a digit")
        self.uri, self.collection = uri, coll
        return {"backend": self.name, "milvus_uri": uri, "milvus_collection": coll}

    def merged(self, index_dir: Path, ann: str) -> dict[str, Any]:
        """An index merged from shards of this backend: a new collection for
        ``index_dir`` on the shards' server (milvus-lite: in ``index_dir``)."""
        uri = "" if is_lite(self.uri) else self.uri
        return type(self)(uri=uri, token=self.token).settings(index_dir, ann)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> MilvusBackend:
        return cls(uri=meta["milvus_uri"], collection=meta["milvus_collection"])

    def describe(self, meta: dict[str, Any]) -> str:
        where = "milvus-lite " if is_lite(self.uri) else ""
        return f"milvus ({where}{self.uri}, collection {self.collection})"

    # -------------------------------------------------------------------- client
    def client(self) -> Any:
        if self._client is None:
            pm = _milvus()
            try:
                self._client = pm.MilvusClient(uri=self.uri, token=self.token)
            except Exception as exc:  # noqa: BLE001 - pymilvus raises several kinds
                hint = (" (milvus-lite opens a database in one process at a time: is "
                        "another zsbir command using it?)" if is_lite(self.uri) else "")
                raise SearchError(f"cannot connect to Milvus at {self.uri}{hint}: "
                                  f"{_one_line(exc)}") from exc
        return self._client

    def close(self) -> None:
        if self._client is not None:
            try:
                self._client.close()
            finally:
                self._client = None

    def _form(self, binary: bool) -> str:
        """``float`` (real codes), ``binary`` (BINARY_VECTOR, server) or ``pm1`` (lite)."""
        if not binary:
            return "float"
        return "pm1" if is_lite(self.uri) else "binary"

    def check_new(self, index_dir: Path, meta: dict[str, Any]) -> None:
        """Before a build: an existing collection of this name must be this index's (same
        model, hasher and vector form), else refused."""
        if is_lite(self.uri) and not Path(self.uri).exists():
            return  # a new milvus-lite database: nothing in it yet
        c = self.client()
        with _errors(self):
            if c.has_collection(self.collection):
                _check_described(self, meta, c.describe_collection(self.collection))

    # --------------------------------------------------------------------- write
    def writer(self, index_dir: Path, con: sqlite3.Connection, tm: Any,
               meta: dict[str, Any]) -> _MilvusWriter:
        return _MilvusWriter(self, index_dir, con, tm, meta)

    # ---------------------------------------------------------------------- read
    def load(self, index_dir: Path, con: sqlite3.Connection, tm: Any) -> MilvusIndex:
        from zsbir.search.files import read_meta
        from zsbir.search.scan import fs_name

        meta = read_meta(con)
        ids, paths, labels = [], [], []
        for i, p, lab in con.execute("SELECT id, path, label FROM photos ORDER BY path"):
            ids.append(i)
            paths.append(fs_name(p))
            labels.append(fs_name(lab))
        c = self.client()
        with _errors(self):
            if not c.has_collection(self.collection):
                if ids:
                    raise SearchError(
                        f"the index's Milvus collection {self.collection!r} is not at "
                        f"{self.uri}: run `zsbir index update` on the index directory to "
                        "write it again")
                width = 0  # no photo was ever embedded: every search finds nothing
                labels = []
            else:
                width = _check_described(self, meta, c.describe_collection(self.collection))
                c.load_collection(self.collection)
        binary = bool(meta["binary"])
        engine = _Engine(self, binary, self._form(binary), width,
                         meta.get("milvus_index", "FLAT"), dict(meta.get("milvus_search") or {}),
                         {int(i): p for p, i in enumerate(ids)}, labels)
        return MilvusIndex(np.asarray(ids, np.int64), paths, labels, binary,
                           meta["generation"], engine)


@dataclass
class MilvusIndex:
    """A loaded milvus index: the photos in path order, and the engine that searches."""

    ids: np.ndarray
    paths: list[str]
    labels: list[str | None]
    binary: bool
    generation: int
    engine: Any = field(repr=False)
    index: Any = None  # no faiss index


def _one_line(exc: BaseException) -> str:
    msg = getattr(exc, "message", None) or str(exc)
    return " ".join(str(msg).split())[:300]


class _errors:
    """pymilvus failures inside the block -> one-line SearchError naming the URI."""

    def __init__(self, backend: MilvusBackend):
        self.backend = backend

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: Any, exc: Any, tb: Any) -> bool:
        if exc is None or isinstance(exc, SearchError):
            return False
        pm = _milvus()
        if isinstance(exc, pm.exceptions.MilvusException):
            raise SearchError(f"Milvus at {self.backend.uri} (collection "
                              f"{self.backend.collection}): {_one_line(exc)}") from exc
        return False


def _description(meta: dict[str, Any], form: str, width: int) -> dict[str, Any]:
    return {"zsbir": SCHEMA_VERSION, "model_sha256": meta.get("model_sha256"),
            "hasher": meta.get("hasher"), "vector": form, "width": int(width)}


def _check_described(backend: MilvusBackend, meta: dict[str, Any], desc: dict[str, Any]
                     ) -> int:
    """Refuse a collection that is not this index's (another model, hasher, form); its
    vector width (bits for binary codes)."""
    try:
        got = json.loads((desc.get("properties") or {}).get(PROPERTY) or "")
    except (ValueError, TypeError):
        got = None
    if not isinstance(got, dict) or got.get("zsbir") != SCHEMA_VERSION:
        raise SearchError(f"Milvus collection {backend.collection!r} at {backend.uri} was not "
                          "made by zsbir: choose another --collection")
    if got.get("model_sha256") != meta.get("model_sha256"):
        raise SearchError(
            f"Milvus collection {backend.collection!r} holds embeddings of another model "
            f"(SHA-256 {str(got.get('model_sha256'))[:12]}..., this index's model is "
            f"{str(meta.get('model_sha256'))[:12]}...): queries embedded with this model are "
            "refused; choose another --collection")
    for key in ("hasher", "vector"):
        want = meta.get(key) if key == "hasher" else backend._form(bool(meta["binary"]))
        if got.get(key) != want:
            raise SearchError(f"Milvus collection {backend.collection!r} holds {key} "
                              f"{got.get(key)!r}, not {want!r}: choose another --collection")
    return int(got.get("width") or 0)


def _index_params(client: Any, form: str, ann: str, n: int) -> tuple[str, dict, dict]:
    """(index type, build params, first search params) for ``ann`` on ``n`` rows."""
    from zsbir.hashing.ann import default_nlist

    metric = "HAMMING" if form == "binary" else "IP"
    if ann == "flat":
        kind, params, search = ("BIN_FLAT" if form == "binary" else "FLAT"), {}, {}
    elif ann == "ivf":
        kind = "BIN_IVF_FLAT" if form == "binary" else "IVF_FLAT"
        params, search = {"nlist": default_nlist(max(n, 1))}, {"nprobe": 1}
    else:
        kind = "HNSW"
        params, search = {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}, {"ef": 16}
    ip = client.prepare_index_params()
    ip.add_index(field_name="vector", index_type=kind, metric_type=metric, params=params)
    return kind, {"index_params": ip, "metric": metric, "params": params}, search


class _MilvusWriter:
    """Rows into the collection: per committed batch (``committed``), reconciled and
    indexed at the end (``finish``)."""

    def __init__(self, backend: MilvusBackend, index_dir: Path, con: sqlite3.Connection,
                 tm: Any, meta: dict[str, Any]):
        self.b, self.index_dir, self.con, self.tm = backend, index_dir, con, tm
        self.meta = meta
        self.binary = bool(meta["binary"])
        self.form = backend._form(self.binary)
        self.hasher = tm.hasher(meta["hasher"])
        if is_lite(backend.uri):
            Path(backend.uri).parent.mkdir(parents=True, exist_ok=True)
        self.c = backend.client()
        self._ready = False

    def _codes(self, emb: np.ndarray) -> np.ndarray:
        from zsbir.search.faiss_index import encode

        codes = encode(self.hasher, emb)
        return pm1_codes(codes) if self.form == "pm1" else codes

    def _width(self, codes: np.ndarray) -> int:
        return int(codes.shape[1] * 8) if self.form == "binary" else int(codes.shape[1])

    def _ensure(self, width: int) -> None:
        """The collection exists (created with the schema and a FLAT index) and is ours."""
        if self._ready:
            return
        pm = _milvus()
        c, name = self.c, self.b.collection
        with _errors(self.b):
            if c.has_collection(name):
                _check_described(self.b, self.meta, c.describe_collection(name))
            else:
                s = c.create_schema(auto_id=False, enable_dynamic_field=False)
                dt = pm.DataType
                s.add_field("id", dt.INT64, is_primary=True)
                s.add_field("path", dt.VARCHAR, max_length=65535)
                s.add_field("label", dt.VARCHAR, max_length=4096, nullable=True)
                s.add_field("sha256", dt.VARCHAR, max_length=64)
                s.add_field("model_sha256", dt.VARCHAR, max_length=64)
                s.add_field("vector", dt.BINARY_VECTOR if self.form == "binary"
                            else dt.FLOAT_VECTOR, dim=width)
                kind, built, _ = _index_params(c, self.form, "flat", 0)
                # Strong: a search sees every upsert acknowledged before it (a server's
                # default, Bounded, may lag by seconds after a build or update)
                c.create_collection(name, schema=s, index_params=built["index_params"],
                                    consistency_level="Strong")
                c.alter_collection_properties(name, properties={
                    PROPERTY: json.dumps(_description(self.meta, self.form, width)),
                    INDEX_PROPERTY: json.dumps({"index_type": kind, "params": {}})})
        self._ready = True

    def _rows(self, ids: np.ndarray, paths: list, labels: list, shas: list,
              emb: np.ndarray) -> list[dict[str, Any]]:
        codes = self._codes(emb)
        self._ensure(self._width(codes))
        model = self.meta.get("model_sha256") or ""
        vec = ([bytes(row) for row in codes] if self.form == "binary" else
               [row for row in codes.astype(np.float32)])
        return [{"id": int(i), "path": _text(p) or "", "label": _text(lab), "sha256": sha,
                 "model_sha256": model, "vector": v}
                for i, p, lab, sha, v in zip(ids, paths, labels, shas, vec)]

    def _upsert(self, where: str, args: list[Any]) -> int:
        from zsbir.search.rows import _vectors
        from zsbir.search.scan import fs_name

        rows = self.con.execute(
            f"SELECT id, path, label, sha256, embedding FROM photos {where}", args).fetchall()
        if not rows:
            return 0
        emb = _vectors(self.con, [(r[1], r[4]) for r in rows], self.meta.get("dim"))
        data = self._rows(np.array([r[0] for r in rows], np.int64),
                          [fs_name(r[1]) for r in rows], [fs_name(r[2]) for r in rows],
                          [r[3] for r in rows], emb)
        with _errors(self.b):
            for i in range(0, len(data), CHUNK):
                self.c.upsert(self.b.collection, data[i:i + CHUNK])
        return len(data)

    def close(self) -> None:
        self.b.close()

    def committed(self, paths: list[str]) -> None:
        """Upsert the rows of a committed batch (by path, as :func:`_commit_batch` wrote)."""
        from zsbir.search.scan import db_name

        for i in range(0, len(paths), 900):
            part = [db_name(p) for p in paths[i:i + 900]]
            self._upsert(f"WHERE path IN ({','.join('?' * len(part))})", part)

    def finish(self) -> tuple[MilvusIndex, dict[str, Any]]:
        from zsbir.search.files import read_meta, set_meta, transaction
        from zsbir.search.scan import fs_name

        meta = read_meta(self.con)
        self.meta = meta
        want = {i: (_text(fs_name(p)), sha) for i, p, sha in self.con.execute(
            "SELECT id, path, sha256 FROM photos")}
        have = self._milvus_rows() if self._exists() else {}
        stale = [i for i, row in want.items() if have.get(i) != row]
        gone = [i for i in have if i not in want]
        for i in range(0, len(stale), 900):
            part = stale[i:i + 900]
            self._upsert(f"WHERE id IN ({','.join('?' * len(part))})", part)
        if not self._exists():  # no photos were ever embedded: nothing to search
            with transaction(self.con):
                set_meta(self.con, faiss_generation=meta["generation"], count=0)
            return self.b.load(self.index_dir, self.con, self.tm), {}
        with _errors(self.b):
            for i in range(0, len(gone), CHUNK):
                ids = ", ".join(str(int(x)) for x in gone[i:i + CHUNK])
                self.c.delete(self.b.collection, filter=f"id in [{ids}]")
            self.c.flush(self.b.collection)
            info = self._index(meta, len(want))
        with transaction(self.con):
            set_meta(self.con, faiss_generation=meta["generation"], count=len(want), **info)
        return self.b.load(self.index_dir, self.con, self.tm), info

    def _exists(self) -> bool:
        with _errors(self.b):
            return bool(self.c.has_collection(self.b.collection))

    def _milvus_rows(self) -> dict[int, tuple[str, str]]:
        out: dict[int, tuple[str, str]] = {}
        with _errors(self.b):
            it = self.c.query_iterator(self.b.collection, batch_size=4096, filter="id >= 0",
                                       output_fields=["path", "sha256"])
            try:
                while True:
                    page = it.next()
                    if not page:
                        break
                    out.update({int(r["id"]): (r["path"], r["sha256"]) for r in page})
            finally:
                it.close()
        return out

    def _index(self, meta: dict[str, Any], n: int) -> dict[str, Any]:
        """(Re)build the collection's index for ``meta['ann']``, load it, and tune the ANN
        search parameter on the stored codes (recall@10 against exact search >= 0.95)."""
        c, name = self.c, self.b.collection
        ann = meta["ann"]
        kind, built, search = _index_params(c, self.form, ann, n)
        current = list(c.list_indexes(name))
        wanted = {"index_type": kind, "params": built["params"]}
        props = c.describe_collection(name).get("properties") or {}
        if not current or props.get(INDEX_PROPERTY) != json.dumps(wanted):
            c.release_collection(name)
            if current:
                c.drop_index(name, current[0])
            create_index(c, name, built["index_params"], kind)
            c.alter_collection_properties(name, properties={INDEX_PROPERTY: json.dumps(wanted)})
        c.load_collection(name)
        info: dict[str, Any] = {"milvus_index": kind, "milvus_search": search,
                                "recall_at_10": None, "nprobe": None, "nlist": None,
                                "hnsw_ef": None}
        if self.binary:
            width = self.hasher.encode(np.zeros((1, int(meta.get("dim") or 1)),
                                                np.float32)).shape[1] * 8
            info["code_bits"] = int(width)
        if ann == "flat" or n < 2:
            return info
        info.update(self._tune(meta, kind, built["params"], search, n))
        return info

    def _tune(self, meta: dict[str, Any], kind: str, params: dict, search: dict, n: int
              ) -> dict[str, Any]:
        from zsbir.hashing.ann import build_exact, recall_at_k
        from zsbir.search.rows import _load_rows

        ids, _, _, emb = _load_rows(self.con, meta.get("dim"))
        codes = self._codes(emb)
        pick = np.random.default_rng(0).choice(n, min(n, RECALL_QUERIES), replace=False)
        k = min(10, n - 1)
        exact_codes = codes if self.form != "pm1" else _repack(codes)
        binary = self.form != "float"
        ev, ei = build_exact(exact_codes, binary=binary).search(exact_codes[pick], k + 1)
        exact = (ev[:, 1:], ids[ei[:, 1:]])
        # nprobe is not capped at the nlist asked for: milvus-lite 3.2.2 clusters into 128
        # lists whatever nlist says (its faiss warning; measured here)
        key, top = ("nprobe", 65536) if "nlist" in params else ("ef", 4096)
        value = 1 if key == "nprobe" else 16
        engine = _Engine(self.b, self.binary, self.form, int(codes.shape[1]) if self.form ==
                         "pm1" else int(codes.shape[1] * (8 if binary else 1)), kind, {},
                         {int(i): p for p, i in enumerate(ids)}, [None] * n)
        while True:
            engine.search_params = {key: max(value, k + 1) if key == "ef" else value}
            v, p = engine.raw(codes[pick], k + 1)
            got = (v[:, 1:], np.where(p[:, 1:] >= 0, ids[np.maximum(p[:, 1:], 0)], -1))
            recall = recall_at_k(got, exact, k, binary=binary)
            if recall >= TARGET_RECALL or value >= top or recall == 1.0:
                break
            value = min(top, value * 2)
        out: dict[str, Any] = {"milvus_search": dict(engine.search_params),
                               "recall_at_10": float(recall),
                               "recall_queries": int(len(pick))}
        if key == "nprobe":
            out.update(nprobe=int(value), nlist=int(params["nlist"]))
        else:
            out["hnsw_ef"] = int(engine.search_params["ef"])
        return out


def _repack(pm1: np.ndarray) -> np.ndarray:
    return np.packbits(pm1 > 0, axis=1)


class _Engine:
    """Top-k search in the collection, ordered as the faiss backend orders (score, then
    path position), the tie group at the cut-off completed; the class filter runs in
    Milvus."""

    def __init__(self, backend: MilvusBackend, binary: bool, form: str, bits: int,
                 kind: str, search_params: dict, pos_of: dict[int, int],
                 labels: list[str | None]):
        self.b, self.binary, self.form, self.bits = backend, binary, form, bits
        self.kind, self.search_params, self.pos_of = kind, search_params, pos_of
        self.counts: dict[str | None, int] = {}
        for lab in labels:
            self.counts[lab] = self.counts.get(lab, 0) + 1
        self.n = len(labels)

    def _query_vectors(self, codes: np.ndarray) -> list[Any]:
        if self.form == "binary":
            return [bytes(row) for row in np.ascontiguousarray(codes, dtype=np.uint8)]
        if self.form == "pm1" and codes.dtype == np.uint8:
            codes = pm1_codes(codes)
        return [row for row in np.asarray(codes, np.float32)]

    def _value(self, distance: float) -> float:
        if self.form == "pm1":  # <x, y> = bits - 2 H
            return float(round((self.bits - distance) / 2))
        return float(distance)

    def _call(self, vectors: list[Any], limit: int, label: str | None) -> list[list[dict]]:
        params = dict(self.search_params)
        if "ef" in params:
            params["ef"] = max(int(params["ef"]), limit)
        kwargs: dict[str, Any] = {"limit": limit, "output_fields": [],
                                  "search_params": {"params": params}}
        if label is not None:
            kwargs["filter"] = f"label == {_quote(_text(label) or '')}"
        with _errors(self.b):
            return self.b.client().search(self.b.collection, data=vectors, **kwargs)

    def _sorted(self, hits: list[dict]) -> list[tuple[float, int]]:
        """(value, position) best first; a row the loaded photo table lacks (a writer
        mid-way on a server: a photo added or deleted since) is left out."""
        out = []
        for h in hits:
            pos = self.pos_of.get(int(h["id"]))
            if pos is not None:
                out.append((self._value(h["distance"]), pos))
        return sorted(out, key=(lambda t: (t[0], t[1])) if self.binary
                      else (lambda t: (-t[0], t[1])))

    def search(self, codes: np.ndarray, top: int, label: str | None
               ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per query: (values, positions), at most ``top``, best first, ties by position."""
        avail = self.n if label is None else self.counts.get(label, 0)
        k = min(int(top), avail)
        vectors = self._query_vectors(codes)
        out_v, out_p = [], []
        for vec in vectors:
            if k == 0:
                out_v.append(np.zeros(0))
                out_p.append(np.zeros(0, np.int64))
                continue
            limit = min(2 * k, MAX_LIMIT)
            while True:
                hits = self._call([vec], limit, label)[0]
                ranked = self._sorted(hits)
                if len(hits) < limit or limit >= MAX_LIMIT or (
                        len(ranked) > k and ranked[k - 1][0] != ranked[-1][0]):
                    break  # all rows seen, or the tie group at the cut-off is complete
                limit = min(2 * limit, MAX_LIMIT)
            ranked = ranked[:k]
            dtype = np.int32 if self.binary else np.float32
            out_v.append(np.array([v for v, _ in ranked], dtype))
            out_p.append(np.array([p for _, p in ranked], np.int64))
        return out_v, out_p

    def raw(self, codes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, positions) arrays (Q, k) as Milvus returns them (sorted as above,
        -1 where fewer were found): for measuring recall."""
        res = self._call(self._query_vectors(codes), k, None)
        v = np.full((len(res), k), np.inf if self.binary else -np.inf)
        p = np.full((len(res), k), -1, np.int64)
        for q, hits in enumerate(res):
            ranked = self._sorted(hits)[:k]
            for j, (val, pos) in enumerate(ranked):
                v[q, j], p[q, j] = val, pos
        return v, p
