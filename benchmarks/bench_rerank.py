"""Benchmark: time and memory of every reranker at SK-SH size (issue 17).

Sketchy Extended split SK-SH (SAKE / SBTKNet): 15,229 unseen-class sketch queries against
17,101 photos. Embeddings here are random unit vectors of dimension 512 (timing only; the
neighbourhood structure of real embeddings changes the k-reciprocal set sizes, see the
printed mean sizes). Each reranker runs in its own subprocess so that its peak resident
memory (``ru_maxrss``) is its own: load the vectors, ``fit`` on the gallery (and the
queries where it is transductive), then score every query in chunks and keep the top 100
per query (:func:`zsbir.rerankers.rerank_topk`), the work an evaluation or a search does.
``plain`` is the cosine baseline (the same chunked matmul and top-100, no reranker).

Usage (from the repository root)::

    python benchmarks/bench_rerank.py                       # every reranker, SK-SH size
    python benchmarks/bench_rerank.py --only k_reciprocal --queries 2000

``--tta-embed RUN_DIR`` instead times what test-time augmentation adds: embedding a
trained run's query and gallery splits with the plain model, then with the horizontal
flip view as the evaluator embeds it (``zsbir.engine.run._ViewStack``), alternately.

Recorded figures: benchmarks/README.md ("Rerankers").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

import numpy as np
import torch

CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "aqe": {"name": "aqe", "k": 5},
    "alpha_qe": {"name": "alpha_qe", "k": 5, "alpha": 3.0},
    "dba": {"name": "dba", "k": 5},
    "dba+qe": {"name": "dba", "k": 5, "qe_k": 5},
    "csls": {"name": "csls", "k": 10},
    "domain_center": {"name": "domain_center"},
    "k_reciprocal": {"name": "k_reciprocal", "k1": 20, "k2": 6, "lambda_value": 0.3},
    "k_reciprocal_approx": {"name": "k_reciprocal", "k1": 20, "k2": 6, "lambda_value": 0.3,
                            "approximate": True},
    "tta": {"name": "tta", "views": ["hflip"]},
}


def _unit(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(case: str, nq: int, ng: int, dim: int, top: int) -> dict[str, Any]:
    """Run one case in this process; returns its figures."""
    from zsbir.registry import rerankers
    from zsbir.rerankers import rerank_topk

    rng = np.random.default_rng(0)
    table = dict(CASES[case])
    views = 2 if table.get("name") == "tta" else 0
    q = _unit(rng, (nq, views, dim) if views else (nq, dim))
    g = _unit(rng, (ng, views, dim) if views else (ng, dim))
    factory = rerankers.get(table["name"]) if table else None  # imports happen here
    base_rss = _rss_mb()
    out: dict[str, Any] = {"case": case, "params": dict(table)}
    t0 = time.perf_counter()
    if factory is None:  # plain cosine top-k, chunked like the rerankers
        qt, gt = torch.from_numpy(q), torch.from_numpy(g)
        for lo in range(0, nq, 1024):
            torch.topk(qt[lo:lo + 1024] @ gt.T, top, dim=1)
        out["fit_s"], out["score_s"] = 0.0, time.perf_counter() - t0
    else:
        name = table.pop("name")
        r = factory(**table)
        r.fit(g, queries=q if r.uses_queries else None)
        out["fit_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        rerank_topk(r, q, g, top)
        out["score_s"] = time.perf_counter() - t1
        if name == "k_reciprocal":
            out["mean_robust_set"] = float(r.v_val.gt(0).sum(1).float().mean())
            out["gallery_v_nnz"] = int(r.inv_vals.numel())
    out["total_s"] = time.perf_counter() - t0
    out["inputs_mb"] = (q.nbytes + g.nbytes) / 2**20
    out["peak_rss_mb"] = _rss_mb()
    out["peak_rss_above_inputs_mb"] = _rss_mb() - base_rss
    return out


def tta_embed(run_dir: str, repeats: int) -> None:
    """Seconds to embed a trained run's queries + gallery, plain and with the flip view."""
    from pathlib import Path

    from zsbir.build import build
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.embed import embed_split
    from zsbir.engine.run import _ViewStack
    from zsbir.manifest import load, resolve

    run = Path(run_dir)
    m = resolve(load(run / "manifest.resolved.toml"))
    exp = build(m, "evaluate", checkpoint=load_checkpoint(run / "checkpoints" / "final.pt"))
    model = exp.model
    n = len(exp.data.query) + len(exp.data.gallery)
    for rep in range(repeats):
        for label, net in (("plain", model), ("plain + hflip view", _ViewStack(model, ["hflip"]))):
            exp.model = net
            t0 = time.perf_counter()
            embed_split(exp, exp.data.query)
            embed_split(exp, exp.data.gallery)
            dt = time.perf_counter() - t0
            print(f"  block {rep + 1}: {label}: {dt:.1f} s for {n} images "
                  f"({n / dt:.0f} images/s; load {os.getloadavg()[0]:.1f})", flush=True)
    exp.model = model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", type=int, default=15229)
    p.add_argument("--gallery", type=int, default=17101)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--top", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--only", nargs="+", choices=list(CASES), default=list(CASES))
    p.add_argument("--one", choices=list(CASES), help=argparse.SUPPRESS)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--tta-embed", metavar="RUN_DIR", default=None,
                   help="time the embedding passes of a trained run with and without the "
                        "flip view instead")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.tta_embed:
        print(f"# bench_rerank --tta-embed {args.tta_embed}: {datetime.date.today()}, "
              f"{os.cpu_count()} cores, {args.threads} thread(s)", flush=True)
        tta_embed(args.tta_embed, 2)
        return
    if args.one:
        print(json.dumps(one(args.one, args.queries, args.gallery, args.dim, args.top)))
        return
    print(f"# bench_rerank: {datetime.date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, "
          f"{args.threads} thread(s); {args.queries} queries x {args.gallery} gallery, "
          f"dim {args.dim}, top {args.top}", flush=True)
    rows = []
    print("| reranker | fit s | score + top-k s | total s | peak RSS MB (above inputs) |")
    print("|---|---|---|---|---|", flush=True)
    for case in args.only:
        cmd = [sys.executable, __file__, "--one", case, "--queries", str(args.queries),
               "--gallery", str(args.gallery), "--dim", str(args.dim), "--top",
               str(args.top), "--threads", str(args.threads)]
        load = os.getloadavg()[0]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"| {case} | failed: {res.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        r["load_at_start"] = load
        rows.append(r)
        print(f"| {case} | {r['fit_s']:.1f} | {r['score_s']:.1f} | {r['total_s']:.1f} | "
              f"{r['peak_rss_mb']:.0f} ({r['peak_rss_above_inputs_mb']:.0f}) |", flush=True)
    print(f"# load at end {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
