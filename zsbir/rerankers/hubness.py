"""Hubness and domain-gap corrections.

- CSLS, cross-domain similarity local scaling (Conneau, Lample, Ranzato, Denoyer & Jégou,
  "Word Translation Without Parallel Data", ICLR 2018, Sec. 2.3):
  ``CSLS(q, g) = 2 cos(q, g) - r_G(q) - r_Q(g)``, ``r_G(q) = 1/k sum_{g' in N_G(q)} cos(q,
  g')`` the mean similarity of the query to its ``k`` nearest gallery items and
  ``r_Q(g) = 1/k sum_{q' in N_Q(g)} cos(g, q')`` that of a gallery item to its ``k``
  nearest queries. ``r_Q`` penalizes hubs: photos close to many sketches.
- Per-domain mean-centering: subtract each domain's mean embedding (queries: the sketch
  set, gallery: the photo set) and renormalize, ``score = <norm(q - mu_Q), norm(g -
  mu_G)>`` (the centering step of hubness reduction, e.g. Suzuki et al., EMNLP 2013,
  "centering"), applied per domain to close the sketch/photo offset.

Both are transductive over the *unlabeled* query set (``uses_queries``): they are fitted
with ``fit(gallery, queries=...)`` on what a system sees at test time, never a label; one
query's scores then depend only on it and the fitted statistics.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F

from zsbir.constraints import Range
from zsbir.registry import rerankers

from .base import Reranker, topk_rows

__all__ = ["CSLS", "DomainCenter"]


class CSLS(Reranker):
    """Cross-domain similarity local scaling (Conneau et al., ICLR 2018, Sec. 2.3)."""

    uses_queries = True

    def __init__(self, k: int = 10, chunk_size: int = 1024, ctx: Any = None):
        super().__init__(chunk_size, ctx)
        self.k = k
        self.r_q: torch.Tensor | None = None

    @property
    def tag(self) -> str:
        return f"csls{self.k}"

    def _fit(self, gallery: torch.Tensor, queries: torch.Tensor | None) -> None:
        assert queries is not None
        v, _ = topk_rows(gallery, queries, self.k, self.chunk_size)
        self.r_q = v.mean(1)  # (G,) mean similarity of each photo to its k nearest sketches

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        s = q @ self.gallery.T
        r_g = torch.topk(s, min(self.k, s.shape[1]), dim=1).values.mean(1, keepdim=True)
        return 2 * s - r_g - self.r_q[None, :]


@rerankers.register("csls")
def csls(k: Annotated[int, Range(ge=1)] = 10, chunk_size: Annotated[int, Range(ge=1)] = 1024,
         ctx: Any = None) -> CSLS:
    """CSLS (Conneau et al., ICLR 2018): ``2 cos(q, g) - r_G(q) - r_Q(g)``, r the mean
    similarity to the k nearest items of the other domain (fitted on the unlabeled queries
    and gallery)."""
    return CSLS(k, chunk_size, ctx)


class DomainCenter(Reranker):
    """Per-domain mean-centering: ``<norm(q - mu_Q), norm(g - mu_G)>``."""

    uses_queries = True

    def __init__(self, chunk_size: int = 1024, ctx: Any = None):
        super().__init__(chunk_size, ctx)

    @property
    def tag(self) -> str:
        return "domain_center"

    def _fit(self, gallery: torch.Tensor, queries: torch.Tensor | None) -> None:
        if queries is None or queries.shape[0] < 2:
            raise ValueError("domain_center estimates the sketch domain's mean from the query "
                             "set: it needs at least 2 queries")
        self.mu_q = queries.mean(0, keepdim=True)
        self.centered = F.normalize(gallery - gallery.mean(0, keepdim=True), dim=1)

    def _scores(self, q: torch.Tensor) -> torch.Tensor:
        return F.normalize(q - self.mu_q, dim=1) @ self.centered.T


@rerankers.register("domain_center")
def domain_center(chunk_size: Annotated[int, Range(ge=1)] = 1024,
                  ctx: Any = None) -> DomainCenter:
    """Per-domain mean-centering (hubness reduction by centering, applied per domain):
    ``<norm(q - mu_sketches), norm(g - mu_photos)>``, means of the unlabeled test sets."""
    return DomainCenter(chunk_size, ctx)
