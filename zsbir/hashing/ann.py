"""Approximate search for large galleries, sharded embedding files, and merging results.

Exact search (:func:`zsbir.hashing.search.search`) scans the whole gallery per query:
O(N d) for real-valued embeddings, O(N b) popcounts for b-bit codes. For millions of
photos and more, an inverted file (IVF; Jegou et al., "Product Quantization for Nearest
Neighbor Search", TPAMI 2011, Sec. IV-A) partitions the gallery into ``nlist`` cells by
k-means and scans only the ``nprobe`` cells whose centroids are nearest the query:

- :func:`build_ivf`: real-valued, cosine (inner product on L2-normalized vectors);
  ``storage = "float32"`` (``IndexIVFFlat``) or ``"float16"`` (``IndexIVFScalarQuantizer``
  with ``QT_fp16``: half the memory, scores within float16 rounding);
- :func:`build_binary_ivf`: packed binary codes (ITQ), Hamming, ``IndexBinaryIVF``
  (centroids from k-means on the codes' bits, binarized);
- :func:`build_mih`: multi-index hashing (Norouzi, Punjani & Fleet, "Fast Search in
  Hamming Space with Multi-Index Hashing", CVPR 2012): the b-bit code is cut into
  ``nhash`` substrings, each indexed in its own hash table; candidates are the codes that
  match the query exactly in some substring (or within ``nflip`` flipped bits of it),
  then ranked by full Hamming distance (faiss's ``IndexBinaryMultiHash``).

:func:`recall_at_k` scores an approximate result against exact search (a naive loop,
:func:`recall_at_k_reference`, is its test reference). For Hamming distances, ties are
massive (a 64-bit code has 65 possible distances), so recall counts an approximate
neighbour as correct when its distance is within the exact k-th distance.

Sharded embedding (``zsbir index --shard i/n``): each process or machine embeds its block
of the sorted file list (:func:`zsbir.engine.distributed.partition_files`) and writes a
shard file with :func:`save_shard`; :func:`merge_shards` checks that all ``n`` shards of
one model are present once and concatenates them, in shard order, without re-embedding;
the merged vectors build one index. :func:`merge_topk` merges per-shard top-k results by
score, as a search server with one index shard per process does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from zsbir.engine.threads import faiss_threads
from zsbir.hashing.search import _as_codes, _as_unit_float, _sorted_rows

__all__ = [
    "AnnIndex",
    "MergedShards",
    "ShardFileError",
    "build_binary_ivf",
    "build_exact",
    "build_ivf",
    "build_mih",
    "default_nlist",
    "merge_shards",
    "merge_topk",
    "recall_at_k",
    "recall_at_k_reference",
    "save_shard",
]


class ShardFileError(ValueError):
    """Shard files that cannot be merged (missing, duplicated, or from different runs)."""


@dataclass
class AnnIndex:
    """A faiss index with the toolkit's conventions: cosine similarities (descending) for
    real-valued vectors, int32 Hamming distances (ascending) for packed codes; ties by
    gallery index ascending within what the index returns; ids are gallery positions."""

    index: Any
    binary: bool
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_nprobe(self, nprobe: int) -> None:
        """Cells (IVF) scanned per query; more: slower, higher recall."""
        if nprobe < 1:
            raise ValueError(f"nprobe must be >= 1, got {nprobe}")
        if not hasattr(self.index, "nprobe"):
            raise ValueError(f"a {self.kind} index has no nprobe")
        self.index.nprobe = int(nprobe)
        self.params["nprobe"] = int(nprobe)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (values, ids) per query; ids of -1 pad rows with fewer candidates."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = _as_codes(queries, "queries") if self.binary else _as_unit_float(queries, "queries")
        width = q.shape[1] * (8 if self.binary else 1)
        if width != self.index.d:
            unit = "bits" if self.binary else "dimensions"
            raise ValueError(f"queries have {width} {unit}, the index {self.index.d}")
        faiss_threads()  # faiss's own OpenMP: the plan's threads (zsbir.engine.threads)
        values, ids = self.index.search(q, min(k, max(self.ntotal, 1)))
        if self.binary:  # faiss pads with huge distances and id -1
            values = np.where(ids < 0, np.iinfo(np.int32).max, values).astype(np.int32)
        else:
            values = np.where(ids < 0, -np.inf, values).astype(np.float32)
        values, ids = _sorted_rows(values, ids.astype(np.int64), self.binary)
        # the padding (-1) sorts last by value; keep its id -1
        return values, ids

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write = faiss.write_index_binary if self.binary else faiss.write_index
        write(self.index, str(path))
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(
            {"binary": self.binary, "kind": self.kind, "params": self.params}))
        return path

    @classmethod
    def load(cls, path: str | Path) -> AnnIndex:
        path = Path(path)
        meta = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        read = faiss.read_index_binary if meta["binary"] else faiss.read_index
        return cls(read(str(path)), meta["binary"], meta["kind"], meta["params"])


def default_nlist(n: int) -> int:
    """IVF cells for ``n`` vectors: about 4 sqrt(n) (faiss's guideline is 4-16 sqrt(n)),
    a power of two, at least 1 and at most n / 39 (k-means wants >= 39 points a cell)."""
    if n < 1:
        raise ValueError("cannot index an empty gallery")
    target = 4 * math.sqrt(n)
    nlist = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(nlist, n // 39 if n >= 39 else 1)))


def _train_sample(x: np.ndarray, train_size: int | None, seed: int) -> np.ndarray:
    if train_size is None or train_size >= len(x):
        return x
    idx = np.sort(np.random.default_rng(seed).choice(len(x), train_size, replace=False))
    return x[idx]


def _add_chunked(index: Any, x: np.ndarray, prepare: Any, chunk: int = 1 << 16) -> None:
    for i in range(0, len(x), chunk):
        index.add(prepare(x[i:i + chunk]))


def build_exact(gallery: np.ndarray, *, binary: bool) -> AnnIndex:
    """Exhaustive search (``IndexFlatIP`` / ``IndexBinaryFlat``): the recall reference."""
    faiss_threads()  # faiss's own OpenMP: the plan's threads (zsbir.engine.threads)
    if binary:
        g = _as_codes(gallery, "gallery")
        index = faiss.IndexBinaryFlat(8 * g.shape[1])
        index.add(g)
        return AnnIndex(index, True, "binary_flat")
    index = faiss.IndexFlatIP(np.asarray(gallery).shape[1])
    _add_chunked(index, gallery, lambda c: _as_unit_float(c, "gallery"))
    return AnnIndex(index, False, "flat")


def build_ivf(gallery: np.ndarray, *, nlist: int | None = None, nprobe: int = 16,
              storage: Literal["float32", "float16"] = "float32",
              train_size: int | None = 100_000, seed: int = 0) -> AnnIndex:
    """Real-valued IVF for cosine search: k-means on (a sample of) the L2-normalized
    gallery into ``nlist`` cells (default :func:`default_nlist`), vectors stored per cell
    in float32 or float16."""
    faiss_threads()  # faiss's own OpenMP: the plan's threads (zsbir.engine.threads)
    if storage not in ("float32", "float16"):
        raise ValueError(f"storage must be 'float32' or 'float16', got {storage!r}")
    g = np.asarray(gallery)
    if g.ndim != 2 or len(g) == 0:
        raise ValueError(f"gallery must be a non-empty (N, D) array, got shape {g.shape}")
    d = g.shape[1]
    nlist = nlist or default_nlist(len(g))
    quantizer = faiss.IndexFlatIP(d)
    if storage == "float32":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist,
                                              faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.train(_as_unit_float(_train_sample(g, train_size, seed), "gallery"))
    _add_chunked(index, g, lambda c: _as_unit_float(c, "gallery"))
    index.nprobe = nprobe
    return AnnIndex(index, False, f"ivf_{storage}",
                    {"nlist": nlist, "nprobe": nprobe, "storage": storage})


def build_binary_ivf(codes: np.ndarray, *, nlist: int | None = None, nprobe: int = 16,
                     train_size: int | None = 100_000, seed: int = 0) -> AnnIndex:
    """Binary IVF for Hamming search on packed codes (``IndexBinaryIVF``)."""
    faiss_threads()  # faiss's own OpenMP: the plan's threads (zsbir.engine.threads)
    c = _as_codes(codes, "codes")
    if len(c) == 0:
        raise ValueError("cannot index an empty gallery")
    d = 8 * c.shape[1]
    nlist = nlist or default_nlist(len(c))
    quantizer = faiss.IndexBinaryFlat(d)
    index = faiss.IndexBinaryIVF(quantizer, d, nlist)
    index.cp.seed = seed
    index.train(_train_sample(c, train_size, seed))
    index.add(c)
    index.nprobe = nprobe
    return AnnIndex(index, True, "binary_ivf", {"nlist": nlist, "nprobe": nprobe})


def build_mih(codes: np.ndarray, *, nhash: int | None = None, nflip: int = 0) -> AnnIndex:
    """Multi-index hashing over packed codes: ``nhash`` tables keyed by ``bits / nhash``-bit
    substrings (default: 16-bit substrings, Norouzi et al.'s choice of about log2(N) bits
    for N near 2^16-2^20 being 16-20); probing flips up to ``nflip`` bits of each key."""
    faiss_threads()  # faiss's own OpenMP: the plan's threads (zsbir.engine.threads)
    c = _as_codes(codes, "codes")
    bits = 8 * c.shape[1]
    nhash = nhash or max(1, bits // 16)
    if bits % nhash:
        raise ValueError(f"{bits}-bit codes do not cut into {nhash} equal substrings")
    b = bits // nhash
    if not 1 <= nflip <= b and nflip != 0:
        raise ValueError(f"nflip must be within 0..{b}, got {nflip}")
    index = faiss.IndexBinaryMultiHash(bits, nhash, b)
    index.add(c)
    index.nflip = nflip
    return AnnIndex(index, True, "mih", {"nhash": nhash, "substring_bits": b, "nflip": nflip})


# ---------------------------------------------------------------------------- recall
def recall_at_k(approx: tuple[np.ndarray, np.ndarray], exact: tuple[np.ndarray, np.ndarray],
                k: int, *, binary: bool) -> float:
    """Mean over queries of the fraction of the exact top-``k`` an approximate top-``k``
    recovers.

    Real-valued: ``|approx ids ∩ exact ids| / k``. Binary: an approximate neighbour counts
    when its Hamming distance is <= the exact k-th distance (any of the items tied there
    is a correct k-th neighbour), at most ``k`` per query. Both arguments are (values, ids)
    of shape (Q, >= k), as :meth:`AnnIndex.search` returns; ids of -1 never count.
    """
    av, ai = (np.asarray(a)[:, :k] for a in approx)
    ev, ei = (np.asarray(a)[:, :k] for a in exact)
    if ai.shape[0] != ei.shape[0] or ei.shape[1] < k:
        raise ValueError(f"need (Q, >= {k}) results for the same queries, got {ai.shape} "
                         f"and {ei.shape}")
    valid = ai >= 0
    if binary:
        hit = valid & (av <= ev[:, k - 1:k])
        return float(np.minimum(hit.sum(1), k).mean() / k)
    # set intersection of two rows of distinct ids, vectorized by sorting their union
    both = np.concatenate([np.where(valid, ai, -1 - np.arange(ai.shape[1])), ei], axis=1)
    both.sort(axis=1)
    return float((both[:, 1:] == both[:, :-1]).sum(1).mean() / k)


def recall_at_k_reference(approx: tuple[np.ndarray, np.ndarray],
                          exact: tuple[np.ndarray, np.ndarray], k: int, *,
                          binary: bool) -> float:
    """Per-query loop version of :func:`recall_at_k` (the test reference)."""
    out = []
    for q in range(len(exact[1])):
        got = [(float(v), int(i)) for v, i in zip(approx[0][q][:k], approx[1][q][:k])
               if i >= 0]
        if binary:
            kth = float(exact[0][q][k - 1])
            out.append(min(sum(1 for v, _ in got if v <= kth), k) / k)
        else:
            truth = {int(i) for i in exact[1][q][:k]}
            out.append(len({i for _, i in got} & truth) / k)
    return float(np.mean(out))


# ---------------------------------------------------------------------------- shards
def save_shard(path: str | Path, paths: Sequence[str], *, shard: int, num_shards: int,
               embeddings: np.ndarray | None = None, codes: np.ndarray | None = None,
               meta: dict[str, Any] | None = None) -> Path:
    """Write one shard's embeddings (and/or packed codes) with its file paths and the
    identity of the model (``meta``: e.g. run directory, checkpoint hash, hasher tag),
    which :func:`merge_shards` requires to agree across shards."""
    if embeddings is None and codes is None:
        raise ValueError("a shard needs embeddings or codes")
    arrays: dict[str, Any] = {"paths": np.asarray(list(paths), dtype=str),
                              "shard": np.int64(shard), "num_shards": np.int64(num_shards),
                              "meta": np.asarray(json.dumps(meta or {}, sort_keys=True))}
    for name, a in (("embeddings", embeddings), ("codes", codes)):
        if a is not None:
            if len(a) != len(paths):
                raise ValueError(f"{len(a)} {name} rows for {len(paths)} paths")
            arrays[name] = np.asarray(a)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


@dataclass
class MergedShards:
    """The shards' rows concatenated in shard order (= sorted file order)."""

    paths: list[str]
    embeddings: np.ndarray | None
    codes: np.ndarray | None
    meta: dict[str, Any]


def merge_shards(files: Sequence[str | Path]) -> MergedShards:
    """Concatenate shard files written by :func:`save_shard` (any order given): every
    shard 0..n-1 exactly once, the same ``meta`` and array widths in all, else
    :class:`ShardFileError` names the problem and the file."""
    if not files:
        raise ShardFileError("no shard files given")
    loaded: dict[int, dict[str, Any]] = {}
    num: int | None = None
    meta: str | None = None
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise ShardFileError(f"no shard file {str(f)!r}")
        with np.load(f, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
        for key in ("paths", "shard", "num_shards", "meta"):
            if key not in d:
                raise ShardFileError(f"{f}: not a zsbir shard file (no {key!r})")
        i, n = int(d["shard"]), int(d["num_shards"])
        if num is None:
            num, meta = n, str(d["meta"])
        if n != num:
            raise ShardFileError(f"{f} is shard {i}/{n}, others are of {num}")
        if str(d["meta"]) != meta:
            raise ShardFileError(f"{f} was embedded by another model or hasher than "
                                 f"{files[0]} (meta differs)")
        if i in loaded:
            raise ShardFileError(f"shard {i}/{n} given twice ({loaded[i]['file']} and {f})")
        loaded[i] = {**d, "file": f}
    assert num is not None
    missing = sorted(set(range(num)) - set(loaded))
    if missing:
        raise ShardFileError(f"missing shard(s) {', '.join(f'{i}/{num}' for i in missing)}")
    parts = [loaded[i] for i in range(num)]
    out: dict[str, np.ndarray | None] = {}
    for name in ("embeddings", "codes"):
        have = [name in p for p in parts]
        if any(have) and not all(have):
            raise ShardFileError(f"some shards have {name}, others not")
        if all(have):
            widths = {p[name].shape[1:] for p in parts} | {p[name].dtype.str for p in parts}
            if len(widths) > 2:
                raise ShardFileError(f"shards' {name} differ in width or dtype")
            out[name] = np.concatenate([p[name] for p in parts])
        else:
            out[name] = None
    return MergedShards([str(s) for p in parts for s in p["paths"]], out["embeddings"],
                        out["codes"], json.loads(meta or "{}"))


def merge_topk(results: Sequence[tuple[np.ndarray, np.ndarray]], offsets: Sequence[int],
               k: int, *, binary: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k results into the global top-``k`` by score.

    ``results[s]`` is shard s's (values, local ids), (Q, k_s); ``offsets[s]`` its first
    global id. Ranking: Hamming ascending / similarity descending, ties by global id
    ascending (the exact search's rule), so merging exact per-shard top-k gives exactly
    the exact search over the whole gallery. Padding ids (-1) are dropped to the end.
    """
    if len(results) != len(offsets):
        raise ValueError(f"{len(results)} results for {len(offsets)} offsets")
    vals = np.concatenate([np.asarray(v) for v, _ in results], axis=1)
    ids = np.concatenate([np.where(np.asarray(i) >= 0, np.asarray(i) + o, -1)
                          for (_, i), o in zip(results, offsets)], axis=1)
    pad = np.iinfo(np.int32).max if binary else -np.inf
    vals = np.where(ids >= 0, vals, pad).astype(np.int32 if binary else np.float32)
    sort_ids = np.where(ids >= 0, ids, np.iinfo(np.int64).max)
    key = vals if binary else -vals
    order = np.lexsort((sort_ids, key), axis=-1)[:, :k]
    return np.take_along_axis(vals, order, 1), np.take_along_axis(ids, order, 1)
