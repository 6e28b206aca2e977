"""Evaluation of a built experiment: embed the unseen queries and gallery, index them with
every hasher, re-rank, score (:func:`evaluate_experiment`), and the retrieval grid."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zsbir.build import Experiment
from zsbir.engine import distributed as D
from zsbir.engine import threads as T
from zsbir.engine.embed import embed_outputs, embed_split
from zsbir.engine.pair_eval import evaluate_pairs, evaluation_outputs, scorer_for

__all__ = ["evaluate_experiment", "positive_rate"]


def evaluate_experiment(exp: Experiment, run_dir: Path | None = None,
                        progress: Callable[[dict[str, Any]], None] | None = None,
                        fit_hashers: bool = True) -> dict[str, Any]:
    """Embed the unseen queries and gallery, index them with every hasher, score.

    Besides the protocol's own task (unseen sketches -> unseen photos), two more can be
    asked for in ``[evaluation]``: ``generalized`` (GZS-SBIR: the gallery also holds the
    seen classes' photos, SBTKNet Table 3) and ``pbir`` (ZS-PBIR, SAKE Table 4: the
    unseen photos of each class are split in two by position; odd ones query even ones).

    ``fit_hashers=False``: the hashers are already fitted (a trained run's, loaded from its
    ``final.pt`` by ``zsbir evaluate RUN_DIR``) and are used as they are.
    """
    from zsbir.data.base import PHOTO, Split
    from zsbir.progress import phase

    m, data, ev = exp.manifest, exp.data, exp.manifest.evaluation
    t0 = time.perf_counter()
    stacked = _stack_views(exp)  # rerankers that need the model: also embed image views
    # per-item outputs besides the embedding (the pair scorer's, the rerankers'): one pass
    names = ("embedding", *evaluation_outputs(exp))
    try:
        q_out, q_kept, skipped = embed_outputs(exp, data.query, names,
                                               f"embedding {len(data.query)} queries")
        g_out, g_kept, g_skip = embed_outputs(exp, data.gallery, names,
                                              f"embedding {len(data.gallery)} gallery images")
        q_emb, g_emb = q_out.pop("embedding"), g_out.pop("embedding")
        skipped += g_skip
        q_lab, g_lab = data.query.labels[q_kept], data.gallery.labels[g_kept]
        name = m.protocol["name"]
        tasks = {name: (q_emb, q_lab, g_emb, g_lab)}
        task_outputs = {name: (q_out, g_out)}  # task -> (query, gallery) outputs by name
        if ev.generalized and not data.generalized:
            seen = Split.concat(data.train.of_domain(PHOTO), data.val.of_domain(PHOTO))
            s_out, s_kept, s_skip = embed_outputs(
                exp, seen, names, f"embedding {len(seen)} seen-class photos (generalized)")
            s_emb = s_out.pop("embedding")
            skipped += s_skip
            tasks[f"{name}-generalized"] = (q_emb, q_lab, np.concatenate([g_emb, s_emb]),
                                            np.concatenate([g_lab, seen.labels[s_kept]]))
            task_outputs[f"{name}-generalized"] = (q_out, {n: np.concatenate([g_out[n], v])
                                                           for n, v in s_out.items()})
        if ev.pbir:
            unseen = np.flatnonzero(g_lab >= len(data.seen_classes))
            rank_in_class = np.zeros(len(unseen), dtype=np.int64)
            for lab in np.unique(g_lab[unseen]):
                members = g_lab[unseen] == lab
                rank_in_class[members] = np.arange(members.sum())
            qi, gi = unseen[rank_in_class % 2 == 1], unseen[rank_in_class % 2 == 0]
            tasks[f"{name}-pbir"] = (g_emb[qi], g_lab[qi], g_emb[gi], g_lab[gi])
            task_outputs[f"{name}-pbir"] = ({n: v[qi] for n, v in g_out.items()},
                                            {n: v[gi] for n, v in g_out.items()})
    except BaseException:
        if stacked:  # never leave the model wrapped for the extra views
            exp.model = exp.model.model
        raise
    embed_time = time.perf_counter() - t0
    if stacked:  # plain embeddings from here on; tasks keep every view for the rerankers
        exp.model = exp.model.model
        d = q_emb.shape[1] // len(stacked)
        q_emb, g_emb = q_emb[:, :d], g_emb[:, :d]

    fit_on = g_emb
    if fit_hashers and any(t["name"] != "none" for t in m.hashers):
        fit_on, _, _ = embed_split(  # SAKE: ITQ on training embeddings
            exp, data.train, f"embedding {len(data.train)} training images (to fit the hashers)")
    if not D.is_main():  # data-parallel: the others only helped embed; rank 0 scores
        return {"rank": D.rank(), "_eval_skipped": []}
    if fit_hashers:
        with phase("fitting hashers", total=len(exp.hashers), unit="hashers") as advance:
            for hasher in exp.hashers:
                hasher.fit(fit_on, seed=m.run.seed)
                advance()

    results: dict[str, Any] = {"protocol": dict(m.protocol), "results": {}, "chance": {},
                               "sizes": {}}
    rerank_seconds: dict[str, float] = {}
    pair_seconds: dict[str, float] = {}
    scorer = scorer_for(exp)  # around the weights evaluated
    for task, (qe, ql, ge, gl) in tasks.items():
        per_hasher = {}
        views, (qe, ge) = (qe, ge), (qe[:, :q_emb.shape[1]], ge[:, :q_emb.shape[1]])
        for hasher in exp.hashers:
            with phase(f"scoring {task} {hasher.tag}"):
                per_hasher[hasher.tag] = _score(exp, hasher, qe, ql, ge, gl)
            if progress:
                progress({"evaluated": f"{task} {hasher.tag}",
                          "metrics": {k: v["value"] for k, v in per_hasher[hasher.tag].items()
                                      if k != "per_class"}})
        per_hasher.update(_score_rerankers(exp, task, *views, ql, gl, stacked, progress,
                                           rerank_seconds, results, *task_outputs[task]))
        per_hasher.update(evaluate_pairs(exp, task, qe, ge, ql, gl, *task_outputs[task],
                                         scorer, progress, pair_seconds))
        results["results"][task] = per_hasher
        results["chance"][task] = positive_rate(ql, gl)
        results["sizes"][task] = {"queries": int(len(ql)), "gallery": int(len(gl))}
    results["chance_note"] = ("gallery positive rate: the expected mAP@all and P@K of a "
                              "random ranking")
    results["num_queries"], results["num_gallery"] = int(len(q_lab)), int(len(g_lab))
    results["seconds"] = {"embed": embed_time, "evaluate_total": time.perf_counter() - t0}
    if rerank_seconds:
        results["seconds"]["rerankers"] = rerank_seconds
    if pair_seconds:
        results["seconds"]["pair_scorer"] = pair_seconds
    results["_eval_skipped"] = [list(s) for s in skipped]
    if run_dir is not None:
        np.savez(run_dir / "features.npz", query_features=q_emb, query_labels=q_lab,
                 gallery_features=g_emb, gallery_labels=g_lab)
        if ev.grid_queries > 0:
            results["grid"] = str(_grid(exp, q_emb, q_kept, g_emb, g_kept, run_dir))
    return results


def positive_rate(query_labels: np.ndarray, gallery_labels: np.ndarray) -> float:
    """Mean over queries of (#same-class gallery items / gallery size): chance level."""
    labels, counts = np.unique(gallery_labels, return_counts=True)
    per_label = dict(zip(labels.tolist(), counts.tolist()))
    return float(np.mean([per_label.get(int(q), 0) for q in query_labels])
                 / max(len(gallery_labels), 1))


@T.phase("evaluate")  # nothing decodes beside scoring: the process's whole CPU share
def _score(exp: Experiment, hasher: Any, qe: np.ndarray, ql: np.ndarray, ge: np.ndarray,
           gl: np.ndarray) -> dict[str, Any]:
    from zsbir.evaluation import evaluate_retrieval

    ev = exp.manifest.evaluation
    res = evaluate_retrieval(
        hasher.encode(qe), ql, hasher.encode(ge), gl, ev.metrics,
        distance="hamming" if hasher.binary else "cosine",
        chunk_size=ev.chunk_size or None, device=exp.ctx.device, per_class=ev.per_class)
    entry: dict[str, Any] = {name: {"value": float(v), "formula": res.formulas.get(name, "")}
                             for name, v in res.metrics.items()}
    if ev.per_class:
        entry["per_class"] = {name: {exp.data.classes[int(k)]: float(v) for k, v in pc.items()}
                              for name, pc in res.per_class.items()}
    return entry


class _ViewStack(torch.nn.Module):
    """The model, its embedding concatenated with the embeddings of image views
    (:data:`zsbir.rerankers.VIEWS`): (B, (1 + V) d), the plain embedding first."""

    def __init__(self, model: torch.nn.Module, views: list[str]):
        super().__init__()
        self.model, self.views = model, views

    def forward(self, image: torch.Tensor, domain: torch.Tensor) -> dict[str, torch.Tensor]:
        from zsbir.rerankers import VIEWS

        plain = self.model(image, domain)  # its other outputs pass through
        out = [plain["embedding"]]
        out += [self.model(VIEWS[v](image), domain)["embedding"] for v in self.views]
        return {**plain, "embedding": torch.cat(out, dim=1)}


def _stack_views(exp: Experiment) -> list[str]:
    """If a reranker ``needs_model``, wrap ``exp.model`` so the embedding passes also embed
    every view any reranker asks for; returns the column blocks' names (``"plain"`` first),
    or ``[]`` when nothing was wrapped."""
    views: list[str] = []
    for r in getattr(exp, "rerankers", []):
        if getattr(r, "needs_model", False):
            views += [v for v in r.views if v not in views]
    if not views:
        return []
    exp.model = _ViewStack(exp.model, views)
    return ["plain", *views]


@T.phase("evaluate")
def _score_rerankers(exp: Experiment, task: str, qe: np.ndarray, ge: np.ndarray,
                     ql: np.ndarray, gl: np.ndarray, stacked: list[str],
                     progress: Callable[[dict[str, Any]], None] | None,
                     seconds: dict[str, float], results: dict[str, Any],
                     q_out: dict[str, np.ndarray] | None = None,
                     g_out: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every reranker on every real-valued hasher's codes: ``"<hasher>+<reranker>"``
    entries (binary hashers are skipped, with a note). ``qe``/``ge`` hold all the views
    (blocks of columns named by ``stacked``, the plain embedding first) when some
    reranker needs the model; ``q_out``/``g_out`` the per-item outputs the rerankers read
    (``outputs``: name -> rows aligned with ``qe``/``ge``), handed over as
    ``query_outputs``/``gallery_outputs`` (contract: :mod:`zsbir.rerankers.base`).
    Fitting sees the unlabeled gallery (and queries) and their outputs, never a label."""
    from zsbir.evaluation import evaluate_score_fn

    rerankers, ev = getattr(exp, "rerankers", []), exp.manifest.evaluation
    out: dict[str, Any] = {}
    if not rerankers:
        return out
    d = qe.shape[1] // max(len(stacked), 1)
    for hasher in exp.hashers:
        if hasher.binary:
            note = (f"rerankers skipped on binary hasher {hasher.tag}: they re-rank "
                    "real-valued embeddings")
            if note not in results.setdefault("notes", []):
                results["notes"].append(note)
            continue
        for r in rerankers:
            key = f"{hasher.tag}+{r.tag}"
            t0 = time.perf_counter()
            if r.needs_model:  # (N, views, d): the plain view, then r.views in order
                cols = [0] + [stacked.index(v) for v in r.views]
                q = np.stack([hasher.encode(qe[:, c * d:(c + 1) * d]) for c in cols], 1)
                g = np.stack([hasher.encode(ge[:, c * d:(c + 1) * d]) for c in cols], 1)
            else:
                q, g = hasher.encode(qe[:, :d]), hasher.encode(ge[:, :d])
            kw: dict[str, Any] = {}
            wants = tuple(getattr(r, "outputs", ()))
            if wants:
                kw = {"query_outputs": {n: q_out[n] for n in wants} if q_out else None,
                      "gallery_outputs": {n: g_out[n] for n in wants} if g_out else None}
            r.fit(g, queries=q if r.uses_queries else None, **kw)
            res = evaluate_score_fn(r.score_rows(q, g, query_outputs=kw.get("query_outputs")),
                                    ql, gl, ev.metrics,
                                    chunk_size=ev.chunk_size or None,
                                    device=exp.ctx.device, per_class=ev.per_class)
            seconds[f"{task} {key}"] = time.perf_counter() - t0
            entry: dict[str, Any] = {n: {"value": float(v), "formula": res.formulas.get(n, "")}
                                     for n, v in res.metrics.items()}
            if ev.per_class:
                entry["per_class"] = {n: {exp.data.classes[int(k)]: float(v)
                                          for k, v in pc.items()}
                                      for n, pc in res.per_class.items()}
            out[key] = entry
            if progress:
                progress({"evaluated": f"{task} {key}",
                          "metrics": {k: v["value"] for k, v in entry.items()
                                      if k != "per_class"}})
    return out


def _grid(exp: Experiment, q_emb: np.ndarray, q_kept: np.ndarray, g_emb: np.ndarray,
          g_kept: np.ndarray, run_dir: Path) -> Path:
    from zsbir.report.grid import pick_queries, retrieval_grid

    data, ev = exp.data, exp.manifest.evaluation
    q_lab = data.query.labels[q_kept]
    picks = pick_queries(q_lab, ev.grid_queries)
    q = torch.nn.functional.normalize(torch.from_numpy(q_emb[picks]), dim=1)
    g = torch.nn.functional.normalize(torch.from_numpy(g_emb), dim=1)
    top = torch.topk(q @ g.T, k=min(ev.grid_top, len(g)), dim=1).indices.numpy()
    return retrieval_grid(
        [data.query.sources[q_kept[i]] for i in picks], q_lab[picks],
        [[data.gallery.sources[g_kept[j]] for j in row] for row in top],
        [data.gallery.labels[g_kept[row]] for row in top],
        data.reader, run_dir / "retrievals.png", class_names=data.classes,
    )
