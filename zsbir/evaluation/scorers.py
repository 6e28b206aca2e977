"""Scorers: the score rows of a chunk of queries, from features (cosine, euclidean, Hamming),
from a stored (Q, G) matrix, or from a function of the query rows; :func:`pairwise_scores`
gives the full matrix the evaluator ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch

from zsbir.evaluation.distances import (
    ArrayLike,
    _np_hamming_words,
    _np_words,
    _t_hamming,
    _to_tensor,
    l2_normalize,
)

__all__ = ["pairwise_scores"]

Distance = Literal["cosine", "euclidean", "hamming"]


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
            q, g = l2_normalize(q), l2_normalize(g)
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
