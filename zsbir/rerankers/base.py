"""The reranker contract, shared helpers and :func:`rerank_topk`.

A reranker (kind ``rerankers``, manifest ``[[rerankers]]``) turns the embeddings of a
retrieval task into a new (Q, G) similarity matrix, higher = closer. Contract (the engine,
``zsbir evaluate --reranker`` and the search index rely on it exactly):

- ``tag``: a short label for results (``metrics.json`` keys ``"<hasher>+<tag>"``);
- ``needs_model``: ``True`` when the reranker needs extra embeddings of transformed images
  (test-time augmentation). It then names the image ``views`` it wants (keys of
  :data:`VIEWS`) and :meth:`Reranker.scores` receives (N, 1 + len(views), d) arrays: view 0
  is the plain embedding, view ``i`` that of ``VIEWS[views[i - 1]](image)``;
- ``uses_queries``: ``True`` when :meth:`Reranker.fit` needs the (unlabeled) query set too
  (transductive: hubness statistics, the query domain's mean);
- ``outputs``: names of per-item model outputs beyond the embedding that the reranker
  reads (default ``()``), e.g. ``("logits",)``: the seen-class classifier's logits of
  every query and gallery item (a generalized-retrieval reranker, :mod:`.seen`). They
  arrive as keyword arguments, each a mapping ``name -> (N, ...)`` float array whose rows
  are aligned with the embeddings' rows: ``fit(gallery, queries=None, *,
  gallery_outputs=..., query_outputs=...)`` (``query_outputs`` only when ``uses_queries``),
  ``score_rows(queries, gallery, *, query_outputs=...)`` (the function it returns selects
  the same rows of every query output), ``scores(queries, gallery, *, query_outputs=...,
  gallery_outputs=...)`` and :func:`rerank_topk` (both). A reranker without ``outputs``
  ignores them. A missing name, a row count that differs from the embeddings' or a
  non-finite value is a ``ValueError`` naming the output and the reranker. The engine
  computes them in the embedding pass (``zsbir.engine.evaluate``, one forward per image);
  the photo index stores them per photo (``zsbir search``/``serve``,
  :mod:`zsbir.search.rerank`);
- ``fit(gallery, queries=None) -> self``: test-time fitting on unlabeled embeddings (and
  outputs) only (may be a no-op); never sees a label;
- ``scores(queries, gallery) -> (Q, G)`` float32, for a gallery ``fit`` saw (``scores``
  refits when handed another gallery). Scores of a query depend only on that query (its
  embedding and outputs) and the fitted state, so scoring any subset of the queries gives
  the same rows: the evaluator scores queries in chunks and memory stays bounded
  (:meth:`Reranker.score_rows`).

Embeddings arrive as float32 numpy arrays and are L2-normalized here (cosine geometry).
Work runs in torch on ``ctx.device`` in chunks of ``chunk_size`` queries.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from zsbir.evaluation.distances import l2_normalize

__all__ = ["VIEWS", "Outputs", "Reranker", "as_unit", "check_outputs", "rerank_topk",
           "topk_rows"]

#: Per-item model outputs handed to a reranker: name -> (N, ...) array, rows aligned with
#: the embeddings (contract: module docstring).
Outputs = Mapping[str, Any]

#: Image views a test-time-augmentation reranker may ask for: name -> function of a
#: normalized (B, C, H, W) image batch. Horizontal flip commutes with per-channel
#: normalization, so flipping the normalized batch equals normalizing the flipped image.
VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda x: torch.flip(x, dims=[-1]),
}


def as_unit(x: Any, name: str, device: torch.device | str = "cpu", ndim: int = 2
            ) -> torch.Tensor:
    """A finite float array as an L2-normalized float32 tensor (rows; last axis)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.ndim != ndim:
        shape = "(N, d)" if ndim == 2 else "(N, views, d)"
        raise ValueError(f"{name} must be a {ndim}-D {shape} array, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be float embeddings, got {t.dtype}")
    t = t.to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return l2_normalize(t)


def topk_rows(a: torch.Tensor, b: torch.Tensor, k: int, chunk: int,
              exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` cosine neighbours in ``b`` of every row of ``a`` (both unit rows):
    (values, indices), each (len(a), k), in descending order, computed ``chunk`` rows at a
    time. ``exclude_self`` (a is b): row i's own column is left out."""
    k = min(k, b.shape[0] - (1 if exclude_self else 0))
    vals, idx = [], []
    for lo in range(0, a.shape[0], chunk):
        s = a[lo:lo + chunk] @ b.T
        if exclude_self:
            r = torch.arange(s.shape[0], device=s.device)
            s[r, r + lo] = -float("inf")
        v, i = torch.topk(s, k, dim=1)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _fingerprint(x: np.ndarray | torch.Tensor) -> tuple[Any, ...]:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return (a.shape, str(a.dtype), zlib.crc32(np.ascontiguousarray(a).view(np.uint8)))


def check_outputs(names: tuple[str, ...], given: Outputs | None, rows: int, what: str,
                  owner: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The outputs ``names`` of ``given`` as finite float32 tensors with ``rows`` rows on
    ``device``; a clear ``ValueError`` (naming the output, ``what`` and ``owner``) else."""
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if given is None or name not in given:
            have = sorted(given) if given else []
            raise ValueError(f"{owner} reads the model output {name!r} of the {what}, "
                             f"which was not given (given: {have or 'none'}): the model "
                             f"must return {name!r} and the caller pass {what}_outputs=")
        x = given[name]
        t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
        if t.ndim < 1 or t.shape[0] != rows:
            raise ValueError(f"{owner}: {what} output {name!r} has {tuple(t.shape)} rows "
                             f"where the {what} embeddings have {rows}")
        if not t.is_floating_point():
            raise ValueError(f"{owner}: {what} output {name!r} must be float, got {t.dtype}")
        t = t.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{owner}: {what} output {name!r} contains NaN or infinite "
                             "values")
        out[name] = t
    return out


def _outputs_fingerprint(names: tuple[str, ...], given: Outputs | None) -> tuple[Any, ...]:
    return tuple(_fingerprint(given[n]) if given is not None and n in given else None
                 for n in names)


class Reranker:
    """Base class: see the module docstring for the contract.

    Subclasses implement :meth:`_fit` (on unit-row tensors) and :meth:`_scores` (a chunk of
    unit query rows against the fitted gallery -> (n, G) float32 tensor).
    """

    needs_model: bool = False
    uses_queries: bool = False
    views: tuple[str, ...] = ()
    view_ndim: int = 2
    outputs: tuple[str, ...] = ()

    def __init__(self, chunk_size: int = 1024, ctx: Any = None):
        self.chunk_size = chunk_size
        self.device = torch.device(getattr(ctx, "device", None) or "cpu")
        self._fitted: tuple[Any, ...] | None = None
        self.gallery: torch.Tensor | None = None
        #: the fitted gallery's outputs (names of ``outputs``), float32 tensors
        self.gallery_outputs: dict[str, torch.Tensor] = {}

    @property
    def tag(self) -> str:  # pragma: no cover - every built-in overrides it
        return type(self).__name__.lower()

    # -- fitting
    def fit(self, gallery: np.ndarray, queries: np.ndarray | None = None, *,
            gallery_outputs: Outputs | None = None, query_outputs: Outputs | None = None
            ) -> Reranker:
        """Test-time fitting on the unlabeled gallery (and query set, if ``uses_queries``),
        with their ``outputs`` when the reranker reads some."""
        if self.uses_queries and queries is None:
            raise ValueError(f"reranker {self.tag!r} is fitted on the query set too: "
                             "call fit(gallery, queries=...)")
        g = as_unit(gallery, "gallery", self.device, self.view_ndim)
        q = None if queries is None else as_unit(queries, "queries", self.device,
                                                 self.view_ndim)
        owner = f"reranker {self.tag!r}"
        self.gallery_outputs = check_outputs(self.outputs, gallery_outputs, g.shape[0],
                                             "gallery", owner, self.device)
        self.fit_query_outputs = (check_outputs(self.outputs, query_outputs, q.shape[0],
                                                "query", owner, self.device)
                                  if q is not None and self.outputs else {})
        self.gallery = g
        self._fit(g, q)
        self._fitted = (_fingerprint(gallery),
                        None if queries is None else _fingerprint(queries),
                        _outputs_fingerprint(self.outputs, gallery_outputs))
        return self

    def _fit(self, gallery: torch.Tensor, queries: torch.Tensor | None) -> None:
        """Fit on unit-row tensors (default: nothing to fit)."""

    # -- scoring
    def _check_fitted(self, gallery: np.ndarray, gallery_outputs: Outputs | None = None
                      ) -> None:
        if self._fitted is None or self._fitted[0] != _fingerprint(gallery) or (
                gallery_outputs is not None and self._fitted[2]
                != _outputs_fingerprint(self.outputs, gallery_outputs)):
            if self.uses_queries:
                raise ValueError(f"reranker {self.tag!r} was not fitted on this gallery: "
                                 "call fit(gallery, queries=...) first")
            self.fit(gallery, gallery_outputs=gallery_outputs)

    def score_rows(self, queries: np.ndarray, gallery: np.ndarray, *,
                   query_outputs: Outputs | None = None,
                   gallery_outputs: Outputs | None = None
                   ) -> Callable[[np.ndarray], torch.Tensor]:
        """A function ``rows -> (len(rows), G)`` float32 scores of those queries (for the
        chunked evaluator, :func:`zsbir.evaluation.evaluate_score_fn`); a reranker with
        ``outputs`` reads the same rows of ``query_outputs``."""
        self._check_fitted(gallery, gallery_outputs)
        q = as_unit(queries, "queries", self.device, self.view_ndim)
        if q.shape[-1] != self.gallery.shape[-1]:
            raise ValueError(f"queries have width {q.shape[-1]}, the gallery "
                             f"{self.gallery.shape[-1]}")
        qo = check_outputs(self.outputs, query_outputs, q.shape[0], "query",
                           f"reranker {self.tag!r}", self.device)

        def rows(idx: np.ndarray) -> torch.Tensor:
            pick = torch.from_numpy(np.asarray(idx, dtype=np.int64)).to(q.device)
            sel = q[pick]
            sel_o = {k: v[pick] for k, v in qo.items()}
            return torch.cat([
                self._scores_out(sel[lo:lo + self.chunk_size],
                                 {k: v[lo:lo + self.chunk_size] for k, v in sel_o.items()})
                for lo in range(0, len(sel), self.chunk_size)]
            ) if len(sel) else sel.new_zeros((0, self.gallery.shape[0]))

        return rows

    def scores(self, queries: np.ndarray, gallery: np.ndarray, *,
               query_outputs: Outputs | None = None, gallery_outputs: Outputs | None = None
               ) -> np.ndarray:
        """(Q, G) float32 similarities, higher = closer (chunked over queries)."""
        fn = self.score_rows(queries, gallery, query_outputs=query_outputs,
                             gallery_outputs=gallery_outputs)
        return fn(np.arange(len(queries))).cpu().numpy()

    def _scores_out(self, q: torch.Tensor, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """A chunk of unit query rows with their ``outputs`` (names of ``outputs``, same
        rows) -> (n, G) scores. Default: :meth:`_scores` (a reranker without outputs)."""
        return self._scores(q)

    def _scores(self, q: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


def rerank_topk(reranker: Reranker, queries: np.ndarray, gallery: np.ndarray, k: int, *,
                query_outputs: Outputs | None = None, gallery_outputs: Outputs | None = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best gallery items per query under ``reranker``: (scores (Q, k) float32,
    indices (Q, k) int64), best first; fits the reranker on ``gallery`` (and ``queries``)
    when it has not seen that gallery (a transductive one: that gallery and these queries),
    with their ``outputs`` when it reads some. Memory: one (chunk_size, G) block at a time."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    names = getattr(reranker, "outputs", ())
    want = (_fingerprint(gallery),
            _fingerprint(queries) if reranker.uses_queries else None,
            _outputs_fingerprint(names, gallery_outputs))
    if reranker._fitted is None or reranker._fitted[0] != want[0] or \
            (reranker.uses_queries and reranker._fitted[1] != want[1]) or \
            (names and reranker._fitted[2] != want[2]):
        reranker.fit(gallery, queries=queries if reranker.uses_queries else None,
                     gallery_outputs=gallery_outputs,
                     query_outputs=query_outputs if reranker.uses_queries else None)
    fn = reranker.score_rows(queries, gallery, query_outputs=query_outputs)
    k = min(k, len(gallery))
    out_s, out_i = [], []
    step = max(1, reranker.chunk_size)
    for lo in range(0, len(queries), step):
        s = fn(np.arange(lo, min(lo + step, len(queries))))
        v, i = torch.topk(s, k, dim=1)
        out_s.append(v.cpu().numpy())
        out_i.append(i.cpu().numpy())
    if not out_s:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(out_s).astype(np.float32), np.concatenate(out_i).astype(np.int64)
