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
from zsbir.engine.embed import embed_split

__all__ = ["evaluate_experiment", "positive_rate", "reranker_outputs"]


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
    names = reranker_outputs(getattr(exp, "rerankers", []))  # e.g. ("logits",)
    try:
        q_emb, q_out, q_kept, skipped = _embed(exp, data.query, names,
                                               f"embedding {len(data.query)} queries")
        g_emb, g_out, g_kept, g_skip = _embed(exp, data.gallery, names,
                                              f"embedding {len(data.gallery)} gallery images")
        skipped += g_skip
        q_lab, g_lab = data.query.labels[q_kept], data.gallery.labels[g_kept]
        name = m.protocol["name"]
        # task -> (queries, labels, gallery, labels, query outputs, gallery outputs)
        tasks = {name: (q_emb, q_lab, g_emb, g_lab, q_out, g_out)}
        if ev.generalized and not data.generalized:
            seen = Split.concat(data.train.of_domain(PHOTO), data.val.of_domain(PHOTO))
            s_emb, s_out, s_kept, s_skip = _embed(
                exp, seen, names, f"embedding {len(seen)} seen-class photos (generalized)")
            skipped += s_skip
            tasks[f"{name}-generalized"] = (
                q_emb, q_lab, np.concatenate([g_emb, s_emb]),
                np.concatenate([g_lab, seen.labels[s_kept]]), q_out,
                {k: np.concatenate([g_out[k], s_out[k]]) for k in names})
        if ev.pbir:
            unseen = np.flatnonzero(g_lab >= len(data.seen_classes))
            rank_in_class = np.zeros(len(unseen), dtype=np.int64)
            for lab in np.unique(g_lab[unseen]):
                members = g_lab[unseen] == lab
                rank_in_class[members] = np.arange(members.sum())
            qi, gi = unseen[rank_in_class % 2 == 1], unseen[rank_in_class % 2 == 0]
            tasks[f"{name}-pbir"] = (g_emb[qi], g_lab[qi], g_emb[gi], g_lab[gi],
                                     {k: v[qi] for k, v in g_out.items()},
                                     {k: v[gi] for k, v in g_out.items()})
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
    for task, (qe, ql, ge, gl, qo, go) in tasks.items():
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
                                           rerank_seconds, results, qo, go))
        results["results"][task] = per_hasher
        results["chance"][task] = positive_rate(ql, gl)
        results["sizes"][task] = {"queries": int(len(ql)), "gallery": int(len(gl))}
    results["chance_note"] = ("gallery positive rate: the expected mAP@all and P@K of a "
                              "random ranking")
    results["num_queries"], results["num_gallery"] = int(len(q_lab)), int(len(g_lab))
    results["seconds"] = {"embed": embed_time, "evaluate_total": time.perf_counter() - t0}
    if rerank_seconds:
        results["seconds"]["rerankers"] = rerank_seconds
    results["_eval_skipped"] = [list(s) for s in skipped]
    if run_dir is not None:
        np.savez(run_dir / "features.npz", query_features=q_emb, query_labels=q_lab,
                 gallery_features=g_emb, gallery_labels=g_lab)
        if ev.grid_queries > 0:
            results["grid"] = str(_grid(exp, q_emb, q_kept, g_emb, g_kept, run_dir))
    return results


def reranker_outputs(rerankers: Any) -> tuple[str, ...]:
    """Every per-item model output the rerankers read (their ``outputs``), in first-seen
    order (contract 3, :mod:`zsbir.rerankers.base`)."""
    names: list[str] = []
    for r in rerankers:
        names += [n for n in getattr(r, "outputs", ()) if n not in names]
    return tuple(names)


def _embed(exp: Experiment, split: Any, names: tuple[str, ...], label: str
           ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, list[tuple[str, str]]]:
    """Embeddings, the outputs ``names`` (one forward pass per image), kept indices and
    skipped files of ``split``."""
    if not names:
        emb, kept, skipped = embed_split(exp, split, label)
        return emb, {}, kept, skipped
    outs, kept, skipped = _embed_outputs(exp, split, ("embedding", *names), label)
    return outs["embedding"], {n: outs[n] for n in names}, kept, skipped


def _embed_outputs(exp: Experiment, split: Any, names: tuple[str, ...], label: str
                   ) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[str, str]]]:
    """Every named model output of ``split``, float32, stacked on axis 0 (contract 1's
    ``embed_outputs``, used from :mod:`zsbir.engine.embed` when it has it)."""
    from zsbir.engine import embed

    if hasattr(embed, "embed_outputs"):
        return embed.embed_outputs(exp, split, names, label)
    model = exp.model
    widths: list[int] = []

    def fn(b: dict[str, Any]) -> torch.Tensor:
        out = model(b["image"], b["domain"])
        missing = [n for n in names if n not in out]
        if missing:
            raise ValueError(f"the model ({type(getattr(model, 'model', model)).__name__}) "
                             f"returns no {missing[0]!r} output (it returns "
                             f"{sorted(out)}); a reranker reads it")
        parts = [out[n].reshape(out[n].shape[0], -1) for n in names]
        widths[:] = [p.shape[1] for p in parts]
        return torch.cat(parts, dim=1)

    was_training = model.training
    model.eval()
    try:
        flat, kept, skipped = embed._run(exp, split, fn, label)
    finally:
        model.train(was_training)
    cols = np.cumsum([0, *widths])
    arr = flat.numpy()
    return ({n: np.ascontiguousarray(arr[:, cols[i]:cols[i + 1]]) for i, n in enumerate(names)},
            kept, skipped)


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

        plain = self.model(image, domain)  # its other outputs (logits, ...) pass through
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
