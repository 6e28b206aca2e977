"""The cosine triplet loss of Sain et al. (CVPR 2023)."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import torch
import torch.nn.functional as F

from zsbir.constraints import Range
from zsbir.losses.base import Batch, Loss, Outputs, Teacher, tuple_rows

#: the roles of a triplet, in the ``triplet`` sampler's order
TRIPLET = ("anchor", "positive", "negative")

__all__ = ["ClipTripletLoss", "cosine_triplet"]


def cosine_triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                   margin: float) -> torch.Tensor:
    """mean_i max(0, d(a_i, p_i) - d(a_i, n_i) + margin), d(x, y) = 1 - cos(x, y)
    (``nn.TripletMarginWithDistanceLoss`` with that distance, as the authors' code)."""
    d_pos = 1.0 - F.cosine_similarity(anchor.float(), positive.float(), dim=-1)
    d_neg = 1.0 - F.cosine_similarity(anchor.float(), negative.float(), dim=-1)
    return F.relu(d_pos - d_neg + margin).mean()


class ClipTripletLoss(Loss):
    """Cosine triplet loss, sketch anchor / photo positive / photo negative (Sain et al.,
    "CLIP for All Things Zero-Shot Sketch-Based Image Retrieval", CVPR 2023, Sec. 4):

        L_tri = 1/N sum_i max(0, d(s_i, p_i+) - d(s_i, p_i-) + mu),  d(x, y) = 1 - cos(x, y)

    over the N triplets of the batch, on ``out[key]`` (``embedding`` by default; the
    ``clip_text_classifier`` head's embedding is CLIP's image embedding normalized, which
    leaves the cosine unchanged); mu = ``margin`` (paper: 0.2).

    Triplets: read by role from ``batch["tuples"]``, which the core ``triplet`` sampler
    gives (sketch anchor, photo positive, photo negative; only those three images are
    decoded). The sampler draws the positive uniformly among the anchor class's photos and
    the negative among the other classes' photos, as the paper's data loader does; no
    mining.
    """

    roles: ClassVar[frozenset[str]] = frozenset(TRIPLET)

    def __init__(self, margin: Annotated[float, Range(ge=0)] = 0.2,
                 key: Literal["embedding", "features"] = "embedding"):
        super().__init__()
        self.margin = float(margin)
        self.key = key

    def forward(self, out: Outputs, batch: Batch, teacher: Teacher | None) -> torch.Tensor:
        e = out[self.key]
        if e.ndim != 2:
            raise ValueError(f"clip_triplet: expected (B, d) embeddings, got {tuple(e.shape)}")
        a, p, n = (e[r.to(e.device)] for r in tuple_rows(batch, TRIPLET, e.shape[0],
                                                          "clip_triplet"))
        return cosine_triplet(a, p, n, self.margin)
