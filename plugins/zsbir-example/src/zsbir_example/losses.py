"""Batch-hard cross-domain triplet loss, as a plugin.

For each sketch anchor a in the batch, the hardest positive photo (same class, largest
distance) and the hardest negative photo (other class, smallest distance) give
``max(d(a, p) - d(a, n) + margin, 0)`` (batch-hard mining: Hermans et al., "In Defense
of the Triplet Loss for Person Re-Identification", 2017), averaged over the anchors
that have both a positive and a negative photo in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zsbir.losses.base import Batch, Loss, Outputs


class CrossDomainTriplet(Loss):
    """Batch-hard sketch-to-photo triplet loss on L2-normalized embeddings."""

    def __init__(self, margin: float = 0.2, normalize: bool = True):
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.margin = margin
        self.normalize = normalize

    def forward(self, out: Outputs, batch: Batch, teacher: torch.Tensor | None) -> torch.Tensor:
        emb = out["embedding"].float()
        if self.normalize:
            emb = F.normalize(emb, dim=1)
        sketch, photo = batch["domain"] == 1, batch["domain"] == 0
        a, p = emb[sketch], emb[photo]
        la, lp = batch["label"][sketch], batch["label"][photo]
        if len(a) == 0 or len(p) == 0:
            return emb.sum() * 0.0
        d = torch.cdist(a, p)
        same = la[:, None] == lp[None, :]
        inf = torch.finfo(d.dtype).max
        hardest_pos = torch.where(same, d, torch.full_like(d, -inf)).max(1).values
        hardest_neg = torch.where(~same, d, torch.full_like(d, inf)).min(1).values
        valid = same.any(1) & (~same).any(1)
        if not valid.any():
            return emb.sum() * 0.0
        hinge = F.relu(hardest_pos - hardest_neg + self.margin)
        return hinge[valid].mean()
