"""The cross-attention module and the kernel-based relation network of ZSE-SBIR (Lin et
al., CVPR 2023, Secs. 3.2-3.3; the authors' model/ca.py, model/rn.py and the down-sampling
of model/model.py).

Cross-attention, one layer per side (``layers`` of them, the released code uses 1):

    S' = N2(S1 + FF(S1)),  S1 = N1(S + MHA(q = S, k = P, v = S))     (sketch side)
    P' = N2(P1 + FF(P1)),  P1 = N1(P + MHA(q = P, k = S, v = P))     (photo side)

with ``FF(x) = W2 ReLU(W1 x)`` and the released code's LayerNorm
``N(x) = a (x - mean) / (std + 1e-6) + b`` (unbiased std, eps outside the root). Both
sides read the other's *input* of the layer. As in the released code each side's keys come
from the other image while its values are its own tokens (``attention(q, k, v)`` with
``v`` = the query side), so both images need the same number of tokens.

Relation network: the cross-attended patch tokens (class token dropped) of each side are
down-sampled by a 2x2 stride-2 convolution (768 -> 512; the released code *views* the
(196, 768) token matrix as a (768, 14, 14) map, a reshape that is not a transpose, which is
kept), giving ``A`` anchors per image (49); the A x A cosine matrix ``C_ij = cos(s_i, p_j)``
(0 where a norm is 0) goes through ``sigmoid(W3 ReLU(W2 ReLU(W1 vec(C))))`` with widths
A^2 -> A^1.5 -> A -> 1 (2401 -> 343 -> 49 -> 1; 196 and 144 anchors: 2744 -> 196,
1728 -> 144, the released rn.py's sizes), the pair's similarity in (0, 1).

Every item-only part of the first layer (the query, key and value projections of each
image's own tokens) is separable: :meth:`CrossLayer.project_query` and friends compute
them once per image, :meth:`CrossLayer.attend` finishes a pair from them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CrossAttention", "CrossLayer", "RelationNetwork", "StdLayerNorm",
           "cosine_matrix"]


class StdLayerNorm(nn.Module):
    """``a (x - mean) / (std + eps) + b`` over the last axis, unbiased std (the released
    code's LayerNorm, which differs from ``nn.LayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.a = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x, dim=-1, keepdim=True)  # unbiased, one pass
        return torch.addcmul(self.b, (x - mean) / (var.sqrt() + self.eps), self.a)


class CrossLayer(nn.Module):
    """One side's cross-attention layer: ``N2(x + FF(x))``, ``x = N1(v + MHA(q, k, v))``."""

    def __init__(self, dim: int = 768, heads: int = 8, ff_dim: int = 1024,
                 dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of the cross-attention's heads "
                             f"{heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.w1, self.w2 = nn.Linear(dim, ff_dim), nn.Linear(ff_dim, dim)
        self.norm1, self.norm2 = StdLayerNorm(dim), StdLayerNorm(dim)
        self.drop_attn, self.drop_ff = nn.Dropout(dropout), nn.Dropout(dropout)
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, self.heads, self.head_dim).transpose(1, 2)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.q(x))

    def project_key(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.k(x))

    def project_value(self, x: torch.Tensor) -> torch.Tensor:
        return self._heads(self.v(x))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               residual: torch.Tensor) -> torch.Tensor:
        """The layer from projected (B, heads, T, head_dim) ``q``, ``k``, ``v`` and the
        (B, T, dim) value tokens ``residual``."""
        if self.training and self.drop_attn.p > 0:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            out = self.drop_attn(scores.softmax(dim=-1)) @ v
        else:  # the same softmax(q k^T / sqrt(d)) v, fused (no (T, T) map kept)
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(residual.shape)
        x = self.norm1(residual + self.drop1(self.o(out)))
        return self.norm2(x + self.drop2(self.w2(self.drop_ff(F.relu(self.w1(x))))))

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                ) -> torch.Tensor:
        return self.attend(self.project_query(query), self.project_key(key),
                           self.project_value(value), value)


class CrossAttention(nn.Module):
    """``layers`` pairs of (sketch, photo) cross layers; ``forward(S, P) -> (S', P')``."""

    def __init__(self, dim: int = 768, heads: int = 8, ff_dim: int = 1024, layers: int = 1,
                 dropout: float = 0.1):
        super().__init__()
        self.sketch = nn.ModuleList(CrossLayer(dim, heads, ff_dim, dropout)
                                    for _ in range(layers))
        self.photo = nn.ModuleList(CrossLayer(dim, heads, ff_dim, dropout)
                                   for _ in range(layers))

    def forward(self, s: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for ls, lp in zip(self.sketch, self.photo):
            s, p = ls(s, p, s), lp(p, s, p)
        return s, p

    def item_projections(self, tokens: torch.Tensor, is_sketch: bool) -> torch.Tensor:
        """(B, 3, T, dim): what the first layer computes from one image alone: a sketch's
        (query, value) of its side and its key for the photo side; a photo's key for the
        sketch side and its (query, value)."""
        ls, lp = self.sketch[0], self.photo[0]
        if is_sketch:
            parts = (ls.q(tokens), ls.v(tokens), lp.k(tokens))
        else:
            parts = (ls.k(tokens), lp.q(tokens), lp.v(tokens))
        return torch.stack(parts, dim=1)

    def from_projections(self, s: torch.Tensor, p: torch.Tensor, s_proj: torch.Tensor,
                         p_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` of aligned pairs from each side's tokens and
        :meth:`item_projections` (the same result, without recomputing them)."""
        ls, lp = self.sketch[0], self.photo[0]
        h = ls._heads
        s, p = (ls.attend(h(s_proj[:, 0]), h(p_proj[:, 0]), h(s_proj[:, 1]), s),
                lp.attend(lp._heads(p_proj[:, 1]), lp._heads(s_proj[:, 2]),
                          lp._heads(p_proj[:, 2]), p))
        for ls, lp in zip(self.sketch[1:], self.photo[1:]):
            s, p = ls(s, p, s), lp(p, s, p)
        return s, p


def cosine_matrix(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(B, n, m) cosines of each row of ``p`` (B, n, d) with each row of ``q`` (B, m, d);
    0 where a row has norm 0 (the released code's ``cos_similar``)."""
    sim = p @ q.transpose(-2, -1)
    sim = sim / p.norm(dim=-1).unsqueeze(-1) / q.norm(dim=-1).unsqueeze(-2)
    return torch.where(torch.isnan(sim), torch.zeros_like(sim), sim)


class RelationNetwork(nn.Module):
    """``sigmoid(MLP(vec(C)))`` on the A x A anchor cosine matrix C, widths A^2 -> A^1.5 ->
    A -> 1 with ReLU and dropout between (A a perfect square)."""

    def __init__(self, anchors: int = 49, dropout: float = 0.1):
        super().__init__()
        side = math.isqrt(anchors)
        if side * side != anchors:
            raise ValueError(f"the relation network needs a square number of anchors "
                             f"(49, 144, 196, ...), got {anchors}")
        hidden = side ** 3
        self.anchors = anchors
        self.mlp = nn.Sequential(
            nn.Linear(anchors * anchors, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, anchors), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(anchors, 1))

    def forward(self, cos: torch.Tensor) -> torch.Tensor:
        """(B, A, A) cosines -> (B,) similarities in (0, 1)."""
        return torch.sigmoid(self.mlp(cos.flatten(1))).squeeze(1)
