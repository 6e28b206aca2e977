"""``zsbir tune RUN_DIR``: choose the parameters of the generalized-retrieval rerankers
(:mod:`zsbir.rerankers.seen`) on seen-class validation data only (:func:`tune_run`).

No test class is ever looked at. The run's seen classes are cut into ``folds`` disjoint
groups (seeded); in each fold one group plays the *pseudo-unseen* classes ``P`` and the
others the *pseudo-seen* classes ``S'``, and three retrieval tasks are built from images
of seen classes only:

- pseudo-unseen: the validation sketches of ``P`` against the validation photos of ``P``;
- pseudo-generalized: the same sketches against those photos plus every photo (training
  and validation) of ``S'`` (as the generalized task's gallery holds every seen photo);
- pseudo-seen queries (for the gated rerankers): the validation sketches of ``S'`` against
  that same gallery (a mixed deployment's sketch may be of a seen class).

The model was trained on ``P`` too, which would make its classifier sure of exactly the
items that should look unseen. Two things limit that bias: the classifier's columns of
``P`` are removed (each item's posterior is the softmax over the ``S'`` logits only: a
``P`` item, like a real unseen one, has no class of its own to be sure of), and every
``P`` image used is a *validation* image (never trained on; the protocol's ``val`` split,
``protocol.val_fraction`` of each seen class). What remains is that the embedding itself
learned to separate ``P`` from ``S'``: pseudo-unseen classes are better clustered than
real unseen ones, and the validation gallery holds few photos per pseudo-unseen class
(3 with the real-data benchmark's 25 photos and ``val_fraction = 0.1``), so neighbourhood
sizes (``k1``) are chosen in a sparser regime than the test's. The chosen values are a
validation estimate, not a test-set optimum; benchmarks/README.md measures how they do.

Choice: for every reranker family, every point of its grid (:data:`GRIDS`) is scored
(mAP@all, mean over folds); the chosen point maximizes the pseudo-generalized mAP@all
(gated families: the mean of that and the pseudo-seen queries' mAP@all, equal weight to
both kinds of sketch) among the points whose pseudo-unseen mAP@all is at most
``max_unseen_drop`` below the family's uncorrected ranking (``gamma = 0``); ties go to the
earlier grid point (smaller corrections). Written: ``RUN_DIR/tune.json`` (folds, grid,
every point's figures, the choice) and the chosen tables into ``RUN_DIR``'s
``manifest.resolved.toml`` ``[[rerankers]]`` (replacing tables of the same name), which
``zsbir evaluate RUN_DIR`` then scores.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["FAMILIES", "GRIDS", "TUNE_FILE", "choose", "pseudo_folds", "score_grid",
           "tune_run", "write_choice"]

TUNE_FILE = "tune.json"
#: the registered rerankers ``zsbir tune`` knows how to choose parameters for
FAMILIES = ("seen_suppress", "seen_gate", "seen_suppress_kr", "seen_gate_kr")
_GAMMA = [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0]
_T = [0.5, 1.0, 2.0]
_GATE = {"tau": [0.3, 0.5, 0.7], "width": [0.05], "beta": [0.0, 0.2]}
#: default search grid per family (k2 = 6, lambda = 0.3: k-reciprocal's paper values)
GRIDS: dict[str, dict[str, list[Any]]] = {
    "seen_suppress": {"gamma": _GAMMA, "temperature": _T},
    "seen_gate": {"gamma": _GAMMA, "temperature": _T, **_GATE},
    "seen_suppress_kr": {"k1": [10, 20], "gamma": _GAMMA, "temperature": _T},
    "seen_gate_kr": {"k1": [10, 20], "gamma": _GAMMA, "temperature": _T, **_GATE},
}
#: parameters that need a new fit (the rest only change the correction)
_FIT_KEYS = ("k1", "k2", "lambda_value")


def pseudo_folds(num_seen: int, folds: int, seed: int) -> list[np.ndarray]:
    """Disjoint groups of seen-class labels (a seeded permutation cut in ``folds``)."""
    if folds < 2 or folds > num_seen:
        raise ValueError(f"folds must be in [2, {num_seen}] (the seen classes), got {folds}")
    perm = np.random.default_rng(seed).permutation(num_seen)
    return [np.sort(p) for p in np.array_split(perm, folds)]


def _map(scores: torch.Tensor, ql: np.ndarray, gl: np.ndarray) -> float:
    """mAP@all (VOC envelope, as :func:`zsbir.evaluation.metrics.voc_ap`) of a (Q, G) score
    matrix, in one sort (the grid search scores thousands of points; exact ties, which
    the evaluator orders pessimistically, are ordered by the sort here). Queries without a
    positive are left out, as the evaluator does."""
    rel = torch.from_numpy(np.asarray(ql)[:, None] == np.asarray(gl)[None, :])
    order = torch.argsort(scores, dim=1, descending=True, stable=True)
    hit = rel.gather(1, order).to(torch.float64)
    ranks = torch.arange(1, hit.shape[1] + 1, dtype=torch.float64)
    prec = hit.cumsum(1) / ranks * hit  # precision at each positive, 0 elsewhere
    env = torch.flip(torch.cummax(torch.flip(prec, [1]), 1).values, [1])
    n_pos = hit.sum(1)
    have = n_pos > 0
    return float(((env * hit).sum(1)[have] / n_pos[have]).mean()) if bool(have.any()) \
        else 0.0


def _points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(grid)
    return [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))]


def score_grid(family: str, grid: dict[str, list[Any]], fold_tasks: Sequence[dict[str, Any]],
               progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Every grid point of ``family`` on every fold: a list of ``{"params", "unseen",
    "generalized", "seen_queries"}`` (mAP@all per fold; ``seen_queries`` only for gated
    families). A fold task holds unit-less float arrays: ``q``/``lq`` (pseudo-unseen
    sketches, labels, logits ``zq``), ``g``/``lg``/``zg`` (pseudo-generalized gallery,
    the first ``n_unseen_gallery`` rows its pseudo-unseen photos), ``s``/``ls``/``zs``
    (pseudo-seen sketches)."""
    from zsbir.registry import rerankers

    gated = "gate" in family
    points = _points(grid)
    out = [{"params": p, "unseen": [], "generalized": [], "seen_queries": []} for p in points]
    fit_groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(points):
        fit_groups.setdefault(tuple(p.get(k) for k in _FIT_KEYS), []).append(i)
    for f, t in enumerate(fold_tasks):
        nu = t["n_unseen_gallery"]
        for key, members in fit_groups.items():
            fit_params = {k: v for k, v in zip(_FIT_KEYS, key) if v is not None}
            views = {}  # unseen-only gallery and generalized gallery: one fit each
            for view, (g, zg) in {"unseen": (t["g"][:nu], t["zg"][:nu]),
                                  "generalized": (t["g"], t["zg"])}.items():
                r = rerankers.get(family)(**fit_params, gamma=0.0)
                r.fit(g, gallery_outputs={"logits": zg})
                qs = {"unseen": (t["q"], t["zq"])}
                if view == "generalized":
                    qs["generalized"] = qs.pop("unseen")
                    if gated:
                        qs["seen_queries"] = (t["s"], t["zs"])
                base = {name: r.base_scores(_unit(q)) for name, (q, _) in qs.items()}
                views[view] = (r, qs, base)
            for i in members:
                for view, (r, qs, base) in views.items():
                    _set(r, points[i])
                    for name, (_, zq) in qs.items():
                        s = r.correct(base[name], torch.from_numpy(zq))
                        labels = t["ls"] if name == "seen_queries" else t["lq"]
                        gl = t["lg"][:nu] if view == "unseen" else t["lg"]
                        out[i][name].append(_map(s, labels, gl))
        if progress:
            progress(f"{family}: fold {f + 1}/{len(fold_tasks)}, {len(points)} points")
    return out


def _unit(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(x, np.float32))
    return torch.nn.functional.normalize(t, dim=1)


def _set(r: Any, params: dict[str, Any]) -> None:
    """Set the correction's parameters of a fitted reranker (the temperature refits the
    gallery posteriors, which is cheap; k-reciprocal's state is kept)."""
    for k in ("gamma", "tau", "width", "beta"):
        if k in params:
            setattr(r, k, float(params[k]))
    if "temperature" in params and float(params["temperature"]) != r.temperature:
        r.temperature = float(params["temperature"])
        r.p_g = r.posterior(r.gallery_outputs["logits"])
        r.sigma_g = r.p_g.max(1).values


def _objective(entry: dict[str, Any], gated: bool) -> float:
    gen = float(np.mean(entry["generalized"]))
    return 0.5 * (gen + float(np.mean(entry["seen_queries"]))) if gated else gen


def choose(family: str, scored: list[dict[str, Any]], max_unseen_drop: float
           ) -> dict[str, Any]:
    """The chosen point of ``scored`` (:func:`score_grid`; rule in the module docstring):
    its entry with ``objective``, the ``baseline`` it was held to and ``feasible`` count."""
    gated = "gate" in family
    for e in scored:
        e["objective"] = _objective(e, gated)
        e["unseen_mean"] = float(np.mean(e["unseen"]))
    # the uncorrected ranking of the same base (gamma = 0, beta = 0; per k1)
    def base_of(e: dict[str, Any]) -> float:
        same = [x["unseen_mean"] for x in scored if x["params"].get("gamma") == 0
                and not x["params"].get("beta") and all(
                    x["params"].get(k) == e["params"].get(k) for k in _FIT_KEYS)]
        return max(same) if same else max(x["unseen_mean"] for x in scored)

    feasible = [e for e in scored if e["unseen_mean"] >= base_of(e) - max_unseen_drop]
    best = max(feasible or scored, key=lambda e: e["objective"])  # first of equals wins
    return {**best, "baseline_unseen": base_of(best), "feasible": len(feasible),
            "points": len(scored)}


def _fold_tasks(val: dict[str, Any], photos: dict[str, Any], folds: list[np.ndarray]
                ) -> list[dict[str, Any]]:
    """The pseudo tasks of every fold (module docstring) from seen-class arrays: ``val``
    (embeddings ``e``, logits ``z``, labels ``y``, domain ``d``) and ``photos`` (every
    seen-class photo, training and validation)."""
    from zsbir.data.base import PHOTO, SKETCH

    tasks = []
    for p in folds:
        in_p = np.isin(np.arange(val["z"].shape[1]), p)
        keep = np.flatnonzero(~in_p)  # classifier columns of S' only
        vp = np.isin(val["y"], p)
        qi = np.flatnonzero(vp & (val["d"] == SKETCH))
        gi = np.flatnonzero(vp & (val["d"] == PHOTO))
        si = np.flatnonzero(~vp & (val["d"] == SKETCH))
        pi = np.flatnonzero(~np.isin(photos["y"], p))
        tasks.append({
            "pseudo_unseen": p.tolist(),
            "q": val["e"][qi], "lq": val["y"][qi], "zq": val["z"][qi][:, keep],
            "g": np.concatenate([val["e"][gi], photos["e"][pi]]),
            "lg": np.concatenate([val["y"][gi], photos["y"][pi]]),
            "zg": np.concatenate([val["z"][gi], photos["z"][pi]])[:, keep],
            "n_unseen_gallery": len(gi),
            "s": val["e"][si], "ls": val["y"][si], "zs": val["z"][si][:, keep],
        })
        if len(qi) == 0 or len(gi) == 0:
            raise ValueError("the validation split holds no sketch or no photo of the "
                             "pseudo-unseen classes: raise protocol.val_fraction (the "
                             "run's protocol) to tune")
    return tasks


def write_choice(run_dir: Path, chosen: dict[str, dict[str, Any]]) -> None:
    """Replace (or append) the tuned tables in ``RUN_DIR/manifest.resolved.toml``'s
    ``[[rerankers]]``, written atomically."""
    from zsbir.engine.rundir import RESOLVED
    from zsbir.manifest import load
    from zsbir.manifest.tomlio import dump_toml

    path = run_dir / RESOLVED
    raw = load(path)
    tables = [t for t in raw.get("rerankers", []) if t.get("name") not in chosen]
    tables += [{"name": name, **params} for name, params in chosen.items()]
    raw["rerankers"] = tables
    tmp = path.with_name(f".{RESOLVED}.tune.tmp")
    tmp.write_text(dump_toml(raw), encoding="utf-8")
    tmp.replace(path)


def tune_run(run_dir: str | Path, families: Sequence[str] = FAMILIES, folds: int | None = None,
             max_unseen_drop: float = 0.01, seed: int = 0, overrides: Sequence[str] = (),
             grids: dict[str, dict[str, list[Any]]] | None = None, write: bool = True,
             progress: Callable[[str], None] | None = None, exp: Any = None,
             cache: dict[str, Any] | None = None) -> dict[str, Any]:
    """Choose every parameter of ``families`` on ``run_dir``'s seen-class validation data
    (module docstring); returns (and writes, unless ``write=False``) the record.

    ``exp``: the run's experiment already built (``build(..., "evaluate", checkpoint)``);
    ``cache``: a dict that keeps the embedded splits (``"val"``, ``"photos"``: (outputs,
    kept indices)) for a caller that scores the same photos afterwards (the benchmark)."""
    from zsbir.build import build
    from zsbir.data.base import PHOTO, Split
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.embed import embed_outputs
    from zsbir.engine.evaluate_run import _manifest_for
    from zsbir.engine.rundir import RunDirError

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    final = run_dir / "checkpoints" / "final.pt"
    if not final.is_file():
        raise RunDirError(f"{str(run_dir)!r} has no checkpoints/final.pt: only a finished "
                          "`zsbir run` can be tuned")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"zsbir tune chooses parameters for {', '.join(FAMILIES)}; not for "
                         f"{', '.join(unknown)}")
    grids = {**GRIDS, **(grids or {})}
    if exp is None:
        ckpt = load_checkpoint(final)
        m = _manifest_for(ckpt, None, None, overrides, f"{final} (zsbir tune)")
        exp = build(m, "evaluate", checkpoint={k: v for k, v in ckpt.items()
                                               if k != "hashers"})
    exp.model.eval()
    data = exp.data
    n_seen = len(data.seen_classes)
    val = data.val
    photos = Split.concat(data.train.of_domain(PHOTO), data.val.of_domain(PHOTO))
    cache = {} if cache is None else cache
    for key, split in (("val", val), ("photos", photos)):
        if key not in cache:
            out, kept, _ = embed_outputs(exp, split, ("embedding", "logits"),
                                         f"embedding {len(split)} {key} images")
            cache[key] = (out, kept)
    (vo, vk), (po, pk) = cache["val"], cache["photos"]
    ve, pe = vo["embedding"], po["embedding"]
    if vo["logits"].shape[1] != n_seen:
        raise ValueError(f"the model's logits have {vo['logits'].shape[1]} columns, the run "
                         f"{n_seen} seen classes")
    n_folds = folds or max(2, n_seen // max(1, min(len(data.unseen_classes), n_seen // 2)))
    groups = pseudo_folds(n_seen, n_folds, seed)
    tasks = _fold_tasks({"e": ve, "z": vo["logits"], "y": val.labels[vk], "d": val.domains[vk]},
                        {"e": pe, "z": po["logits"], "y": photos.labels[pk]}, groups)
    record: dict[str, Any] = {
        "run_dir": str(run_dir), "seed": seed, "folds": [t["pseudo_unseen"] for t in tasks],
        "fold_classes": [[data.seen_classes[i] for i in t["pseudo_unseen"]] for t in tasks],
        "max_unseen_drop": max_unseen_drop,
        "sizes": [{"unseen_queries": len(t["q"]), "unseen_gallery": t["n_unseen_gallery"],
                   "gallery": len(t["g"]), "seen_queries": len(t["s"])} for t in tasks],
        "rule": "max pseudo-generalized mAP@all (gated: mean with the pseudo-seen queries' "
                "mAP@all) among points whose pseudo-unseen mAP@all is at most "
                "max_unseen_drop below gamma = 0",
        "families": {}, "chosen": {}, "overrides": list(overrides),
    }
    for fam in families:
        scored = score_grid(fam, grids[fam], tasks, progress)
        best = choose(fam, scored, max_unseen_drop)
        record["families"][fam] = {"grid": grids[fam], "points": scored,
                                   "chosen": {k: v for k, v in best.items()}}
        record["chosen"][fam] = dict(best["params"])
    record["seconds"] = time.perf_counter() - t0
    if write:
        (run_dir / TUNE_FILE).write_text(json.dumps(record, indent=1, default=float))
        write_choice(run_dir, record["chosen"])
    return record
