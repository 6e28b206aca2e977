"""Rank kernels: the ranks of a chunk's positives (and, for the sklearn-style formulas, the
sizes of their tie groups) from its score rows, in numpy (CPU, one block of rows per job on
:mod:`zsbir.evaluation.pool`) and in torch (any device). The algorithm and its exactness:
:mod:`zsbir.evaluation.ranking`.
"""

from __future__ import annotations

import numpy as np
import torch

__all__: list[str] = []


# ---------------------------------------------------------------------------------------
# Ranks of the positives, numpy (CPU). Each call handles a block of rows of one class
# segment; blocks run in a thread pool (numpy releases the GIL; no OpenMP team to stall
# when the machine is oversubscribed).
# ---------------------------------------------------------------------------------------

Ranked = tuple[np.ndarray, "np.ndarray | None", "np.ndarray | None"]


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
