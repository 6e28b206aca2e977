"""k-reciprocal re-ranking with the Jaccard distance (Zhong, Zheng, Cao & Li, "Re-ranking
Person Re-identification with k-reciprocal Encoding", CVPR 2017).

The paper, with ``N(p, k)`` the ``k`` nearest neighbours of ``p`` (``p`` itself first, so
``k + 1`` items) and ``d`` the original distance:

- k-reciprocal neighbours: ``R(p, k) = {g in N(p, k) : p in N(g, k)}``;
- robust set: ``R*(p, k) = R(p, k) ∪ R(c, k/2)`` for every ``c in R(p, k)`` with
  ``|R(p, k) ∩ R(c, k/2)| > 2/3 |R(c, k/2)|``;
- encoding: ``V_p[g] = exp(-d(p, g))`` for ``g in R*(p, k1)``, else 0, normalized to sum 1;
- local query expansion: ``V_p <- 1/k2 sum_{g in N(p, k2 - 1)} V_g`` (``p`` itself and its
  ``k2 - 1`` nearest gallery items);
- Jaccard distance: ``d_J(p, g) = 1 - sum_j min(V_p[j], V_g[j]) / sum_j max(V_p[j], V_g[j])``;
- final: ``d*(p, g) = (1 - lambda) d_J(p, g) + lambda d(p, g)``; score ``-d*``.

Choices here (documented deviations): ``d(p, g) = 1 - cos(p, g)`` (the paper: Euclidean /
Mahalanobis, the authors' code: squared Euclidean divided by its column maximum); the
vectors ``V`` live on the gallery only (the authors' code also keeps only gallery columns
in the Jaccard sum); and the method is *inductive*: gallery neighbourhoods are computed on
the gallery alone (the queries never enter them), except that the query's own reciprocity
test asks whether the query would enter a gallery item's ``N(g, k1)``, i.e. whether
``cos(q, g)`` reaches ``g``'s ``k1``-th neighbour similarity. So one query's scores do not
depend on the other queries (the evaluator scores in chunks) and nothing sees a label.

Cross-domain: a sketch is rarely as close to a photo as that photo's photo neighbours are,
so ``R(q)`` of a sketch is often small or empty; the local query expansion (over the
sketch's *photo* neighbours) still gives it a photo-domain encoding.

Cost (``G`` gallery items, ``L ≈ (k1 + 1)(k1/2 + 2)`` padded entries per row): fit is one
G x G similarity in chunks (O(G^2 d) time, (chunk, G) memory; with ``approximate = true``
faiss HNSW neighbours instead, O(G log G)), plus O(G L k2) sparse vectors. Scoring a query
is a (1, G) similarity row, O(k1^2 k1/2) set tests, and a Jaccard sum over the inverted
index, O(nnz(V_q) * mean column length). Measured at SK-SH size: benchmarks/bench_rerank.py.
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch

from zsbir.constraints import Range
from zsbir.registry import rerankers

from .base import Reranker, topk_rows

__all__ = ["KReciprocal"]

#: Pairs handled at once in the Jaccard sum over the inverted index (bounds its memory).
_PAIR_BUDGET = 1 << 21


def _dedupe(idx: torch.Tensor, valid: torch.Tensor, sentinel: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of indices with a validity mask -> sorted rows where each index appears once."""
    keyed = torch.where(valid, idx, torch.full_like(idx, sentinel))
    s, _ = torch.sort(keyed, dim=1)
    keep = s != sentinel
    keep[:, 1:] &= s[:, 1:] != s[:, :-1]
    return torch.where(keep, s, torch.zeros_like(s)), keep


class KReciprocal(Reranker):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017); see the module docstring."""

    def __init__(self, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                 approximate: bool = False, chunk_size: int = 256, ctx: Any = None):
        super().__init__(chunk_size, ctx)
        self.k1, self.k2, self.lambda_value = k1, k2, float(lambda_value)
        self.approximate = approximate

    @property
    def tag(self) -> str:
        return f"k_reciprocal{self.k1}" + ("_approx" if self.approximate else "")

    # ------------------------------------------------------------------ fit (gallery)
    def _neighbours(self, g: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, k + 1) neighbour indices and similarities, each row's own index first."""
        n = g.shape[0]
        if k == 0:
            own = torch.arange(n, device=g.device)[:, None]
            return own, torch.ones((n, 1), device=g.device)
        if self.approximate:
            import faiss

            x = np.ascontiguousarray(g.cpu().numpy(), dtype=np.float32)
            index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efSearch = max(64, 2 * (k + 1))
            index.add(x)
            _, found = index.search(x, k + 1)
            found = torch.from_numpy(found).to(g.device)
            own = torch.arange(n, device=g.device)[:, None]
            # drop the item itself (and faiss's -1 fill), keep the k best others
            bad = (found == own) | (found < 0)
            order = torch.sort(bad.to(torch.int8), dim=1, stable=True).indices[:, :k]
            idx = torch.cat([own, torch.gather(found, 1, order)], dim=1)
            sims = torch.cat([torch.einsum("nd,nkd->nk", g[lo:lo + 1024], g[idx[lo:lo + 1024]])
                              for lo in range(0, n, 1024)])
            return idx, sims
        v, i = topk_rows(g, g, k, self.chunk_size, exclude_self=True)
        own = torch.arange(n, device=g.device)[:, None]
        return (torch.cat([own, i], dim=1),
                torch.cat([(g * g).sum(1, keepdim=True), v], dim=1))

    @staticmethod
    def _reciprocal(nbr: torch.Tensor, k: int) -> torch.Tensor:
        """Mask (G, k + 1): ``nbr[g, j]`` is a k-reciprocal neighbour of ``g``."""
        t = nbr[:, :k + 1]
        if k == 0:
            return torch.ones_like(t, dtype=torch.bool)
        own = torch.arange(t.shape[0], device=t.device)[:, None, None]
        return (t[t] == own).any(-1)

    def _fit(self, gallery: torch.Tensor, queries: torch.Tensor | None) -> None:
        g = gallery
        n = g.shape[0]
        self.kk1 = kk1 = min(self.k1, n - 1)
        self.kh = kh = min(int(round(self.k1 / 2)), kk1)
        self.kq_gallery = min(self.k2 - 1, n - 1)  # neighbours in a gallery item's LQE
        nbr, nsim = self._neighbours(g, max(kk1, self.kq_gallery))
        self.nbr, self.nsim = nbr, nsim
        # R(g, k1) and R(g, k1/2), as masks over the neighbour lists
        self.r_mask = self._reciprocal(nbr, kk1)  # (G, kk1 + 1)
        self.rh_mask = self._reciprocal(nbr, kh)  # (G, kh + 1)
        # reciprocity thresholds for a query: q enters N(g, k) iff cos(q, g) >= t[g]
        self.t1 = nsim[:, kk1]
        self.th = nsim[:, kh]
        rows, vals = [], []
        for lo in range(0, n, self.chunk_size):
            sl = slice(lo, min(n, lo + self.chunk_size))
            r_idx, r_ok = nbr[sl], self.r_mask[sl]
            r_idx = r_idx[:, :kk1 + 1]
            idx, ok = self._robust_set(r_idx, r_ok, exclude_first=True)
            sims = torch.gather(g[sl] @ g.T, 1, idx)
            rows.append(idx)
            vals.append(self._encode(sims, ok))
        self.v_idx, self.v_val = torch.cat(rows), torch.cat(vals)  # V before expansion
        self._build_expanded(n)

    def _robust_set(self, r_idx: torch.Tensor, r_ok: torch.Tensor, exclude_first: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """R*(p) from R(p) (indices (m, w) with a mask): add R(c, k1/2) of each candidate
        c in R(p) that shares more than 2/3 of it with R(p). Returns deduplicated, sorted
        (m, L) indices and their mask."""
        cand = r_idx[:, 1:] if exclude_first else r_idx  # c = p itself adds nothing new:
        cand_ok = r_ok[:, 1:] if exclude_first else r_ok  # R(p, k/2) ⊂ R(p, k)
        h_idx = self.nbr[cand][..., :self.kh + 1]  # (m, w, kh + 1)
        h_ok = self.rh_mask[cand]  # (m, w, kh + 1)
        member = (h_idx[..., None] == r_idx[:, None, None, :]) & r_ok[:, None, None, :]
        inter = (member.any(-1) & h_ok).sum(-1)  # |R(c, k/2) ∩ R(p, k)|
        size = h_ok.sum(-1)
        take = cand_ok & (3 * inter > 2 * size)  # > 2/3 |R(c, k/2)|
        all_idx = torch.cat([r_idx, h_idx.flatten(1)], dim=1)
        all_ok = torch.cat([r_ok, (h_ok & take[..., None]).flatten(1)], dim=1)
        return _dedupe(all_idx, all_ok, self.gallery.shape[0])

    @staticmethod
    def _encode(sims: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        """V weights ``exp(-d)``, ``d = 1 - cos``, on the set, normalized to sum 1."""
        w = torch.where(ok, torch.exp(sims - 1.0), torch.zeros_like(sims))
        total = w.sum(1, keepdim=True)
        return torch.where(total > 0, w / total.clamp(min=1e-30), w)

    def _build_expanded(self, n: int) -> None:
        """Gallery V after local query expansion, as an inverted index (column -> rows)."""
        e_rows, e_cols, e_vals = [], [], []
        block = max(1, (1 << 22) // max(1, (self.kq_gallery + 1) * self.v_idx.shape[1]))
        for lo in range(0, n, block):  # row blocks bound the (rows, k2 * L) work arrays
            src = self.nbr[lo:lo + block, :self.kq_gallery + 1]  # item + its k2 - 1 nearest
            cols = self.v_idx[src].flatten(1)  # (rows, k2 * L)
            vals = self.v_val[src].flatten(1) / (self.kq_gallery + 1)
            rows = torch.arange(lo, lo + src.shape[0], device=cols.device)[:, None]
            nz = vals > 0
            key = rows.expand_as(cols)[nz] * n + cols[nz]
            uniq, inv = torch.unique(key, return_inverse=True)
            e_vals.append(torch.zeros(uniq.shape[0], device=vals.device)
                          .index_add_(0, inv, vals[nz]))
            e_rows.append(uniq // n)
            e_cols.append(uniq % n)
        e_row, e_col, summed = torch.cat(e_rows), torch.cat(e_cols), torch.cat(e_vals)
        order = torch.argsort(e_col, stable=True)
        self.inv_rows, self.inv_vals = e_row[order], summed[order]
        counts = torch.bincount(e_col, minlength=n)
        self.col_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.g_mass = torch.zeros(n, device=vals.device).index_add_(0, e_row, summed)

    # ------------------------------------------------------------------ scoring
    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        g = self.gallery
        n = g.shape[0]
        s = q @ g.T  # (m, G)
        kk1 = self.kk1
        if kk1 >= 1:
            top_v, top_i = torch.topk(s, kk1, dim=1)
            r_ok = top_v >= self.t1[top_i]  # q would enter N(g, k1): reciprocal
            idx, ok = self._robust_set(top_i, r_ok, exclude_first=False)
            w = self._encode(torch.gather(s, 1, idx), ok)
            vq = torch.zeros_like(s).scatter_add_(1, idx, w)
        else:
            vq = torch.zeros_like(s)
        kq = min(self.k2 - 1, n)
        if kq > 0:  # local query expansion over the query's k2 - 1 nearest gallery items
            nn = torch.topk(s, kq, dim=1).indices
            vq.scatter_add_(1, self.v_idx[nn].flatten(1), self.v_val[nn].flatten(1))
        vq /= kq + 1
        d_j = self._jaccard(vq)
        return -((1 - self.lambda_value) * d_j + self.lambda_value * (1.0 - s))

    def _jaccard(self, vq: torch.Tensor) -> torch.Tensor:
        """``1 - sum min / sum max`` of every query row against every gallery V, through
        the inverted index: only columns where both are non-zero contribute to the min."""
        m, n = vq.shape
        r, c = torch.nonzero(vq, as_tuple=True)
        a = vq[r, c]
        lo_ptr, hi_ptr = self.col_ptr[c], self.col_ptr[c + 1]
        counts = hi_ptr - lo_ptr
        mins = torch.zeros(m * n, device=vq.device)
        ends = counts.cumsum(0)
        start = 0
        while start < len(counts):
            base = ends[start - 1] if start else ends.new_zeros(())
            stop = int(torch.searchsorted(ends, base + _PAIR_BUDGET, right=True))
            stop = max(stop, start + 1)
            cnt = counts[start:stop]
            rep = torch.repeat_interleave(torch.arange(start, stop, device=vq.device), cnt)
            offs = torch.arange(int(cnt.sum()), device=vq.device) - \
                torch.repeat_interleave(cnt.cumsum(0) - cnt, cnt)
            pos = lo_ptr[rep] + offs
            val = torch.minimum(a[rep], self.inv_vals[pos])
            mins.index_add_(0, r[rep] * n + self.inv_rows[pos], val)
            start = stop
        mins = mins.view(m, n)
        maxs = vq.sum(1, keepdim=True) + self.g_mass[None, :] - mins
        return torch.where(maxs > 0, 1.0 - mins / maxs.clamp(min=1e-30),
                           torch.ones_like(mins))


@rerankers.register("k_reciprocal")
def k_reciprocal(k1: Annotated[int, Range(ge=1)] = 20, k2: Annotated[int, Range(ge=1)] = 6,
                 lambda_value: Annotated[float, Range(ge=0, le=1)] = 0.3,
                 approximate: bool = False,
                 chunk_size: Annotated[int, Range(ge=1)] = 256,
                 ctx: Any = None) -> KReciprocal:
    """k-reciprocal re-ranking with the Jaccard distance (Zhong et al., CVPR 2017):
    ``d* = (1 - lambda) d_J(V_q, V_g) + lambda (1 - cos)``, V the k-reciprocal encoding
    with local query expansion over the sketch's photo neighbours; ``approximate``: gallery
    neighbours from faiss HNSW (for galleries beyond ~20k)."""
    return KReciprocal(k1, k2, lambda_value, approximate, chunk_size, ctx)
