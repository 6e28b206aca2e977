"""The core's pair batching and top-K re-scoring (used by evaluation, ``zsbir search`` and
``zsbir serve``; never by a scorer itself).

:class:`PairBatcher` holds every item's outputs (computed once: one forward pass per
image) and scores any list of (query, gallery) index pairs: it cuts the list into aligned
blocks of ``batch_pairs`` pairs, gathers each block's rows of every output the scorer
reads and hands them to ``score_pairs`` on the device. The outputs stay on the device
when they fit in ``resident_bytes`` (always on CPU); otherwise each block's rows are
gathered on the host and moved once per block.

Top-K re-scoring of an embedding ranking (the contract's use (b)):

- :func:`stable_topk`: the first K items of each row's ranking, by descending score,
  ties by gallery index (the evaluator's tie rule, :mod:`zsbir.evaluation.metrics`);
- :func:`rescore_order`: those K re-ordered by the pair scores (ties by gallery index);
- :func:`merged_scores`: a full score row whose ranking puts the K re-scored items first,
  in that order (equal pair scores stay tied: the evaluator's tie rules apply to them),
  and every other item after them in its embedding order with its embedding score
  (so its ties are the embedding ranking's). :mod:`zsbir.engine.pair_eval` ranks these
  rows with the project's metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from zsbir.pairs.base import outputs_of

__all__ = ["PairBatcher", "merged_scores", "rescore_order", "stable_topk"]

#: outputs up to this size stay on the device for the whole scoring (else: per block)
RESIDENT_BYTES = 2 * 2**30


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(
        np.ascontiguousarray(x))
    if not t.is_floating_point():
        raise ValueError(f"{what} must be float values, got {t.dtype}")
    return t.float()


class PairBatcher:
    """Score aligned (query, gallery) index pairs with ``scorer`` in blocks of
    ``batch_pairs`` (see the module docstring). A scorer's optional ``prepare(outputs)``
    runs once over every item's outputs first (per-item work: normalization, projections).

    ``query`` / ``gallery``: output name -> (N, ...) array of every query / gallery item;
    every name of ``scorer.outputs`` must be on both sides (else a ``ValueError`` naming
    the output)."""

    def __init__(self, scorer: Any, query: Mapping[str, Any], gallery: Mapping[str, Any],
                 batch_pairs: int = 256, device: str | torch.device = "cpu",
                 resident_bytes: int = RESIDENT_BYTES):
        if batch_pairs < 1:
            raise ValueError(f"batch_pairs must be >= 1, got {batch_pairs}")
        self.scorer, self.batch_pairs = scorer, int(batch_pairs)
        self.device = torch.device(device)
        self.tag = str(getattr(scorer, "tag", type(scorer).__name__))
        names = outputs_of(scorer)
        if not names:
            raise ValueError(f"pair scorer {self.tag!r} declares no outputs")
        for side, given in (("query", query), ("gallery", gallery)):
            missing = [n for n in names if n not in given]
            if missing:
                raise ValueError(f"pair scorer {self.tag!r} reads the output(s) "
                                 f"{', '.join(map(repr, missing))}, which the {side} side "
                                 f"lacks (it has {', '.join(map(repr, given)) or 'none'})")
        self.q = {n: _as_tensor(query[n], f"query output {n!r}") for n in names}
        self.g = {n: _as_tensor(gallery[n], f"gallery output {n!r}") for n in names}
        prepare = getattr(scorer, "prepare", None)
        if callable(prepare):  # per-item work, once per item (not once per pair)
            with torch.inference_mode():
                self.q, self.g = dict(prepare(self.q)), dict(prepare(self.g))
        self.num_query = len(next(iter(self.q.values())))
        self.num_gallery = len(next(iter(self.g.values())))
        for side, d, n in (("query", self.q, self.num_query),
                           ("gallery", self.g, self.num_gallery)):
            for name, t in d.items():
                if len(t) != n:
                    raise ValueError(f"{side} outputs have different lengths ({name!r}: "
                                     f"{len(t)}, not {n})")
        total = sum(t.numel() * 4 for d in (self.q, self.g) for t in d.values())
        self.resident = self.device.type == "cpu" or total <= resident_bytes
        if self.resident:
            self.q = {n: t.to(self.device) for n, t in self.q.items()}
            self.g = {n: t.to(self.device) for n, t in self.g.items()}
        elif self.device.type == "cuda":
            self.q = {n: t.pin_memory() for n, t in self.q.items()}
            self.g = {n: t.pin_memory() for n, t in self.g.items()}
        if isinstance(scorer, torch.nn.Module):
            scorer.eval()

    def _block(self, side: dict[str, torch.Tensor], idx: np.ndarray) -> dict[str, torch.Tensor]:
        if self.resident and len(idx) and (idx == idx[0]).all():  # one item: a view
            return {n: t[int(idx[0]):int(idx[0]) + 1].expand(len(idx), *t.shape[1:])
                    for n, t in side.items()}
        if self.resident and len(idx) and idx[-1] - idx[0] == len(idx) - 1 and \
                (np.diff(idx) == 1).all():  # a range of items: a view, no copy
            return {n: t[int(idx[0]):int(idx[-1]) + 1] for n, t in side.items()}
        index = torch.from_numpy(idx)
        if self.resident:
            index = index.to(self.device)
            return {n: t.index_select(0, index) for n, t in side.items()}
        return {n: t.index_select(0, index).to(self.device, non_blocking=True)
                for n, t in side.items()}

    @torch.inference_mode()
    def score(self, query_idx: np.ndarray, gallery_idx: np.ndarray) -> np.ndarray:
        """(P,) float32 scores of the pairs ``(query_idx[i], gallery_idx[i])``."""
        qi = np.asarray(query_idx, dtype=np.int64).ravel()
        gi = np.asarray(gallery_idx, dtype=np.int64).ravel()
        if qi.shape != gi.shape:
            raise ValueError(f"{len(qi)} query indices but {len(gi)} gallery indices")
        out = np.empty(len(qi), np.float32)
        for lo in range(0, len(qi), self.batch_pairs):
            hi = min(lo + self.batch_pairs, len(qi))
            s = self.scorer.score_pairs(self._block(self.q, qi[lo:hi]),
                                        self._block(self.g, gi[lo:hi]))
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != (hi - lo,):
                shape = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"pair scorer {self.tag!r} returned {shape} for "
                                 f"{hi - lo} pairs, expected ({hi - lo},) scores")
            s = s.detach().float().cpu().numpy()
            if not np.isfinite(s).all():
                raise ValueError(f"pair scorer {self.tag!r} returned non-finite scores")
            out[lo:hi] = s
        return out

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """(len(rows), G) float32 scores of the queries ``rows`` against every gallery
        item (exhaustive scoring, for :func:`zsbir.evaluation.evaluate_score_fn`)."""
        rows = np.asarray(rows, dtype=np.int64)
        g = self.num_gallery
        if self.batch_pairs < g:  # blocks of one query each: both sides are views
            out = np.empty((len(rows), g), np.float32)
            for i, r in enumerate(rows):
                out[i] = self.score(np.full(g, r, np.int64), np.arange(g, dtype=np.int64))
            return torch.from_numpy(out)
        qi = np.repeat(rows, g)
        gi = np.tile(np.arange(g, dtype=np.int64), len(rows))
        return torch.from_numpy(self.score(qi, gi).reshape(len(rows), g))


# ------------------------------------------------------------------------- top-K re-scoring
def stable_topk(scores: np.ndarray, k: int) -> np.ndarray:
    """(n, min(k, G)) gallery indices of each row's ``k`` best items: descending score,
    ties by gallery index (finite scores; -0.0 equals 0.0)."""
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be (n, G), got shape {s.shape}")
    n, g = s.shape
    k = min(int(k), g)
    if k <= 0 or n == 0:
        return np.zeros((n, max(k, 0)), np.int64)
    kth = np.partition(s, g - k, axis=1)[:, g - k]  # each row's k-th largest value
    mask = s >= kth[:, None]  # >= k items per row (more when the k-th value is tied)
    r, c = np.nonzero(mask)
    order = np.lexsort((c, -s[r, c], r))
    c = c[order]
    counts = mask.sum(axis=1)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return c[starts[:, None] + np.arange(k)].astype(np.int64)


def rescore_order(top_idx: np.ndarray, pair_scores: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The top-K re-ordered by their pair scores (descending, ties by gallery index):
    (gallery indices (n, K), their pair scores (n, K))."""
    top_idx, pair_scores = np.asarray(top_idx), np.asarray(pair_scores, np.float32)
    if top_idx.shape != pair_scores.shape:
        raise ValueError(f"{top_idx.shape} indices but {pair_scores.shape} pair scores")
    if top_idx.size == 0:
        return top_idx.astype(np.int64), pair_scores
    rows = np.repeat(np.arange(top_idx.shape[0]), top_idx.shape[1])
    order = np.lexsort((top_idx.ravel(), -pair_scores.ravel(), rows))
    perm = order.reshape(top_idx.shape) - (np.arange(top_idx.shape[0]) * top_idx.shape[1]
                                           )[:, None]
    return (np.take_along_axis(top_idx, perm, 1).astype(np.int64),
            np.take_along_axis(pair_scores, perm, 1))


def merged_scores(base: np.ndarray, top_idx: np.ndarray, pair_scores: np.ndarray
                  ) -> np.ndarray:
    """(n, G) float32 rows that rank the ``top_idx`` items first, by their pair scores,
    and every other item below them by its ``base`` score (see the module docstring).

    The re-scored items get ``max(row) + 1 + c``, ``c`` the dense rank code of their pair
    score (equal pair scores share one value, so they stay tied); integers up to K added
    to a float32 row maximum stay distinct while ``|max| < 2**23``."""
    base = np.asarray(base, np.float32)
    top_idx = np.asarray(top_idx, np.int64)
    pair_scores = np.asarray(pair_scores, np.float32)
    out = base.copy()
    n, k = top_idx.shape
    if k == 0 or n == 0:
        return out
    if float(np.abs(base).max(initial=0.0)) >= 2**23:
        raise ValueError("embedding scores too large to merge with re-scored ones")
    srt = -np.sort(-pair_scores, axis=1)  # descending
    new = np.concatenate([np.ones((n, 1), bool), srt[:, 1:] != srt[:, :-1]], axis=1)
    dense_sorted = np.cumsum(new, axis=1) - 1  # 0 for the best score
    # each item's dense rank: position of its score in the descending unique values
    pos = np.empty_like(dense_sorted)
    for i in range(n):  # n rows of K values: cheap beside the (n, G) scores
        pos[i] = dense_sorted[i][np.searchsorted(-srt[i], -pair_scores[i], side="left")]
    code = (dense_sorted[:, -1:] - pos).astype(np.float32)  # best -> largest
    offset = base.max(axis=1, keepdims=True) + np.float32(1.0)
    np.put_along_axis(out, top_idx, offset + code, axis=1)
    return out
