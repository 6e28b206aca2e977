"""Pair scoring in evaluation (``[pair_scorer]``, :mod:`zsbir.pairs`), called by
:func:`zsbir.engine.evaluate.evaluate_experiment` for every task, beside the plain ranking.

Two uses, each ranked with the project's metrics (the ``[evaluation]`` metrics and their
variants, the same chunked evaluator as the embedding ranking) and stored in
``metrics.json`` under the task, beside the hashers' entries:

- ``"<hasher>+<tag>@<K>"`` (``top_k = K > 0``): every query's top K under that hasher's
  ranking (ties by gallery index) re-scored by the pair scorer and re-ordered by it; the
  items beyond K keep their embedding order below them (:func:`zsbir.pairs.merged_scores`);
- ``"<tag>-exhaustive"`` (``exhaustive = true``): every (query, gallery item) pair scored
  (Q x G pairs) and ranked by the pair scores alone.

Each item's outputs come from the one embedding pass of the evaluation
(:func:`zsbir.engine.embed.embed_outputs`); pairs are scored in aligned blocks of
``batch_pairs`` on the run's device (:class:`zsbir.pairs.PairBatcher`). A scorer whose
constructor names ``model`` is rebuilt around the model being evaluated (the run's
selected weights), so its weights are the ones scored.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from zsbir.pairs import PairBatcher, merged_scores, needed_outputs, stable_topk

__all__ = ["evaluation_outputs", "evaluate_pairs", "exhaustive_key", "scorer_for", "topk_key"]


def topk_key(hasher_tag: str, scorer_tag: str, k: int) -> str:
    """The ``metrics.json`` key of top-K re-scoring: ``"<hasher>+<tag>@<K>"``."""
    return f"{hasher_tag}+{scorer_tag}@{k}"


def exhaustive_key(scorer_tag: str) -> str:
    """The ``metrics.json`` key of exhaustive pair scoring: ``"<tag>-exhaustive"``."""
    return f"{scorer_tag}-exhaustive"


def evaluation_outputs(exp: Any) -> tuple[str, ...]:
    """The per-item outputs the evaluation computes besides the embedding: those the pair
    scorer and the rerankers declare (their ``outputs``)."""
    return needed_outputs([getattr(exp, "pair_scorer", None),
                           *getattr(exp, "rerankers", [])])


def scorer_for(exp: Any) -> Any:
    """The pair scorer to evaluate with: ``exp.pair_scorer``, rebuilt around
    ``exp.model`` when its constructor takes the model (its weights are the model's)."""
    table = exp.manifest.pair_scorer
    if table is None:
        return None
    from zsbir.build import build_pair_scorer
    from zsbir.registry import get_registry

    obj = get_registry("pair_scorers").get(table["name"])
    if exp.pair_scorer is None or "model" in inspect.signature(obj).parameters:
        return build_pair_scorer(exp.manifest, exp.ctx, exp.model)
    return exp.pair_scorer


def _entry(res: Any, per_class: bool, classes: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {n: {"value": float(v), "formula": res.formulas.get(n, "")}
                             for n, v in res.metrics.items()}
    if per_class:
        entry["per_class"] = {n: {classes[int(k)]: float(v) for k, v in pc.items()}
                              for n, pc in res.per_class.items()}
    return entry


def _base_rows(hasher: Any, qe: np.ndarray, ge: np.ndarray, device: torch.device
               ) -> Callable[[np.ndarray], np.ndarray]:
    """``rows -> (len(rows), G)`` float32 scores of the hasher's ranking (higher = closer:
    cosine of the codes, or minus the Hamming distance), as the evaluator ranks them."""
    from zsbir.evaluation.scorers import _Scorer

    binary = bool(hasher.binary)
    sc = _Scorer(hasher.encode(qe), hasher.encode(ge), "hamming" if binary else "cosine",
                 device, use_numpy=device.type == "cpu")

    def rows(idx: np.ndarray) -> np.ndarray:
        s = sc.chunk(np.asarray(idx, np.int64))
        s = -s.to(torch.float32) if sc.integer else s
        return s.cpu().numpy()

    return rows


def evaluate_pairs(exp: Any, task: str, qe: np.ndarray, ge: np.ndarray, ql: np.ndarray,
                   gl: np.ndarray, q_out: Mapping[str, np.ndarray],
                   g_out: Mapping[str, np.ndarray], scorer: Any,
                   progress: Callable[[dict[str, Any]], None] | None = None,
                   seconds: dict[str, float] | None = None) -> dict[str, Any]:
    """The task's pair-scoring entries (see the module docstring): ``{key: {metric:
    {"value", "formula"}, ...}}``; ``seconds`` receives each entry's time."""
    from zsbir.evaluation import evaluate_score_fn
    from zsbir.progress import phase

    table, ev = exp.manifest.pair_scorer, exp.manifest.evaluation
    if scorer is None or table is None:
        return {}
    device = exp.ctx.device
    batcher = PairBatcher(scorer, q_out, g_out, table["batch_pairs"], device)
    classes = list(getattr(exp.data, "classes", []) or [])
    common = dict(chunk_size=ev.chunk_size or None, device=device, per_class=ev.per_class)
    out: dict[str, Any] = {}

    def record(key: str, res: Any, t0: float) -> None:
        out[key] = _entry(res, ev.per_class, classes)
        if seconds is not None:
            seconds[f"{task} {key}"] = time.perf_counter() - t0
        if progress:
            progress({"evaluated": f"{task} {key}",
                      "metrics": {k: v["value"] for k, v in out[key].items()
                                  if k != "per_class"}})

    k = int(table["top_k"])
    if k > 0:
        for hasher in exp.hashers:
            key = topk_key(hasher.tag, batcher.tag, k)
            t0 = time.perf_counter()
            base = _base_rows(hasher, qe, ge, device)

            def rescored(rows: np.ndarray, base: Callable = base) -> np.ndarray:
                s = base(rows)
                top = stable_topk(s, k)
                pair = batcher.score(np.repeat(np.asarray(rows, np.int64), top.shape[1]),
                                     top.ravel()).reshape(top.shape)
                return merged_scores(s, top, pair)

            with phase(f"re-scoring the top {k} of {task} {hasher.tag} with {batcher.tag}"):
                res = evaluate_score_fn(rescored, ql, gl, ev.metrics, **common)
            record(key, res, t0)
    if table["exhaustive"]:
        key = exhaustive_key(batcher.tag)
        t0 = time.perf_counter()
        with phase(f"scoring all {len(ql)} x {len(gl)} pairs of {task} with {batcher.tag}"):
            res = evaluate_score_fn(batcher.rows, ql, gl, ev.metrics, **common)
        record(key, res, t0)
    return out
