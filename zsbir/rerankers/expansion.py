"""Query expansion and database-side augmentation (Radenović, Tolias & Chum, "Fine-tuning
CNN Image Retrieval with No Human Annotation", TPAMI 2019, Sec. "Query expansion" and
"Database-side augmentation"; AQE: Chum et al., ICCV 2007; DBA: Arandjelović & Zisserman,
CVPR 2012).

Cross-domain: the query is a sketch and the gallery photos, so a sketch query is expanded
with its *photo* neighbours (its top-k in the gallery), which moves it towards the photo
domain; DBA averages each photo with its photo neighbours. Nothing sees a label.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from zsbir.constraints import Range
from zsbir.registry import rerankers

from .base import Reranker, topk_rows

__all__ = ["AlphaQE", "DatabaseAugmentation", "alpha_weights", "expand"]


def alpha_weights(sims: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max(s, 0) ** alpha`` (``alpha = 0``: every neighbour weighs 1, AQE)."""
    if alpha == 0:
        return torch.ones_like(sims)
    return sims.clamp(min=0).pow(alpha)


def expand(x: torch.Tensor, nbr_sims: torch.Tensor, nbr_idx: torch.Tensor,
           base: torch.Tensor, alpha: float) -> torch.Tensor:
    """``normalize(x + sum_i w_i base[nbr_idx_i])``, ``w_i = max(x . base_i, 0) ** alpha``
    (the item itself has weight ``1 = (x . x) ** alpha``)."""
    w = alpha_weights(nbr_sims, alpha)  # (n, k)
    agg = torch.einsum("nk,nkd->nd", w, base[nbr_idx])
    return F.normalize(x + agg, dim=1)


class AlphaQE(Reranker):
    """alpha-weighted query expansion, alphaQE (Radenović et al., TPAMI 2019).

    ``q' = normalize(q + sum_{i=1..k} w_i g_(i))``, ``w_i = (q^T g_(i))^alpha`` over the
    query's ``k`` nearest gallery items ``g_(i)`` (negative similarities weigh 0), then
    ``score(q, g) = q'^T g``. ``alpha = 0`` is average query expansion (AQE, Chum et al.
    2007). Cost per query: one (1, G) similarity row, a top-k and a second (1, G) row.
    """

    def __init__(self, k: Annotated[int, Range(ge=1)] = 5,
                 alpha: Annotated[float, Range(ge=0)] = 3.0,
                 chunk_size: Annotated[int, Range(ge=1)] = 1024, ctx: Any = None):
        super().__init__(chunk_size, ctx)
        self.k, self.alpha = k, float(alpha)

    @property
    def tag(self) -> str:
        return f"aqe{self.k}" if self.alpha == 0 else f"alpha_qe{self.k}"

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        g = self.gallery
        s = q @ g.T
        v, i = torch.topk(s, min(self.k, g.shape[0]), dim=1)
        return expand(q, v, i, g, self.alpha) @ g.T


@rerankers.register("alpha_qe")
def alpha_qe(k: Annotated[int, Range(ge=1)] = 5, alpha: Annotated[float, Range(ge=0)] = 3.0,
             chunk_size: Annotated[int, Range(ge=1)] = 1024, ctx: Any = None) -> AlphaQE:
    """alpha-weighted query expansion (Radenović et al., TPAMI 2019):
    ``q' = normalize(q + sum_{i<=k} (q^T g_i)^alpha g_i)`` over the sketch's k nearest
    photos; score ``q'^T g``."""
    return AlphaQE(k, alpha, chunk_size, ctx)


@rerankers.register("aqe")
def aqe(k: Annotated[int, Range(ge=1)] = 5, chunk_size: Annotated[int, Range(ge=1)] = 1024,
        ctx: Any = None) -> AlphaQE:
    """Average query expansion (Chum et al., ICCV 2007; alphaQE with alpha = 0, Radenović
    et al., TPAMI 2019): ``q' = normalize(q + sum_{i<=k} g_i)`` over the sketch's k nearest
    photos; score ``q'^T g``."""
    return AlphaQE(k, 0.0, chunk_size, ctx)


class DatabaseAugmentation(Reranker):
    """Database-side augmentation, alphaDBA (Radenović et al., TPAMI 2019; Arandjelović &
    Zisserman, CVPR 2012).

    Fit (gallery only, unlabeled): ``g' = normalize(g + sum_{i=1..k} (g^T g_(i))^alpha
    g_(i))`` over each photo's ``k`` nearest other photos. Score: ``q^T g'``; with
    ``qe_k > 0`` the query is then expanded on the augmented gallery (alphaQE,
    ``q' = normalize(q + sum_{i<=qe_k} (q^T g'_i)^alpha g'_i)``, score ``q'^T g'``), the
    paper's "alphaQE + alphaDBA". Fit cost: a G x G similarity in chunks (O(G^2 d)), memory
    (chunk, G); scoring as alphaQE.
    """

    def __init__(self, k: int = 5, alpha: float = 3.0, qe_k: int = 0,
                 chunk_size: int = 1024, ctx: Any = None):
        super().__init__(chunk_size, ctx)
        self.k, self.alpha, self.qe_k = k, float(alpha), qe_k
        self.augmented: torch.Tensor | None = None

    @property
    def tag(self) -> str:
        return f"dba{self.k}" + (f"+qe{self.qe_k}" if self.qe_k else "")

    def _fit(self, gallery: torch.Tensor, queries: torch.Tensor | None) -> None:
        if gallery.shape[0] < 2:
            self.augmented = gallery
            return
        v, i = topk_rows(gallery, gallery, self.k, self.chunk_size, exclude_self=True)
        self.augmented = expand(gallery, v, i, gallery, self.alpha)

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        g = self.augmented
        s = q @ g.T
        if self.qe_k == 0:
            return s
        v, i = torch.topk(s, min(self.qe_k, g.shape[0]), dim=1)
        return expand(q, v, i, g, self.alpha) @ g.T


@rerankers.register("dba")
def dba(k: Annotated[int, Range(ge=1)] = 5, alpha: Annotated[float, Range(ge=0)] = 3.0,
        qe_k: Annotated[int, Range(ge=0)] = 0,
        chunk_size: Annotated[int, Range(ge=1)] = 1024,
        ctx: Any = None) -> DatabaseAugmentation:
    """Database-side augmentation, alphaDBA (Radenović et al., TPAMI 2019):
    ``g' = normalize(g + sum_{i<=k} (g^T g_i)^alpha g_i)`` over each photo's k nearest
    photos; score ``q^T g'`` (``qe_k > 0``: then alphaQE on the augmented gallery)."""
    return DatabaseAugmentation(k, alpha, qe_k, chunk_size, ctx)
