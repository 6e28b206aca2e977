"""The fast, exact ranking evaluator: every metric from one ranking per query chunk.

Per chunk of queries (queries are processed grouped by class, so a chunk splits into a few
segments that share one positive set)::

    scores (n, G)          one matmul (cosine / euclidean) or xor + popcount (hamming)
    sort each row's values one values-only sort per row (np.partition when only top-K
                           metrics are asked)
    positives' scores      (n, P), P = #gallery items of the query's class, sorted
    binary search          #items scoring above each positive -> its rank
    metrics                small (n, P) functions of those ranks (zsbir.evaluation.metrics)

Every published formula depends on the ranking only through the ranks of the positives
(plus, for the sklearn-style ones, the size of each positive's tie group), so after the one
(n, G) sort all work is on (n, P) arrays. A values-only sort (numpy's SIMD sort) is ~10x
cheaper on CPU than ``torch.sort``, which also returns indices; a positive's rank is the
number of items scoring above it (binary search in the sorted row) plus the positives
before it. That is exact unless a negative scores exactly the same as a positive (float32
scores of 17k items tie a few times per row): those few entries are counted directly, and
rows with many (quantized scores) take the *keys* path, which sorts one unique integer key
per item, ``score code << bits | gallery index``, and finds each positive's key in it.
Hamming distances (integers in [0, B]) always take the keys path, with int32 keys when
code and index fit in 31 bits.

Tie rule (see :mod:`zsbir.evaluation.metrics`): descending score, ties by gallery index
ascending, for rank-based formulas; sklearn-style formulas group equal scores. Scores are
float32; -0.0 and +0.0 are the same score.

Exactness: the metrics are exact for the float32 scores ranked (tested to 1e-12 against
the per-query references). The scores come from a BLAS matmul whose last bit can depend on
how queries are chunked (about 0.3% of the entries at SK-SH size), which can reorder
near-tied items and move an AP by ~1e-5; :func:`evaluate_scores` on a stored score matrix
gives bit-reproducible numbers.

On CPU the per-row work runs in numpy on a thread pool over row blocks (numpy releases the
GIL). It does not use torch's intra-op threads for the many small (n, P) operations: on a
busy 2-core machine their OpenMP barriers made those operations ~6x slower than
single-threaded ones. torch computes the scores (BLAS matmul with its own threads). On
other devices (CUDA) everything runs in torch (``torch.sort``, ``torch.searchsorted``), the
same algorithm with a full sort, and only the (n, P) ranks come back to the CPU.

Memory is bounded by processing ``chunk_size`` queries at a time; by default the chunk is
chosen so the (chunk, G) work arrays stay within :data:`MEMORY_BUDGET_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import MetricSpec, compute_metric, parse_metric

__all__ = [
    "EvalResult",
    "MEMORY_BUDGET_BYTES",
    "evaluate_retrieval",
    "evaluate_score_fn",
    "evaluate_scores",
    "pairwise_scores",
    "hamming_distances",
    "auto_chunk_size",
]

Distance = Literal["cosine", "euclidean", "hamming"]
ArrayLike = torch.Tensor | np.ndarray

#: Default bound on the (chunk, G) work tensors of one chunk.
MEMORY_BUDGET_BYTES = 256 * 2**20
# Work memory per (query, gallery item) cell, generously: scores (4), their sorted copy (4),
# int64 keys of fallback rows (8) and temporaries; Hamming: distances (4) and keys (4-8).
_BYTES_PER_CELL = 24


@dataclass
class EvalResult:
    """Result of :func:`evaluate_retrieval`.

    ``metrics``: metric -> mean over all queries. ``per_class``: metric -> query label ->
    mean over that class's queries (empty unless ``per_class=True``). ``formulas``: metric
    -> one-line formula naming its source. ``per_query``: metric -> (Q,) values in query
    order (not part of :meth:`to_dict`). ``num_queries_without_positives``: queries whose
    class has no gallery item (they score 0 and count in the means).
    """

    metrics: dict[str, float]
    per_class: dict[str, dict[int, float]]
    formulas: dict[str, str]
    num_queries: int
    num_gallery: int
    distance: str = "cosine"
    num_queries_without_positives: int = 0
    per_query: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (per-class labels become string keys; no per-query data)."""
        return {
            "metrics": {k: float(v) for k, v in self.metrics.items()},
            "per_class": {m: {str(c): float(v) for c, v in d.items()}
                          for m, d in self.per_class.items()},
            "formulas": dict(self.formulas),
            "num_queries": int(self.num_queries),
            "num_gallery": int(self.num_gallery),
            "distance": self.distance,
            "num_queries_without_positives": int(self.num_queries_without_positives),
        }


# ---------------------------------------------------------------------------------------
# Ranks of the positives, numpy (CPU). Each call handles a block of rows of one class
# segment; blocks run in a thread pool (numpy releases the GIL; no OpenMP team to stall
# when the machine is oversubscribed).
# ---------------------------------------------------------------------------------------

Ranked = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]

_POOL: ThreadPoolExecutor | None = None


def _workers() -> int:
    """The pool's size: torch's intra-op threads (set per phase by zsbir.engine.threads),
    at most the CPUs this process may use (affinity and cgroup quota)."""
    from zsbir.engine.threads import usable_cpus

    return max(1, min(torch.get_num_threads(), usable_cpus().cpus))


def _parallel(jobs: list[Callable[[], None]]) -> None:
    """Run the jobs on the evaluator's thread pool (inline when single-threaded)."""
    global _POOL
    workers = _workers()
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    if _POOL is None or _POOL._max_workers != workers:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zsbir-eval")
    for f in [_POOL.submit(job) for job in jobs]:
        f.result()


def _np_searchsorted_rows(a: np.ndarray, v: np.ndarray, side: str) -> np.ndarray:
    """Row-wise ``np.searchsorted`` (int64 (m, P))."""
    out = np.empty(v.shape, dtype=np.int64)
    for i in range(a.shape[0]):
        out[i] = np.searchsorted(a[i], v[i], side=side)
    return out


def _np_run_bounds(ps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted rows: (start, end) of each element's run of equal values.

    On a descending row that is (#elements > x, #elements >= x).
    """
    m, p = ps.shape
    ar = np.arange(p)
    start = np.ones((m, p), dtype=bool)
    start[:, 1:] = ps[:, 1:] != ps[:, :-1]
    end = np.ones((m, p), dtype=bool)
    end[:, :-1] = start[:, 1:]
    lo = np.maximum.accumulate(np.where(start, ar, 0), axis=1)
    hi = np.minimum.accumulate(np.where(end, ar + 1, p)[:, ::-1], axis=1)[:, ::-1]
    return lo, hi


def _np_float_codes(s: np.ndarray) -> np.ndarray:
    """int32 codes ordered like the scores, reversed: ascending code = descending score."""
    b = (s + np.float32(0.0)).view(np.int32)  # + 0.0 turns -0.0 into +0.0
    return ~(b ^ ((b >> 31) & 0x7FFFFFFF))


def _key_layout(g: int, code_bits: int | None) -> tuple[int, type]:
    """(shift, dtype) of the unique per-item key ``code << shift | gallery index``."""
    idx_bits = max(1, (g - 1).bit_length())
    if code_bits is not None and code_bits + idx_bits <= 31:
        return idx_bits, np.int32
    return 32, np.int64


def _np_ranks_keys(codes: np.ndarray, pos_idx: np.ndarray, code_bits: int | None,
                   need_groups: bool) -> Ranked:
    """Exact ranks from one unique integer key per item, ``(score code, gallery index)``.

    ``codes``: (m, G) integers, ascending = better; if ``code_bits`` is given they lie in
    [0, 2**code_bits) and int32 keys are used when they fit. A positive's rank is 1 + the
    number of keys below its key. Returns (ranks, ge, pos_ge), each (m, P) in rank order.
    """
    m, g = codes.shape
    shift, dtype = _key_layout(g, code_bits)
    keys = (codes.astype(dtype) << shift) | np.arange(g, dtype=dtype)
    pos_keys = np.sort(keys[:, pos_idx], axis=1)  # rank order
    keys.sort(axis=1)
    ranks = _np_searchsorted_rows(keys, pos_keys, "left") + 1
    if not need_groups:
        return ranks, None, None
    pos_codes = pos_keys >> shift
    last_key = (pos_codes << shift) | dtype((1 << shift) - 1)  # largest key with that code
    ge = _np_searchsorted_rows(keys, last_key, "right")
    _, pos_ge = _np_run_bounds(pos_codes)
    return ranks, ge, pos_ge


def _np_ranks_float(s: np.ndarray, pos_idx: np.ndarray, neg_mask: np.ndarray,
                    need_groups: bool, top: int | None = None) -> Ranked:
    """Exact ranks of the positives of float score rows ``s`` (m, G).

    With the positives' scores in descending order, the i-th (0-based) has rank
    ``i + 1 + #negatives scoring > s_p + #negatives tied with it at a lower gallery index``.
    #negatives scoring > s_p comes from binary search in the row's sorted values. The last
    term is 0 unless a negative ties a positive; such ties (a few per chunk with float
    features) are counted directly, or, when there are many (quantized scores), the rows
    take :func:`_np_ranks_keys`.

    With ``top`` (every requested metric has K <= top), only the ``top`` largest values of
    a row are sorted (``np.partition``); positives scoring below them get rank G + 1, and
    positives at the boundary value are counted directly like ties.
    """
    m, g = s.shape
    n_pos = pos_idx.shape[0]
    if top is None or top >= g:
        width = g
        u = np.sort(s, axis=1)
    else:
        width = top
        u = np.partition(s, g - top, axis=1)[:, g - top:]
        u.sort(axis=1)
    if np.isnan(u[:, -1]).any():  # numpy sorts (and partitions) NaN last
        raise ValueError("scores contain NaN")
    sp = s[:, pos_idx]  # (m, P), gallery-index order
    ps_up = np.sort(sp, axis=1)
    ps = ps_up[:, ::-1]  # rank order
    le_all = _np_searchsorted_rows(u, ps_up, "right")[:, ::-1]  # #{u <= s_p}
    gt_all = width - le_all  # #{s > s_p}, exact for s_p >= min(u)
    pos_gt, pos_ge = _np_run_bounds(ps)  # #positives scoring > s_p, >= s_p
    tied_pos = pos_ge - pos_gt
    # Items scoring s_p sit at u[lt_all:le_all]; a negative is among them iff that run is
    # longer than the positives' run, i.e. u[le_all - tied_pos - 1] == s_p.
    j = le_all - tied_pos - 1
    tie = (j >= 0) & (np.take_along_axis(u, np.maximum(j, 0), 1) == ps)
    ranks = gt_all - pos_gt + np.arange(1, n_pos + 1)
    if width < g:
        floor = u[:, :1]
        ranks[ps < floor] = g + 1  # outside the top `width`
        tie |= ps == floor  # the boundary value may continue outside u: count directly
    ge = (gt_all + tied_pos) if need_groups else None  # #{s >= s_p}
    if not need_groups:
        pos_ge = None
    rr, kk = np.nonzero(tie)
    if rr.size == 0:
        return ranks, ge, pos_ge
    if rr.size > max(m, 16):  # many ties (quantized scores): exact keys for those rows
        rows = np.unique(rr)
        r2, ge2, pge2 = _np_ranks_keys(_np_float_codes(s[rows]), pos_idx, None, need_groups)
        ranks[rows] = r2
        if need_groups:
            ge[rows] = ge2
            pos_ge[rows] = pge2
        return ranks, ge, pos_ge
    # The tied positive at rank slot k is the i-th (by gallery index) of the positives with
    # its score; add the negatives with that score and a lower gallery index.
    v = ps[rr, kk]
    i = kk - pos_gt[rr, kk]
    eq_pos = sp[rr] == v[:, None]
    nth = (np.cumsum(eq_pos, axis=1) == (i + 1)[:, None]) & eq_pos
    gidx = pos_idx[nth.argmax(1)]
    eq_all = s[rr] == v[:, None]  # (T, G)
    earlier = np.arange(g)[None, :] < gidx[:, None]
    ranks[rr, kk] += (eq_all & neg_mask & earlier).sum(1)
    if need_groups:
        ge[rr, kk] = gt_all[rr, kk] + eq_all.sum(1)
    return ranks, ge, pos_ge


# ---------------------------------------------------------------------------------------
# Ranks of the positives, torch (any device; used off-CPU). Same algorithm as above.
# ---------------------------------------------------------------------------------------

TRanked = tuple[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"]


def _t_run_bounds(ps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, p = ps.shape
    ar = torch.arange(p, device=ps.device)
    start = torch.ones((m, p), dtype=torch.bool, device=ps.device)
    start[:, 1:] = ps[:, 1:] != ps[:, :-1]
    end = torch.ones_like(start)
    end[:, :-1] = start[:, 1:]
    lo = torch.where(start, ar, 0).cummax(1).values
    hi = torch.where(end, ar + 1, p).flip(1).cummin(1).values.flip(1)
    return lo, hi


def _t_float_codes(s: torch.Tensor) -> torch.Tensor:
    b = (s + 0.0).view(torch.int32)
    return ~(b ^ ((b >> 31) & 0x7FFFFFFF))


def _t_ranks_keys(codes: torch.Tensor, pos_idx: torch.Tensor, code_bits: int | None,
                  need_groups: bool) -> TRanked:
    m, g = codes.shape
    shift, np_dtype = _key_layout(g, code_bits)
    dtype = torch.int32 if np_dtype is np.int32 else torch.int64
    keys = (codes.to(dtype) << shift) | torch.arange(g, device=codes.device, dtype=dtype)
    pos_keys = torch.sort(keys.index_select(1, pos_idx), dim=1).values
    keys = torch.sort(keys, dim=1).values
    ranks = torch.searchsorted(keys, pos_keys) + 1
    if not need_groups:
        return ranks, None, None
    pos_codes = pos_keys >> shift
    ge = torch.searchsorted(keys, (pos_codes << shift) | ((1 << shift) - 1), right=True)
    _, pos_ge = _t_run_bounds(pos_codes)
    return ranks, ge, pos_ge


def _t_ranks_float(s: torch.Tensor, pos_idx: torch.Tensor, neg_mask: torch.Tensor,
                   need_groups: bool) -> TRanked:
    m, g = s.shape
    n_pos = pos_idx.numel()
    u = torch.sort(s, dim=1).values
    if bool(torch.isnan(u[:, -1]).any()):  # torch sorts NaN last
        raise ValueError("scores contain NaN")
    sp = s.index_select(1, pos_idx)
    ps = torch.sort(sp, dim=1, descending=True).values
    le_all = torch.searchsorted(u, ps.contiguous(), right=True)
    pos_gt, pos_ge = _t_run_bounds(ps)
    tied_pos = pos_ge - pos_gt
    j = le_all - tied_pos - 1
    tie = (j >= 0) & (u.gather(1, j.clamp(min=0)) == ps)
    ranks = (g - le_all) - pos_gt + torch.arange(1, n_pos + 1, device=s.device)
    ge = (g - le_all + tied_pos) if need_groups else None
    if not need_groups:
        pos_ge = None
    rr, kk = tie.nonzero(as_tuple=True)
    if rr.numel() == 0:
        return ranks, ge, pos_ge
    if rr.numel() > max(m, 16):
        rows = torch.unique(rr)
        r2, ge2, pge2 = _t_ranks_keys(_t_float_codes(s.index_select(0, rows)), pos_idx,
                                      None, need_groups)
        ranks[rows] = r2
        if need_groups:
            ge[rows] = ge2
            pos_ge[rows] = pge2
        return ranks, ge, pos_ge
    v = ps[rr, kk]
    i = kk - pos_gt[rr, kk]
    eq_pos = sp.index_select(0, rr) == v[:, None]
    nth = (eq_pos.cumsum(1) == (i + 1)[:, None]) & eq_pos
    gidx = pos_idx[nth.to(torch.int32).argmax(1)]
    eq_all = s.index_select(0, rr) == v[:, None]
    earlier = torch.arange(g, device=s.device)[None, :] < gidx[:, None]
    ranks[rr, kk] += (eq_all & neg_mask & earlier).sum(1)
    if need_groups:
        ge[rr, kk] = g - le_all[rr, kk] + eq_all.sum(1)
    return ranks, ge, pos_ge


# ---------------------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------------------

def _to_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")


def _np_words(codes: torch.Tensor) -> np.ndarray:
    """Packed uint8 codes as uint64 words (zero-padded to a multiple of 8 bytes)."""
    a = codes.cpu().numpy()
    a = np.pad(a, ((0, 0), (0, (-a.shape[1]) % 8)))
    return np.ascontiguousarray(a).view(np.uint64)


def _np_hamming_words(qw: np.ndarray, gw: np.ndarray) -> np.ndarray:
    """Hamming distances (int32 (n, G)) of uint64 words: xor + ``np.bitwise_count``."""
    n, g = qw.shape[0], gw.shape[0]
    out = np.empty((n, g), dtype=np.int32)
    gcols = [np.ascontiguousarray(gw[:, w]) for w in range(gw.shape[1])]

    def job(lo: int, hi: int) -> None:
        block = 32  # rows per step: the xor words stay in cache
        x = np.empty((block, g), dtype=np.uint64)
        c = np.empty((block, g), dtype=np.uint8)
        for r in range(lo, hi, block):
            k = min(block, hi - r)
            for w, gcol in enumerate(gcols):
                np.bitwise_xor(qw[r:r + k, w, None], gcol[None, :], out=x[:k])
                np.bitwise_count(x[:k], out=c[:k])
                if w == 0:
                    out[r:r + k] = c[:k]
                else:
                    out[r:r + k] += c[:k]

    step = max(1, -(-n // _workers()))
    _parallel([lambda lo=lo: job(lo, min(n, lo + step)) for lo in range(0, n, step)])
    return out


def _t_hamming(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """Hamming distances (int32) in torch: xor, SWAR popcount per uint8 byte, summed."""
    acc = torch.zeros(query.shape[0], gallery.shape[0], dtype=torch.int32,
                      device=query.device)
    for b in range(query.shape[1]):
        x = query[:, b, None] ^ gallery[None, :, b]
        x = x - ((x >> 1) & 0x55)
        x = (x & 0x33) + ((x >> 2) & 0x33)
        x = (x + (x >> 4)) & 0x0F
        acc += x
    return acc


def hamming_distances(query: ArrayLike, gallery: ArrayLike,
                      use_numpy: bool | None = None) -> torch.Tensor:
    """Hamming distances (int32, (Q, G)) between packed uint8 codes.

    Codes are ``numpy.packbits`` rows (big-endian bits within a byte, the layout of faiss
    ``IndexBinaryFlat``); distance = popcount(q xor g). On CPU with numpy >= 2 the popcount
    is ``np.bitwise_count`` on 64-bit words (threaded over row blocks; ~25x faster than
    torch bit tricks on CPU); otherwise (CUDA, older numpy) a SWAR popcount on uint8 bytes
    in torch: ``x - ((x >> 1) & 0x55)``, ``(x & 0x33) + ((x >> 2) & 0x33)``,
    ``(x + (x >> 4)) & 0x0F``, summed over bytes. Both are exact.
    """
    q = _to_tensor(query, "query")
    g = _to_tensor(gallery, "gallery")
    if use_numpy is None:
        use_numpy = q.device.type == "cpu" and hasattr(np, "bitwise_count")
    if use_numpy:
        return torch.from_numpy(_np_hamming_words(_np_words(q), _np_words(g)))
    return _t_hamming(q, g.to(q.device))


def _all_finite(x: torch.Tensor) -> bool:
    if x.device.type == "cpu":
        return bool(np.isfinite(x.numpy()).all())
    return bool(torch.isfinite(x).all())


class _Scorer:
    """Features prepared once; ``chunk(rows)`` gives float32 scores (higher = closer) or,
    for ``hamming``, int32 distances (lower = closer)."""

    def __init__(self, query: ArrayLike, gallery: ArrayLike, distance: Distance,
                 device: torch.device, use_numpy: bool) -> None:
        if distance not in ("cosine", "euclidean", "hamming"):
            raise ValueError(f"distance must be 'cosine', 'euclidean' or 'hamming', "
                             f"got {distance!r}")
        q = _to_tensor(query, "query")
        g = _to_tensor(gallery, "gallery")
        if q.ndim != 2 or g.ndim != 2:
            raise ValueError(f"query and gallery must be 2-D, got shapes {tuple(q.shape)} "
                             f"and {tuple(g.shape)}")
        if q.shape[1] != g.shape[1]:
            raise ValueError(f"query and gallery widths differ: {q.shape[1]} vs {g.shape[1]}")
        self.distance = distance
        self.num_query, self.num_gallery = q.shape[0], g.shape[0]
        self.integer = distance == "hamming"
        self.code_bits: int | None = None
        self.use_numpy = use_numpy
        if distance == "hamming":
            if q.dtype != torch.uint8 or g.dtype != torch.uint8:
                raise ValueError("hamming distance needs packed uint8 codes "
                                 f"(numpy.packbits layout), got {q.dtype} and {g.dtype}")
            self.code_bits = (8 * q.shape[1]).bit_length()  # distances lie in [0, 8 * bytes]
            self.np_words = use_numpy and hasattr(np, "bitwise_count")
            if self.np_words:
                self.q, self.g = _np_words(q), _np_words(g)
            else:
                self.q, self.g = q.to(device), g.to(device)
            return
        if not (q.is_floating_point() and g.is_floating_point()):
            raise ValueError(f"{distance} distance needs float features, got {q.dtype} and "
                             f"{g.dtype} (packed binary codes need distance='hamming')")
        q = q.to(device=device, dtype=torch.float32)
        g = g.to(device=device, dtype=torch.float32)
        if not (_all_finite(q) and _all_finite(g)):
            raise ValueError("features contain NaN or infinite values")
        if distance == "cosine":
            q, g = F.normalize(q, dim=1), F.normalize(g, dim=1)
        else:
            self.q_sq = (q * q).sum(1)
            self.g_sq = (g * g).sum(1)
        self.q, self.g = q, g

    def chunk(self, rows: np.ndarray) -> torch.Tensor:
        if self.distance == "hamming":
            if self.np_words:
                return torch.from_numpy(_np_hamming_words(self.q[rows], self.g))
            return _t_hamming(self.q[torch.from_numpy(rows).to(self.q.device)], self.g)
        idx = torch.from_numpy(rows).to(self.q.device)
        q = self.q.index_select(0, idx)
        if self.distance == "cosine":
            return q @ self.g.T
        # ||q - g||^2 = |q|^2 + |g|^2 - 2 q.g, clamped at 0 against rounding
        d2 = torch.addmm(self.g_sq[None, :], q, self.g.T, beta=1.0, alpha=-2.0)
        d2 += self.q_sq.index_select(0, idx)[:, None]
        return d2.clamp_(min=0.0).sqrt_().neg_()


class _PrecomputedScorer:
    """A given (Q, G) score matrix (higher = closer), served by rows as float32."""

    integer = False
    code_bits = None
    distance = "precomputed"

    def __init__(self, scores: ArrayLike, device: torch.device) -> None:
        s = _to_tensor(scores, "scores")
        if s.ndim != 2:
            raise ValueError(f"scores must be 2-D (Q, G), got shape {tuple(s.shape)}")
        self.s = s.to(device=device, dtype=torch.float32)
        self.num_query, self.num_gallery = self.s.shape

    def chunk(self, rows: np.ndarray) -> torch.Tensor:
        return self.s.index_select(0, torch.from_numpy(rows).to(self.s.device))


class _FunctionScorer:
    """Scores computed on demand: ``fn(rows) -> (len(rows), G)`` (higher = closer)."""

    integer = False
    code_bits = None
    distance = "precomputed"

    def __init__(self, fn: Callable[[np.ndarray], ArrayLike], num_query: int,
                 num_gallery: int, device: torch.device) -> None:
        self.fn, self.device = fn, device
        self.num_query, self.num_gallery = num_query, num_gallery

    def chunk(self, rows: np.ndarray) -> torch.Tensor:
        s = _to_tensor(self.fn(rows), "scores")
        if tuple(s.shape) != (len(rows), self.num_gallery):
            raise ValueError(f"score function gave shape {tuple(s.shape)} for {len(rows)} "
                             f"rows, expected ({len(rows)}, {self.num_gallery})")
        s = s.to(device=self.device, dtype=torch.float32)
        if not _all_finite(s):
            raise ValueError("scores contain NaN or infinite values")
        return s


def pairwise_scores(query: ArrayLike, gallery: ArrayLike, distance: Distance = "cosine",
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """The full (Q, G) float32 score matrix the evaluator ranks (higher = closer).

    cosine: dot product of L2-normalized rows; euclidean: ``-||q - g||`` (via
    ``|q|^2 + |g|^2 - 2 q.g``); hamming: ``-`` Hamming distance of packed uint8 codes.
    """
    dev = torch.device(device)
    sc = _Scorer(query, gallery, distance, dev, use_numpy=dev.type == "cpu")
    out = sc.chunk(np.arange(sc.num_query))
    return -out.to(torch.float32) if sc.integer else out


# ---------------------------------------------------------------------------------------
# The evaluator.
# ---------------------------------------------------------------------------------------

def auto_chunk_size(num_gallery: int, budget_bytes: int = MEMORY_BUDGET_BYTES) -> int:
    """Queries per chunk so that the (chunk, G) work tensors stay within ``budget_bytes``."""
    return max(1, budget_bytes // (_BYTES_PER_CELL * max(1, num_gallery)))


def _parse_metrics(metrics: Sequence[str] | str) -> list[MetricSpec]:
    if isinstance(metrics, str):
        metrics = [metrics]
    specs: dict[str, MetricSpec] = {}
    for m in metrics:
        spec = parse_metric(m)
        specs.setdefault(spec.name, spec)
    if not specs:
        raise ValueError("no metric requested")
    return list(specs.values())


def _labels(x: ArrayLike | Sequence[int], n: int, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(a.shape)}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be integer labels, got {a.dtype}")
    return a.astype(np.int64)


def _run(scorer: _Scorer | _PrecomputedScorer | _FunctionScorer, query_labels: ArrayLike,
         gallery_labels: ArrayLike, metrics: Sequence[str] | str, chunk_size: int | None,
         device: torch.device, per_class: bool, use_numpy: bool) -> EvalResult:
    specs = _parse_metrics(metrics)
    nq, ng = scorer.num_query, scorer.num_gallery
    if nq == 0 or ng == 0:
        raise ValueError(f"need at least one query and one gallery item, got {nq} and {ng}")
    ql = _labels(query_labels, nq, "query_labels")
    gl = _labels(gallery_labels, ng, "gallery_labels")
    if chunk_size is None:
        chunk_size = auto_chunk_size(ng)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    need_groups = any(s.needs_tie_groups for s in specs)
    code_bits = scorer.code_bits
    # Only top-K metrics, K well below G: partition instead of a full sort (numpy path).
    ks = [s.k for s in specs if s.k is not None]
    top = max(ks) if len(ks) == len(specs) and 4 * max(ks) <= ng else None

    order = np.argsort(ql, kind="stable")  # queries grouped by class
    sorted_labels = ql[order]
    values = {s.name: np.zeros(nq) for s in specs}
    positives: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # label -> (indices, neg mask)
    positives_t: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    no_pos = int(np.isin(ql, gl, invert=True).sum())

    def store(dest: np.ndarray, ranked: Ranked) -> None:
        ranks, ge, pos_ge = ranked
        for spec in specs:
            values[spec.name][dest] = compute_metric(spec, ranks, ng, ge, pos_ge)

    def numpy_job(s: np.ndarray, dest: np.ndarray, label: int) -> Callable[[], None]:
        pos_idx, neg_mask = positives[label]

        def job() -> None:
            if scorer.integer:
                store(dest, _np_ranks_keys(s, pos_idx, code_bits, need_groups))
            else:
                store(dest, _np_ranks_float(s, pos_idx, neg_mask, need_groups, top))

        return job

    for start in range(0, nq, chunk_size):
        rows = order[start:start + chunk_size]
        scores = scorer.chunk(rows)
        labels = sorted_labels[start:start + chunk_size]
        cut = np.flatnonzero(np.diff(labels)) + 1
        bounds = np.concatenate(([0], cut, [len(labels)]))
        # Pieces of about chunk / (2 * workers) rows, within one class segment each.
        piece = max(8, -(-len(rows) // (2 * _workers())))
        jobs: list[Callable[[], None]] = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            label = int(labels[a])
            if label not in positives:
                neg_mask = gl != label
                positives[label] = (np.flatnonzero(~neg_mask), neg_mask)
            if positives[label][0].size == 0:
                continue  # every metric is 0 for a query without positives
            if use_numpy:
                s_np = scores.numpy()
                for lo in range(a, b, piece):
                    hi = min(b, lo + piece)
                    jobs.append(numpy_job(s_np[lo:hi], rows[lo:hi], label))
                continue
            if label not in positives_t:
                pos_idx, neg_mask = positives[label]
                positives_t[label] = (torch.from_numpy(pos_idx).to(device),
                                      torch.from_numpy(neg_mask).to(device))
            pos_t, neg_t = positives_t[label]
            seg = scores[a:b]
            if scorer.integer:
                ranked_t = _t_ranks_keys(seg, pos_t, code_bits, need_groups)
            else:
                ranked_t = _t_ranks_float(seg, pos_t, neg_t, need_groups)
            store(rows[a:b], tuple(None if x is None else x.cpu().numpy() for x in ranked_t))
        _parallel(jobs)
        del scores

    means = {name: float(v.mean()) for name, v in values.items()}
    per_class_out: dict[str, dict[int, float]] = {}
    if per_class:
        uniq, inverse = np.unique(ql, return_inverse=True)
        n_per = np.bincount(inverse, minlength=len(uniq))
        for name, v in values.items():
            sums = np.bincount(inverse, weights=v, minlength=len(uniq))
            per_class_out[name] = {int(c): float(x) for c, x in zip(uniq, sums / n_per)}
    return EvalResult(
        metrics=means,
        per_class=per_class_out,
        formulas={s.name: s.formula for s in specs},
        num_queries=nq,
        num_gallery=ng,
        distance=scorer.distance,
        num_queries_without_positives=no_pos,
        per_query=values,
    )


def evaluate_retrieval(
    query: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    gallery: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    metrics: Sequence[str] = ("map@all", "p@100"),
    *,
    distance: Literal["cosine", "euclidean", "hamming"] = "cosine",
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    per_class: bool = False,
) -> EvalResult:
    """Rank the gallery for every query and compute the named metrics, exactly.

    Args:
        query: (Q, D) float features, or (Q, B/8) uint8 packed codes for ``hamming``.
        query_labels: (Q,) integer class labels.
        gallery: (G, D) float features, or (G, B/8) uint8 packed codes.
        gallery_labels: (G,) integer class labels; a gallery item is relevant to a query
            when the labels are equal.
        metrics: names from :data:`zsbir.evaluation.METRICS` (e.g. ``map@all``, ``p@100``,
            ``map@200-sempcyc``); see :mod:`zsbir.evaluation.metrics` for the formulas.
        distance: ``cosine`` (L2-normalize both sides, score = dot product; ranks as SAKE's
            negative euclidean distance of normalized features), ``euclidean`` (score =
            ``-||q - g||``) or ``hamming`` (score = ``-`` Hamming distance of
            ``numpy.packbits`` codes, the layout of faiss ``IndexBinaryFlat``).
        chunk_size: queries per chunk; ``None`` chooses it from
            :data:`MEMORY_BUDGET_BYTES`.
        device: where scores are computed (``"cpu"``, ``"cuda"``...); off-CPU the ranking
            runs there too, in torch.
        per_class: also report each metric's mean per query class.

    Scores are float32. Ties are broken by gallery index (rank-based formulas) or grouped
    (sklearn-style); a query whose class has no gallery item scores 0 and counts in the
    means. ``EvalResult.per_query`` holds the per-query values.
    """
    dev = torch.device(device)
    use_numpy = dev.type == "cpu"
    scorer = _Scorer(query, gallery, distance, dev, use_numpy)
    return _run(scorer, query_labels, gallery_labels, metrics, chunk_size, dev, per_class,
                use_numpy)


def evaluate_scores(
    scores: torch.Tensor | np.ndarray,
    query_labels: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    metrics: Sequence[str] = ("map@all", "p@100"),
    *,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    per_class: bool = False,
) -> EvalResult:
    """:func:`evaluate_retrieval` from a precomputed (Q, G) score matrix (higher = closer).

    Scores are ranked as float32 with the same tie rules.
    """
    dev = torch.device(device)
    scorer = _PrecomputedScorer(scores, dev)
    return _run(scorer, query_labels, gallery_labels, metrics, chunk_size, dev, per_class,
                use_numpy=dev.type == "cpu")


def evaluate_score_fn(
    score_fn: Callable[[np.ndarray], torch.Tensor | np.ndarray],
    query_labels: torch.Tensor | np.ndarray,
    gallery_labels: torch.Tensor | np.ndarray,
    metrics: Sequence[str] = ("map@all", "p@100"),
    *,
    chunk_size: int | None = None,
    device: str | torch.device = "cpu",
    per_class: bool = False,
) -> EvalResult:
    """:func:`evaluate_scores` with the scores computed chunk by chunk:
    ``score_fn(rows)`` returns the (len(rows), G) scores (higher = closer) of the queries
    ``rows`` (an int64 index array), so the full (Q, G) matrix never exists. A query's
    scores must not depend on which other rows are asked with it (rerankers:
    :meth:`zsbir.rerankers.Reranker.score_rows`).
    """
    dev = torch.device(device)
    ql = query_labels.detach().cpu().numpy() if isinstance(query_labels, torch.Tensor) \
        else np.asarray(query_labels)
    gl = gallery_labels.detach().cpu().numpy() if isinstance(gallery_labels, torch.Tensor) \
        else np.asarray(gallery_labels)
    scorer = _FunctionScorer(score_fn, len(ql), len(gl), dev)
    return _run(scorer, query_labels, gallery_labels, metrics, chunk_size, dev, per_class,
                use_numpy=dev.type == "cpu")
