"""Benchmark: what each method buys on real sketches and photos (sketchy-mini-seen).

Data: ``../shared/data/sketchy-mini-seen`` (104 real Sketchy classes, 25 photos + 25
sketches each, 128 px) read by the ordinary ``folder`` protocol with ``num_unseen = 20``
drawn by ``protocol.seed = 0``: 84 seen classes train, the 20 unseen classes are scored
(500 sketch queries against 500 photos; chance = 1/20). Backbone: EfficientNet-Lite0
with ImageNet weights (student and teacher), 128 px. Rows (manifests in examples/real/):

(a) ImageNet features, no training. ``train.epochs`` must be >= 1, so this row does not go
    through training at all: the script builds the (b) experiment with
    :func:`zsbir.build.build` and calls :func:`zsbir.engine.run.evaluate_experiment` on it
    untrained (no steps with lr 0: BatchNorm statistics would still move). Two variants:
    ``a-pooled`` the backbone's pooled 1280-d features (the model replaced by its backbone
    alone), ``a-svd`` the SVD-initialized 512-d embedding every row (b)-(d) starts from;
(b) L_B only: ``lb.toml``; (c) L_B + L_T: ``lb_lt.toml`` (online teacher, lambda2 = 0);
(d) SAKE: ``sake.toml`` (L_B + L_SAKE, WordNet, lambda2 = 0.3);
(e) SBTKNet: ``sbtknet.toml`` (quadruplet + CE + class-mean knowledge preservation).

Each trained row is an ordinary ``run_experiment`` per seed (``run.seed``; the class split
stays fixed), its metrics read from the run's ``metrics.json``: unseen-class mAP@all (VOC)
and P@25 as mean and standard deviation over seeds (sample std, n - 1), the chance level,
wall time (build + train + evaluate) and training images/s (the run's own epochs: data
path, teacher and losses included; validation and evaluation excluded).

Speed (``--speed-steps``): zsbir's training step with its data path (files decoded and
augmented by the loader workers, :func:`zsbir.engine.bench.bench_train`) against a plain
PyTorch loop over preloaded tensors (decoded and normalized once) with the same model,
loss (CE), optimizer, batch (40), image size (128) and memory format (the manifests set
``train.channels_last = "on"``: 1.45x faster on this CPU), in alternating blocks.

Threads: ``--threads 1`` by default. On the shared 2-core machine, with other jobs
holding a core, two OpenMP threads waiting on each other ran lite0 training 1.4-5x slower
than one thread (measured before these runs); both sides of the speed comparison use the
same setting.

Usage (from the repository root)::

    python benchmarks/real_sketchy_mini.py --seeds 0                   # one seed, all rows
    python benchmarks/real_sketchy_mini.py --seeds 0 1 2 --reuse       # add seeds 1 and 2
    python benchmarks/real_sketchy_mini.py --rows a b --seeds 0 --speed-steps 0

``--reuse`` reads a run whose ``metrics.json`` already exists instead of rerunning it.
Recorded figures: benchmarks/README.md ("Real data").

Generalized-retrieval rerankers (issue 29, ``--tune-eval``): for every finished run of the
rows and seeds asked, ``zsbir tune RUN_DIR`` (:func:`zsbir.engine.tune.tune_run`: every
parameter chosen on seen-class validation data only) then ``zsbir evaluate RUN_DIR`` with
the generalized task and, side by side, the plain ranking, ``k_reciprocal`` (k1 20, the
default ``[[rerankers]]``) and the four tuned ``seen_*`` rerankers; the table gives each
one's change of mAP@all / P@25 against the plain ranking and against k-reciprocal alone
(mean ± std over seeds). ``--sksh-timing`` times them at SK-SH size (15,229 queries x
17,101 photos, 100 seen classes; random inputs, a measured subset of the queries,
extrapolated linearly)::

    python benchmarks/real_sketchy_mini.py --rows b c d e --seeds 0 1 2 --tune-eval \
        --out /work/gz-runs
    python benchmarks/real_sketchy_mini.py --sksh-timing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "real"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "sketchy-mini-seen"
MANIFESTS = {"b": "lb.toml", "c": "lb_lt.toml", "d": "sake.toml", "e": "sbtknet.toml"}
LABELS = {
    "a-pooled": "(a) ImageNet features, pooled 1280-d, no training",
    "a-svd": "(a) ImageNet features, SVD 512-d embedding, no training",
    "b": "(b) L_B only (CE)",
    "c": "(c) L_B + L_T (online teacher, lambda2 = 0)",
    "d": "(d) SAKE: L_B + L_SAKE (WordNet, lambda2 = 0.3)",
    "e": "(e) SBTKNet: quadruplet + CE + class-mean KP",
}
METRICS = ("map@all", "p@25")
#: Rerankers scored side by side with the plain ranking (``[[rerankers]]``, issue 17), each
#: with its paper's default parameters (no tuning on this benchmark).
RERANKERS: list[dict[str, Any]] = [
    {"name": "aqe", "k": 5},
    {"name": "alpha_qe", "k": 5, "alpha": 3.0},
    {"name": "dba", "k": 5},
    {"name": "dba", "k": 5, "qe_k": 5},
    {"name": "k_reciprocal", "k1": 20, "k2": 6, "lambda_value": 0.3},
    {"name": "csls", "k": 10},
    {"name": "domain_center"},
    {"name": "tta", "views": ["hflip"]},
]


def manifest_for(row: str, seed: int, args: argparse.Namespace) -> Any:
    """The resolved manifest of a row, pointed at ``--data`` and ``--out``."""
    from zsbir.manifest import apply_overrides, load, resolve

    path = EXAMPLES / MANIFESTS["b" if row.startswith("a") else row]
    raw = load(path)
    raw = apply_overrides(raw, [
        f"run.output_dir={json.dumps(str(args.out))}", f"run.name=\"{row}_seed{seed}\"",
        f"run.seed={seed}", f"protocol.root={json.dumps(str(args.data))}",
        *(["evaluation.generalized=true"] if args.generalized else []),
        *args.overrides])
    # every reranker side by side, or none (the manifests' own default included)
    raw["rerankers"] = [dict(t) for t in RERANKERS] if args.rerank else []
    return resolve(raw, str(path))


def _summary(metrics: dict[str, Any], wall: float) -> dict[str, Any]:
    task = metrics["protocol"]["name"]
    res = metrics["results"][task]["real"]
    out: dict[str, Any] = {m: res[m]["value"] for m in METRICS}
    out["chance"] = metrics["chance"][task]
    out["wall_s"] = wall
    hist = metrics.get("train", {}).get("history", [])
    rates = [h["images_per_s"] for h in hist if h.get("images_per_s")]
    # equal images per epoch: the overall rate is the harmonic mean of the epochs' rates
    out["images_per_s"] = statistics.harmonic_mean(rates) if rates else None
    out["loss"] = [h["loss"] for h in hist]
    out["val_accuracy"] = [h.get("val_accuracy") for h in hist]
    out["grid"] = metrics.get("grid")
    # every task (unseen, generalized) and every ranking (plain hasher, hasher+reranker)
    out["tasks"] = {t: {key: {m: e[m]["value"] for m in METRICS if m in e}
                        for key, e in per.items()}
                    for t, per in metrics["results"].items()}
    out["rerank_seconds"] = metrics.get("seconds", {}).get("rerankers", {})
    out["embed_seconds"] = metrics.get("seconds", {}).get("embed")
    return out


class PooledFeatures(torch.nn.Module):
    """The backbone alone, its pooled features served as the retrieval embedding."""

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor, domain: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        return {"embedding": self.backbone(image, domain)}


def run_untrained(seed: int, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Row (a): the (b) network built and evaluated without any training step."""
    from zsbir.build import build
    from zsbir.engine.run import evaluate_experiment, run_dir_of

    out = {}
    for variant in ("a-pooled", "a-svd"):
        m = manifest_for(variant, seed, args)
        run_dir = run_dir_of(m)
        done = run_dir / "metrics.json"
        if args.report_only and not done.is_file():
            continue
        if (args.reuse or args.report_only) and done.is_file():
            saved = json.loads(done.read_text())
            out[variant] = _summary(saved, saved["wall_s"])
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "manifest.resolved.toml").write_text(m.to_toml())
        t0 = time.perf_counter()
        exp = build(m, run_dir=run_dir)
        if variant == "a-pooled":
            exp.model = PooledFeatures(exp.model.backbone)
        metrics = evaluate_experiment(exp, run_dir)
        metrics.pop("_eval_skipped", None)
        wall = time.perf_counter() - t0
        metrics["wall_s"] = wall
        metrics["note"] = ("untrained: zsbir.build.build + evaluate_experiment, "
                           f"embedding = {'pooled features' if variant == 'a-pooled' else 'SVD'}")
        done.write_text(json.dumps(metrics, indent=2, default=float))
        out[variant] = _summary(metrics, wall)
    return out


def run_trained(row: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Rows (b)-(e): an ordinary run of the row's manifest."""
    from zsbir.engine.run import run_dir_of, run_experiment

    m = manifest_for(row, seed, args)
    done = run_dir_of(m) / "metrics.json"
    if (args.reuse or args.report_only) and done.is_file():
        saved = json.loads(done.read_text())
        return _summary(saved, saved.get("wall_s", float("nan")))
    if args.report_only:
        return None
    if run_dir_of(m).exists():
        shutil.rmtree(run_dir_of(m))  # a previous, unfinished or replaced run
    t0 = time.perf_counter()

    def progress(e: dict[str, Any]) -> None:
        if "epoch_end" in e:
            loss = ", ".join(f"{k} {v:.3f}" for k, v in e["loss"].items())
            print(f"    epoch {e['epoch_end']}: {loss}; val acc "
                  f"{e.get('val_accuracy', float('nan')):.3f}; {e['images_per_s']:.1f} img/s "
                  f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    metrics = run_experiment(m, progress=progress)
    wall = time.perf_counter() - t0
    metrics["wall_s"] = wall
    done.write_text(json.dumps(metrics, indent=2, default=float))
    return _summary(metrics, wall)


# ------------------------------------------------------------------ issue 29: tune + evaluate
#: ``zsbir evaluate RUN_DIR`` builds the backbone without its pretrained weights (the
#: checkpoint replaces them), and efficientnet_lite then falls back to ImageNet mean/std,
#: while these runs trained with the weights' Inception normalization (0.5, 0.5, 0.5):
#: without this override the re-evaluated run scores 0.173 instead of its 0.257 (row b,
#: seed 0). Reported to the integrator (issue 29's report).
EVAL_FIX = ['model.backbone.weights_normalization="inception"']
SEEN = ("seen_suppress", "seen_gate", "seen_suppress_kr", "seen_gate_kr")
KR = {"name": "k_reciprocal", "k1": 20, "k2": 6, "lambda_value": 0.3}


def tune_and_evaluate(row: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """``zsbir tune`` then the scoring ``zsbir evaluate --set evaluation.generalized=true``
    does, of a finished run, in one embedding pass over the images both need (the queries,
    the unseen photos, every seen-class photo and the validation sketches: 3,352 images
    instead of 5,704 for the two commands; the machine is shared): the plain ranking,
    k-reciprocal and the tuned ``seen_*`` rerankers on the unseen and the generalized task,
    each with the same code ``zsbir evaluate`` runs (the rerankers' ``score_rows`` and
    :func:`zsbir.evaluation.evaluate_score_fn`)."""
    from zsbir.build import build
    from zsbir.data.base import PHOTO, Split
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.embed import embed_outputs
    from zsbir.engine.evaluate_run import _manifest_for
    from zsbir.engine.tune import tune_run
    from zsbir.evaluation import evaluate_score_fn
    from zsbir.registry import rerankers

    run_dir = args.out / f"{row}_seed{seed}"
    final = run_dir / "checkpoints" / "final.pt"
    if not final.is_file():
        return None
    done = run_dir / "tuned_eval.json"
    if (args.reuse or args.report_only) and done.is_file():
        return json.loads(done.read_text())
    if args.report_only:
        return None
    t0 = time.perf_counter()
    ckpt = load_checkpoint(final)
    m = _manifest_for(ckpt, None, None, EVAL_FIX, str(final))
    exp = build(m, "evaluate", checkpoint=ckpt)
    exp.model.eval()
    data, cache = exp.data, {}
    names = ("embedding", "logits")
    saved = run_dir / "bench_outputs.npz"  # the embedded splits, kept for a rerun
    if saved.is_file():
        z = np.load(saved)
        cache = {k: ({n: z[f"{k}.{n}"] for n in names}, z[f"{k}.kept"])
                 for k in ("val", "photos", "query", "gallery")}
    record = tune_run(run_dir, overrides=EVAL_FIX, exp=exp, cache=cache, progress=lambda msg:
                      print(f"    {msg} [{time.perf_counter() - t0:.0f} s]", flush=True))
    for key, split in (("query", data.query), ("gallery", data.gallery)):
        if key not in cache:
            out_k, kept_k, _ = embed_outputs(exp, split, names, key)
            cache[key] = (out_k, kept_k)
    if not saved.is_file():
        np.savez(saved, **{f"{k}.{n}": v[0][n] for k, v in cache.items() for n in names},
                 **{f"{k}.kept": v[1] for k, v in cache.items()})
    (q, qk), (g, gk), (s, sk) = cache["query"], cache["gallery"], cache["photos"]
    seen = Split.concat(data.train.of_domain(PHOTO), data.val.of_domain(PHOTO))
    ql, gl = data.query.labels[qk], data.gallery.labels[gk]
    tasks = {"folder": (g, gl),
             "folder-generalized": ({n: np.concatenate([g[n], s[n]]) for n in names},
                                    np.concatenate([gl, seen.labels[sk]]))}
    embed_s = time.perf_counter() - t0 - record["seconds"]
    out: dict[str, Any] = {"tasks": {}, "rerank_seconds": {}, "chosen": record["chosen"],
                           "tune_seconds": record["seconds"], "embed_seconds": embed_s,
                           "validation": {f: {k: record["families"][f]["chosen"][k] for k in
                                              ("objective", "unseen_mean", "baseline_unseen")}
                                          for f in record["families"]}}
    tables = [dict(KR)] + [{"name": f, **record["chosen"][f]} for f in SEEN]
    for task, (gx, glab) in tasks.items():
        per: dict[str, Any] = {}
        t1 = time.perf_counter()
        per["real"] = {k: float(v) for k, v in evaluate_score_fn(
            lambda rows, gx=gx: torch.from_numpy(_unit(q["embedding"][rows])
                                                 @ _unit(gx["embedding"]).T),
            ql, glab, list(METRICS)).metrics.items()}
        out["rerank_seconds"][f"{task} real"] = time.perf_counter() - t1
        for t in tables:
            r = rerankers.get(t["name"])(**{k: v for k, v in t.items() if k != "name"})
            kw = {"gallery_outputs": {"logits": gx["logits"]}} if r.outputs else {}
            t1 = time.perf_counter()
            r.fit(gx["embedding"], **kw)
            fn = r.score_rows(q["embedding"], gx["embedding"],
                              **({"query_outputs": {"logits": q["logits"]}} if r.outputs
                                 else {}))
            res = evaluate_score_fn(fn, ql, glab, list(METRICS))
            key = f"real+{r.tag}"
            out["rerank_seconds"][f"{task} {key}"] = time.perf_counter() - t1
            per[key] = {k: float(v) for k, v in res.metrics.items()}
        out["tasks"][task] = per
        print(f"  {task}: " + ", ".join(f"{k.split('+')[-1]} {v['map@all']:.4f}"
                                        for k, v in per.items()), flush=True)
    out["wall_s"] = time.perf_counter() - t0
    done.write_text(json.dumps(out, indent=2, default=float))
    return out


CEILING_GRID = {"temperature": (0.5, 1.0, 2.0, 4.0),
                "gamma": (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0), "k1": (10, 20)}


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney U)."""
    neg = np.sort(neg)
    lo, hi = np.searchsorted(neg, pos, "left"), np.searchsorted(neg, pos, "right")
    return float((lo + 0.5 * (hi - lo)).sum() / (len(pos) * len(neg)))


def ceiling(row: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    """Diagnostic for issue 29's goal, on the **test** arrays of a run that ``--tune-eval``
    already scored (its ``bench_outputs.npz``): how far per-photo seen-class suppression
    could go with this model's classifier if its parameters were chosen on the test set
    itself (an upper bound: nothing here is used for any choice). Reports the AUROC of
    the max-softmax seen-class detector (seen-class photos against unseen-class photos of
    the generalized gallery), the best generalized mAP@all of ``seen_suppress`` and
    ``seen_suppress_kr`` over :data:`CEILING_GRID`, and the oracle that removes every
    seen-class photo (the unseen-only figure)."""
    from zsbir.build import build
    from zsbir.data.base import PHOTO, Split
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.evaluate_run import _manifest_for
    from zsbir.evaluation import evaluate_score_fn
    from zsbir.registry import rerankers

    run_dir = args.out / f"{row}_seed{seed}"
    saved, final = run_dir / "bench_outputs.npz", run_dir / "checkpoints" / "final.pt"
    if not saved.is_file() or not final.is_file():
        return None
    ckpt = load_checkpoint(final)
    data = build(_manifest_for(ckpt, None, None, EVAL_FIX, str(final)), "evaluate",
                 checkpoint=ckpt).data
    z = np.load(saved)
    q, g, s = ({n: z[f"{k}.{n}"] for n in ("embedding", "logits")}
               for k in ("query", "gallery", "photos"))
    seen = Split.concat(data.train.of_domain(PHOTO), data.val.of_domain(PHOTO))
    ql = data.query.labels[z["query.kept"]]
    gl = np.concatenate([data.gallery.labels[z["gallery.kept"]], seen.labels[z["photos.kept"]]])
    gx = {n: np.concatenate([g[n], s[n]]) for n in ("embedding", "logits")}
    is_seen = np.r_[np.zeros(len(g["embedding"]), bool), np.ones(len(s["embedding"]), bool)]

    def score(name: str, **kw: Any) -> float:
        r = rerankers.get(name)(**kw)
        extra = {"gallery_outputs": {"logits": gx["logits"]}} if r.outputs else {}
        r.fit(gx["embedding"], **extra)
        fn = r.score_rows(q["embedding"], gx["embedding"],
                          **({"query_outputs": {"logits": q["logits"]}} if r.outputs else {}))
        return float(evaluate_score_fn(fn, ql, gl, ["map@all"]).metrics["map@all"])

    out: dict[str, Any] = {"auroc": {}}
    for t in CEILING_GRID["temperature"]:
        conf = torch.softmax(torch.from_numpy(gx["logits"]).float() / t, 1).max(1).values
        out["auroc"][str(t)] = _auroc(conf.numpy()[is_seen], conf.numpy()[~is_seen])
    out["plain"] = float(evaluate_score_fn(
        lambda rows: torch.from_numpy(_unit(q["embedding"][rows]) @ _unit(gx["embedding"]).T),
        ql, gl, ["map@all"]).metrics["map@all"])
    best = {"seen_suppress": (0.0, None), "seen_suppress_kr": (0.0, None)}
    for t in CEILING_GRID["temperature"]:
        for gamma in CEILING_GRID["gamma"]:
            v = score("seen_suppress", gamma=gamma, temperature=t)
            if v > best["seen_suppress"][0]:
                best["seen_suppress"] = (v, {"gamma": gamma, "temperature": t})
            for k1 in CEILING_GRID["k1"]:
                v = score("seen_suppress_kr", gamma=gamma, temperature=t, k1=k1)
                if v > best["seen_suppress_kr"][0]:
                    best["seen_suppress_kr"] = (v, {"gamma": gamma, "temperature": t,
                                                    "k1": k1})
    out["best"] = {k: {"map@all": v[0], "params": v[1]} for k, v in best.items()}
    out["oracle_no_seen"] = {
        "plain": float(evaluate_score_fn(
            lambda rows: torch.from_numpy(_unit(q["embedding"][rows])
                                          @ _unit(g["embedding"]).T),
            ql, data.gallery.labels[z["gallery.kept"]], ["map@all"]).metrics["map@all"])}
    (run_dir / "ceiling.json").write_text(json.dumps(out, indent=2))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _family(key: str) -> str | None:
    tag = key.split("+", 1)[1] if "+" in key else ""
    for f in sorted(SEEN, key=len, reverse=True):
        if tag.startswith(f):
            return f
    return "k_reciprocal" if tag.startswith("k_reciprocal") else None


def tuned_table(results: dict[str, dict[int, dict[str, Any]]], metric: str) -> str:
    """Per method and task: the ranking's ``metric`` (mean ± std over the row's seeds) and
    its change against the plain ranking and against k-reciprocal alone, per row."""
    rows = [r for r in results if results[r]]
    head = " | ".join(f"({r}) value | Δ plain | Δ k-recip." for r in rows)
    lines = [f"| method | task | {head} | runs > plain | runs > k-recip. | s |",
             "|---|---|" + "---|---|---|" * len(rows) + "---|---|---|"]
    first = next(iter(results[rows[0]].values()))
    for task in first["tasks"]:
        for fam in ("plain", "k_reciprocal", *SEEN):
            cells, better_p, better_k, total, secs = [], 0, 0, 0, []
            for r in rows:
                vals, dp, dk = [], [], []
                for x in results[r].values():
                    per = x["tasks"][task]
                    key = "real" if fam == "plain" else next(
                        (k for k in per if _family(k) == fam), None)
                    if key is None:
                        continue
                    kr = next(k for k in per if _family(k) == "k_reciprocal")
                    v = per[key][metric]
                    vals.append(v)
                    dp.append(v - per["real"][metric])
                    dk.append(v - per[kr][metric])
                    secs += [x["rerank_seconds"][f"{task} {key}"]] \
                        if f"{task} {key}" in x["rerank_seconds"] else []
                if not vals:
                    cells.append("- | - | -")
                    continue
                better_p += sum(d > 0 for d in dp)
                better_k += sum(d > 0 for d in dk)
                total += len(vals)
                cells.append(f"{_ms(vals)} | " + ("-" if fam == "plain" else _signed(dp))
                             + " | " + ("-" if fam in ("plain", "k_reciprocal")
                                        else _signed(dk)))
            sec = f"{statistics.mean(secs):.2f}" if secs else "-"
            lines.append(f"| {fam} | {task} | {' | '.join(cells)} | "
                         f"{'-' if fam == 'plain' else f'{better_p}/{total}'} | "
                         f"{'-' if fam in ('plain', 'k_reciprocal') else f'{better_k}/{total}'}"
                         f" | {sec} |")
    return "\n".join(lines)


def sksh_timing(args: argparse.Namespace) -> None:
    """Seconds of each ranking at SK-SH size from a measured subset of the queries: fit on
    the whole gallery (17,101 x 512, logits 17,101 x 100), score ``--sksh-queries`` queries
    in chunks keeping each top 100 (``rerank_topk``), extrapolated to 15,229 queries."""
    from zsbir.registry import rerankers
    from zsbir.rerankers import rerank_topk

    rng = np.random.default_rng(0)
    n_q, n_g, d, c = args.sksh_queries, 17_101, 512, 100
    q = rng.normal(size=(n_q, d)).astype(np.float32)
    g = rng.normal(size=(n_g, d)).astype(np.float32)
    zq = 3 * rng.normal(size=(n_q, c)).astype(np.float32)
    zg = 3 * rng.normal(size=(n_g, c)).astype(np.float32)
    specs = [("cosine (plain)", None, {}),
             ("seen_suppress", "seen_suppress", {"gamma": 0.3}),
             ("seen_gate (beta 0.2)", "seen_gate", {"gamma": 0.3, "beta": 0.2}),
             ("k_reciprocal (k1 20)", "k_reciprocal", {"k1": 20}),
             ("seen_suppress_kr (k1 20)", "seen_suppress_kr", {"gamma": 0.3, "k1": 20}),
             ("seen_gate_kr (k1 20, beta 0.2)", "seen_gate_kr",
              {"gamma": 0.3, "beta": 0.2, "k1": 20})]
    print(f"# SK-SH-size timing: {n_q} of 15,229 queries measured x {n_g} photos, "
          f"{c} classes; load {os.getloadavg()[0]:.1f}, {torch.get_num_threads()} thread(s)")
    for label, name, params in specs:
        t0 = time.perf_counter()
        if name is None:
            qt, gt = torch.nn.functional.normalize(torch.from_numpy(q), dim=1), \
                torch.nn.functional.normalize(torch.from_numpy(g), dim=1)
            fit_s = 0.0
            for lo in range(0, n_q, 1024):
                torch.topk(qt[lo:lo + 1024] @ gt.T, 100, dim=1)
            score_s = time.perf_counter() - t0
        else:
            r = rerankers.get(name)(**params)
            kw = {"gallery_outputs": {"logits": zg}} if r.outputs else {}
            r.fit(g, **kw)
            fit_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            rerank_topk(r, q, g, 100, **({"query_outputs": {"logits": zq}, **kw}
                                         if r.outputs else {}))
            score_s = time.perf_counter() - t1
        total = fit_s + score_s * 15_229 / n_q
        print(f"| {label} | {fit_s:.1f} | {score_s:.1f} | {total:.0f} | "
              f"{os.getloadavg()[0]:.1f} |", flush=True)


# ------------------------------------------------------------------------------ speed
def plain_loop_images_per_s(m: Any, steps: int, warmup: int, channels_last: bool) -> float:
    """A plain PyTorch loop over preloaded tensors: same model, CE, optimizer, batch, size
    and memory format."""
    from PIL import Image

    from zsbir.build import build
    from zsbir.data.loading import IMAGENET_MEAN, IMAGENET_STD

    exp = build(m)
    model, opt = exp.model, exp.optimizer
    bs, size = m.train.batch_size, m.data_cfg.image_size
    split = exp.data.train
    rng = np.random.default_rng(0)
    pick = rng.choice(len(split), size=min(len(split), bs * 4), replace=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    imgs = np.stack([np.asarray(exp.data.reader(split.sources[i]).convert("RGB")
                                .resize((size, size), Image.BILINEAR)) for i in pick])
    x_all = ((torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255 - mean) / std)
    # the memory format zsbir's step uses (train.channels_last): NCHW-contiguous, or NHWC
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_all = x_all.contiguous(memory_format=fmt)
    model.to(memory_format=fmt)
    y_all = torch.from_numpy(split.labels[pick])
    d_all = torch.from_numpy(split.domains[pick])
    model.train()
    n_batches = len(pick) // bs
    t_start, images = 0.0, 0
    for i in range(warmup + steps):
        if i == warmup:
            t_start = time.perf_counter()
        j = (i % n_batches) * bs
        x, y, d = x_all[j:j + bs], y_all[j:j + bs], d_all[j:j + bs]
        loss = torch.nn.functional.cross_entropy(model(x, d)["logits"], y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            images += bs
    return images / (time.perf_counter() - t_start)


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """Alternating blocks: zsbir's step with its data path, then the plain loop."""
    from zsbir.engine.bench import bench_train

    m = manifest_for("b", 0, args)
    zs, plain = [], []
    cl = False
    for _ in range(args.speed_blocks):
        r = bench_train(m, steps=args.speed_steps, warmup=args.speed_warmup)
        zs.append(r["images_per_s"])
        cl = bool(r["channels_last"])
        print(f"  zsbir step + data path: {zs[-1]:.1f} images/s (data wait "
              f"{r['data_wait_fraction']:.0%}, {r['workers']} workers, channels_last "
              f"{cl})", flush=True)
        plain.append(plain_loop_images_per_s(m, args.speed_steps, args.speed_warmup, cl))
        print(f"  plain loop, preloaded:  {plain[-1]:.1f} images/s", flush=True)
    return {"zsbir_images_per_s": zs, "plain_images_per_s": plain, "channels_last": cl,
            "steps": args.speed_steps, "warmup": args.speed_warmup,
            "batch_size": m.train.batch_size, "image_size": m.data_cfg.image_size}


# ------------------------------------------------------------------------------ table
def _ms(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def _signed(vals: list[float]) -> str:
    """Like :func:`_ms`, with an explicit sign on the mean."""
    text = _ms(vals)
    return text if text.startswith("-") else "+" + text


def table(results: dict[str, dict[int, dict[str, Any]]], out: Path) -> str:
    """The paper-style table, built by ``zsbir compare``'s code from the run directories:
    one row per method, mean ± std over its seeds; unseen-class task, real-valued ranking;
    chance, wall time and training images/s beside the metrics."""
    from zsbir.report.compare import build_table, load_run, render

    groups = {LABELS[row]: [load_run(out / f"{row}_seed{seed}") for seed in per_seed]
              for row, per_seed in results.items() if per_seed}
    task = next(iter(groups.values()))[0].metrics["protocol"]["name"]
    return render(build_table(groups, METRICS, ["real"], [task],
                              ["chance", "seconds", "images_per_s"]), "markdown")


def rerank_table(results: dict[str, dict[int, dict[str, Any]]]) -> str:
    """Per row and task: every ranking's mAP@all and P@25 (mean ± std over seeds), the
    change against the plain ranking (mean ± std of the per-seed differences) and the
    reranker's wall time (fit + score, mean over seeds)."""
    lines = ["| row | task | ranking | seeds | mAP@all | Δ mAP | P@25 | Δ P@25 | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row, per_seed in results.items():
        runs = [r for r in per_seed.values() if r.get("tasks")]
        if not runs:
            continue
        for task in runs[0]["tasks"]:
            keys = list(runs[0]["tasks"][task])
            for key in keys:
                have = [r for r in runs if key in r["tasks"].get(task, {})]
                if not have:
                    continue
                plain = key.split("+")[0]
                vals = {m: [r["tasks"][task][key][m] for r in have] for m in METRICS}
                diff = {m: [r["tasks"][task][key][m] - r["tasks"][task][plain][m]
                            for r in have] for m in METRICS}
                secs = [r["rerank_seconds"].get(f"{task} {key}") for r in have]
                secs = [x for x in secs if x is not None]
                d = {m: "-" if key == plain else _signed(diff[m]) for m in METRICS}
                sec = f"{statistics.mean(secs):.2f}" if secs else "-"
                lines.append(
                    f"| {row} | {task} | {key} | {len(have)} | {_ms(vals['map@all'])} | "
                    f"{d['map@all']} | {_ms(vals['p@25'])} | {d['p@25']} | {sec} |")
    return "\n".join(lines)


def compact_table(results: dict[str, dict[int, dict[str, Any]]], metric: str = "map@all"
                  ) -> str:
    """One line per reranker and task: its change of ``metric`` against the plain ranking
    in every row (mean ± std over that row's seeds), the mean change over the rows, how
    many of the (row, seed) runs it improved, and its mean wall time."""
    rows = [r for r, per in results.items() if any(x.get("tasks") for x in per.values())]
    if not rows:
        return ""
    first = next(x for x in results[rows[0]].values() if x.get("tasks"))
    head = " | ".join(f"Δ ({r})" for r in rows)
    lines = [f"| ranking | task | {head} | mean Δ | runs improved | s |",
             "|---|---|" + "---|" * len(rows) + "---|---|---|"]
    for task in first["tasks"]:
        for key in first["tasks"][task]:
            if "+" not in key:
                continue
            plain = key.split("+")[0]
            cells, means, better, total, secs = [], [], 0, 0, []
            for r in rows:
                diffs = [x["tasks"][task][key][metric] - x["tasks"][task][plain][metric]
                         for x in results[r].values()
                         if key in x.get("tasks", {}).get(task, {})]
                secs += [x["rerank_seconds"][f"{task} {key}"] for x in results[r].values()
                         if f"{task} {key}" in x.get("rerank_seconds", {})]
                cells.append(_signed(diffs) if diffs else "-")
                if diffs:
                    means.append(statistics.mean(diffs))
                better += sum(d > 0 for d in diffs)
                total += len(diffs)
            mean = f"{statistics.mean(means):+.3f}" if means else "-"
            sec = f"{statistics.mean(secs):.2f}" if secs else "-"
            lines.append(f"| {key} | {task} | {' | '.join(cells)} | {mean} | "
                         f"{better}/{total} | {sec} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=["a", "b", "c", "d", "e"],
                   choices=["a", "b", "c", "d", "e"])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "real_sketchy_mini")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--reuse", action="store_true",
                   help="read runs that already have metrics.json instead of rerunning")
    p.add_argument("--speed-steps", type=int, default=12,
                   help="timed steps per block of the speed comparison (0: skip it)")
    p.add_argument("--speed-warmup", type=int, default=2)
    p.add_argument("--speed-blocks", type=int, default=2)
    p.add_argument("--grid-copy", type=Path, default=None,
                   help="copy the best trained run's retrievals.png here")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="manifest override for every row")
    p.add_argument("--json", type=Path, default=None, help="write all figures here")
    p.add_argument("--report-only", action="store_true",
                   help="only read the runs that have finished (metrics.json); run nothing")
    p.add_argument("--no-rerank", dest="rerank", action="store_false",
                   help="score the plain ranking only (default: also every reranker in "
                        "RERANKERS, side by side, in place of the manifest's own)")
    p.add_argument("--no-generalized", dest="generalized", action="store_false",
                   help="skip the generalized task (gallery + seen-class photos)")
    p.add_argument("--tune-eval", action="store_true",
                   help="issue 29: zsbir tune + evaluate (generalized task, the tuned "
                        "seen_* rerankers beside k-reciprocal) of every finished run")
    p.add_argument("--sksh-timing", action="store_true",
                   help="time the plain ranking, k-reciprocal and the seen_* rerankers at "
                        "SK-SH size (random inputs; a subset of the queries, extrapolated)")
    p.add_argument("--ceiling", action="store_true",
                   help="diagnostic of runs --tune-eval scored: the test-set upper bound of "
                        "seen-class suppression (parameters swept on the test set; used for "
                        "nothing)")
    p.add_argument("--sksh-queries", type=int, default=1024,
                   help="queries actually scored by --sksh-timing")
    args = p.parse_args()
    if args.sksh_timing:
        torch.set_num_threads(args.threads)
        sksh_timing(args)
        return
    if not args.data.is_dir():
        sys.exit(f"data folder {args.data} is absent (needs ../shared/data/sketchy-mini-seen)")
    torch.set_num_threads(args.threads)
    os.environ["ZSBIR_THREADS"] = str(args.threads)  # the runs' thread policy: this count
    import zsbir.models.efficientnet_lite  # noqa: F401 - registers the backbones

    machine = platform.processor() or platform.machine()
    print(f"# real_sketchy_mini: {datetime.date.today()}, {machine}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); seeds {args.seeds}", flush=True)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    if args.ceiling:
        for seed in args.seeds:
            for row in args.rows:
                res = None if row == "a" else ceiling(row, seed, args)
                if res is not None:
                    au = max(res["auroc"].values())
                    b = res["best"]
                    print(f"{row} seed {seed}: plain {res['plain']:.4f}; best on test: "
                          f"seen_suppress {b['seen_suppress']['map@all']:.4f} "
                          f"{b['seen_suppress']['params']}, seen_suppress_kr "
                          f"{b['seen_suppress_kr']['map@all']:.4f} "
                          f"{b['seen_suppress_kr']['params']}; oracle without seen photos "
                          f"{res['oracle_no_seen']['plain']:.4f}; max-softmax AUROC "
                          f"{au:.3f}", flush=True)
        return
    if args.tune_eval:
        for seed in args.seeds:
            for row in args.rows:
                if row == "a":
                    continue
                print(f"== {row} seed {seed}: tune + evaluate (load "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
                res = tune_and_evaluate(row, seed, args)
                if res is None:
                    print("  not trained: left out", flush=True)
                    continue
                results.setdefault(row, {})[seed] = res
                print(f"  chosen: {json.dumps(res['chosen'])}", flush=True)
        for metric in METRICS:
            print(f"\n{metric}:\n" + tuned_table(results, metric), flush=True)
        if args.json:
            args.json.write_text(json.dumps({"results": results, "load_at_end":
                                             os.getloadavg()[0]}, indent=2, default=float))
        return
    for seed in args.seeds:
        for row in args.rows:
            print(f"== {row} seed {seed} (load {os.getloadavg()[0]:.1f})", flush=True)
            if row == "a":
                for variant, res in run_untrained(seed, args).items():
                    results.setdefault(variant, {})[seed] = res
                    print(f"  {variant}: mAP@all {res['map@all']:.4f} P@25 {res['p@25']:.4f} "
                          f"({res['wall_s']:.0f} s)", flush=True)
            else:
                res = run_trained(row, seed, args)
                if res is None:  # --report-only: this run has not finished
                    print("  not finished: left out", flush=True)
                    continue
                results.setdefault(row, {})[seed] = res
                print(f"  {row}: mAP@all {res['map@all']:.4f} P@25 {res['p@25']:.4f} "
                      f"chance {res['chance']:.3f} ({res['wall_s']:.0f} s, "
                      f"{res['images_per_s'] or 0:.1f} img/s)", flush=True)
    order = [r for r in ("a-pooled", "a-svd", "b", "c", "d", "e") if r in results]
    results = {r: results[r] for r in order}
    print("\n" + table(results, args.out), flush=True)
    if any(r.get("tasks") for per in results.values() for r in per.values()):
        print("\n" + rerank_table(results), flush=True)
        for metric in METRICS:
            print(f"\nChange of {metric} against the plain ranking:\n"
                  + compact_table(results, metric), flush=True)
    figures: dict[str, Any] = {"results": results, "load_at_end": os.getloadavg()[0]}
    if args.speed_steps > 0:
        print(f"\n== speed (batch 40, 128 px, {args.speed_steps} steps a block; load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
        figures["speed"] = sp = speed(args)
        print(f"zsbir step with data path: {statistics.mean(sp['zsbir_images_per_s']):.1f} "
              f"images/s; plain loop over preloaded tensors: "
              f"{statistics.mean(sp['plain_images_per_s']):.1f} images/s", flush=True)
    trained = [(statistics.mean(r["map@all"] for r in results[row].values()), row)
               for row in results if row in MANIFESTS]
    if trained:
        best_row = max(trained)[1]
        grid = next(iter(results[best_row].values()))["grid"]
        print(f"best trained row: {best_row}; retrieval grid: {grid}")
        if args.grid_copy and grid:
            shutil.copyfile(grid, args.grid_copy)
            print(f"copied to {args.grid_copy}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=float))


if __name__ == "__main__":
    main()
