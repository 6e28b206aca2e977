"""Metric-learning losses on the retrieval embedding."""

from __future__ import annotations

import math
from typing import Annotated, ClassVar

import torch
import torch.nn.functional as F

from zsbir.constraints import Range
from zsbir.losses.base import Batch, Loss, Outputs, Teacher, tuple_rows
from zsbir.registry import losses

__all__ = ["QUADRUPLET", "DomainQuadrupletLoss", "quadruplet_distances"]


#: the roles of a quadruplet, in the ``quadruplet`` sampler's order
QUADRUPLET = ("anchor", "positive", "negative", "negative_sketch")


def quadruplet_distances(embedding: torch.Tensor, normalize: bool = False,
                         squared: bool = True, batch: dict | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(d+, d_p-, d_s-)``, each (N,), for the N quadruplets (anchor sketch, positive
    photo, negative photo, negative sketch) of ``batch["tuples"]`` (by role), or, for a
    batch without tuples, of a (4N, d) embedding laid out in that order."""
    b = embedding.shape[0]
    if embedding.ndim != 2:
        raise ValueError(f"domain_quadruplet: expected (B, d) embeddings, got shape "
                         f"{tuple(embedding.shape)}")
    try:
        rows = tuple_rows(batch or {}, QUADRUPLET, b, "domain_quadruplet")
    except ValueError as exc:
        raise ValueError(f"{exc} (use the 'quadruplet' sampler, batch_size a multiple "
                         "of 4)") from None
    e = embedding.float()
    if normalize:
        e = F.normalize(e, dim=1)
    anchor, pos, neg_photo, neg_sketch = (e[r.to(e.device)] for r in rows)

    def dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d2 = (x - y).pow(2).sum(dim=1)
        # clamp: sqrt has an infinite derivative at 0
        return d2 if squared else d2.clamp_min(1e-12).sqrt()

    return dist(anchor, pos), dist(anchor, neg_photo), dist(anchor, neg_sketch)


@losses.register("domain_quadruplet")
class DomainQuadrupletLoss(Loss):
    """SBTKNet's domain-aware quadruplet loss (Eq. 2).

    ``L_sim = 1/(2N) sum_i [max(d+ - d_p- + alpha, 0) + max(d+ - d_s- + alpha, 0)]`` over the
    N quadruplets ``(I_s^a, I_p^+, I_p^-, I_s^-)`` of the batch, with ``d+ = d(anchor sketch,
    positive photo)``, ``d_p- = d(anchor, negative photo)``, ``d_s- = d(anchor, negative
    sketch)`` and ``d`` the squared Euclidean distance of the embeddings ``out["embedding"]``.
    The paper's text defines ``d_s-`` with the negative *photo* ``I_p^-``, a typo (that term
    would duplicate ``d_p-``): the negative sketch ``I_s^-`` is used, as the loss's name and
    purpose (a negative from each domain) require.

    ``margin``: alpha (paper: 0.2). ``normalize``: L2-normalize the embeddings first (the paper
    does not say; False, distances on the raw embedding as written). ``squared``: squared
    Euclidean distances as in Eq. 1-2; False uses plain Euclidean distances.

    The batch must come from the ``quadruplet`` sampler; the quadruplets are read from
    ``batch["tuples"]`` by role.
    """

    roles: ClassVar[frozenset[str]] = frozenset(QUADRUPLET)

    def __init__(self, margin: Annotated[float, Range(ge=0)] = 0.2, normalize: bool = False,
                 squared: bool = True):
        super().__init__()
        if not (math.isfinite(margin) and margin >= 0):
            raise ValueError(f"domain_quadruplet: margin must be a finite number >= 0, "
                             f"got {margin}")
        self.margin = float(margin)
        self.normalize = bool(normalize)
        self.squared = bool(squared)

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        d_pos, d_neg_photo, d_neg_sketch = quadruplet_distances(
            out["embedding"], normalize=self.normalize, squared=self.squared, batch=batch)
        hinges = torch.stack([F.relu(d_pos - d_neg_photo + self.margin),
                              F.relu(d_pos - d_neg_sketch + self.margin)])
        return hinges.mean()  # = sum / (2N)
