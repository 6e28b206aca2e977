"""Benchmark: the fast exact evaluator vs the naive per-query reference, at SK-SH size.

Synthetic features with a class signal (default: 25 classes, 15,229 sketch queries x
17,101 photos, 512-d, as SK-SH; mAP lands around 0.5), then:

1. the fast evaluator (``evaluate_retrieval``) on all queries, CPU (and CUDA if present),
   with the peak RSS of the process at that point;
2. the naive reference (``zsbir.evaluation.reference``): a numpy float32 score matrix,
   then one query at a time the literal formula (stable argsort; for map@all SAKE's
   ``eval_AP_inner``/``VOCap`` with its envelope loop; for p@K ``eval_precision``), on a
   random subset of queries, extrapolated to all queries;
3. agreement on that subset: max |fast - reference| per metric, on identical scores
   (must be ~1e-16) and end to end (the reference's numpy scores can differ from the
   evaluator's in the last float32 bit, which reorders near-ties);
4. the same metrics on 64-bit packed codes (sign of a random projection), Hamming distance.

Quick run: ``python benchmarks/bench_evaluator.py --queries 2000 --gallery 3000``.
Recorded figures: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import time

import numpy as np
import torch

from zsbir.engine.threads import use_threads
from zsbir.evaluation import evaluate_retrieval, evaluate_scores, pairwise_scores
from zsbir.evaluation.reference import reference_evaluate, reference_metric, reference_scores


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(q: int, g: int, d: int, classes: int, noise: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unit class centres, opposite domain offsets for sketches/photos, isotropic noise."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shift = 0.5 * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    ql = rng.integers(0, classes, q)
    gl = rng.integers(0, classes, g)
    scale = np.float32(noise / np.sqrt(d))
    qf = centres[ql] + shift + scale * rng.standard_normal((q, d), dtype=np.float32)
    gf = centres[gl] - shift + scale * rng.standard_normal((g, d), dtype=np.float32)
    return qf, ql, gf, gl


def naive(scores_fn, ql: np.ndarray, gl: np.ndarray,
          metrics: list[str]) -> tuple[dict[str, np.ndarray], float, float]:
    """Reference pipeline: a numpy score matrix, then one query at a time."""
    t0 = time.perf_counter()
    scores = scores_fn()
    t1 = time.perf_counter()
    out = {m: np.zeros(len(ql)) for m in metrics}
    for i in range(len(ql)):
        rel = gl == ql[i]
        for m in metrics:
            out[m][i] = reference_metric(m, scores[i], rel)
    return out, t1 - t0, time.perf_counter() - t1


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def fmt(values: dict[str, float]) -> str:
    return "  ".join(f"{k}={v:.4f}" for k, v in values.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=15229)
    ap.add_argument("--gallery", type=int, default=17101)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=25)
    ap.add_argument("--noise", type=float, default=3.2,
                    help="noise norm relative to the class signal (3.2: mAP about 0.5)")
    ap.add_argument("--metrics", nargs="+", default=["map@all", "p@100"])
    ap.add_argument("--ref-queries", type=int, default=500,
                    help="queries the naive reference runs on (then extrapolated)")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--hamming-bits", type=int, default=64, help="0 skips the Hamming run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    metrics = args.metrics
    nq = args.queries
    print(use_threads("evaluate").describe())  # zsbir's thread policy, as `zsbir run` scores

    print(f"date {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}")
    qf, ql, gf, gl = synthetic(nq, args.gallery, args.dim, args.classes, args.noise,
                               args.seed)
    print(f"data: {nq} queries x {args.gallery} gallery, {args.dim}-d, {args.classes} "
          f"classes; metrics {' '.join(metrics)}; peak RSS {peak_rss_mib():.0f} MiB")

    # 1. Fast evaluator first, so the peak RSS it reports is data + evaluator only.
    fast, t_fast = timed(evaluate_retrieval, qf, ql, gf, gl, metrics,
                         chunk_size=args.chunk_size)
    print(f"fast, CPU:   {t_fast:7.2f} s  {1e3 * t_fast / nq:6.3f} ms/query  "
          f"peak RSS {peak_rss_mib():.0f} MiB  {fmt(fast.metrics)}")
    t_cuda = None
    if torch.cuda.is_available():
        evaluate_retrieval(qf[:256], ql[:256], gf, gl, metrics, device="cuda")  # warm-up
        torch.cuda.synchronize()
        fast_cuda, t_cuda = timed(evaluate_retrieval, qf, ql, gf, gl, metrics,
                                  device="cuda", chunk_size=args.chunk_size)
        torch.cuda.synchronize()
        print(f"fast, CUDA ({torch.cuda.get_device_name()}): {t_cuda:7.2f} s  "
              f"{1e3 * t_cuda / nq:6.3f} ms/query  {fmt(fast_cuda.metrics)}")

    # 2. Naive reference on a subset, extrapolated.
    n_ref = min(args.ref_queries, nq)
    sub = np.sort(np.random.default_rng(args.seed + 1).choice(nq, n_ref, replace=False))
    ref, t_sc, t_loop = naive(lambda: reference_scores(qf[sub], gf, "cosine", np.float32),
                              ql[sub], gl, metrics)
    t_naive = (t_sc + t_loop) / n_ref * nq
    print(f"naive, {n_ref} queries: scores {t_sc:.2f} s + loop {t_loop:.2f} s = "
          f"{1e3 * (t_sc + t_loop) / n_ref:.2f} ms/query -> {t_naive:.1f} s for {nq} "
          f"queries (loop alone {t_loop / n_ref * nq:.1f} s)")
    print(f"speed-up, fast CPU vs naive, end to end: {t_naive / t_fast:.1f}x")
    if t_cuda:
        print(f"speed-up, fast CUDA vs naive, end to end: {t_naive / t_cuda:.1f}x")

    # 3. Agreement on the subset: the engine on identical scores (must be ~1e-16), and end
    # to end (scores from another float32 matmul differ in the last bit for ~0.3% of the
    # entries, which can reorder near-ties; only that shows up here).
    own = pairwise_scores(qf[sub], gf).numpy()
    engine = evaluate_scores(own, ql[sub], gl, metrics, chunk_size=97)
    ref_own = reference_evaluate(own, ql[sub], gl, metrics)
    end_to_end = evaluate_retrieval(qf[sub], ql[sub], gf, gl, metrics, chunk_size=97)
    for m in metrics:
        print(f"agreement {m}: max |fast - reference| = "
              f"{np.abs(engine.per_query[m] - ref_own[m]).max():.1e} on identical scores, "
              f"{np.abs(end_to_end.per_query[m] - ref[m]).max():.1e} end to end")

    # 4. Hamming distance on packed codes.
    if args.hamming_bits:
        rng = np.random.default_rng(args.seed + 2)
        proj = rng.standard_normal((args.dim, args.hamming_bits)).astype(np.float32)
        qc = np.packbits(qf @ proj > 0, axis=1)
        gc = np.packbits(gf @ proj > 0, axis=1)
        ham, t_ham = timed(evaluate_retrieval, qc, ql, gc, gl, metrics, distance="hamming",
                           chunk_size=args.chunk_size)
        print(f"fast, hamming {args.hamming_bits}-bit, CPU: {t_ham:7.2f} s  "
              f"{1e3 * t_ham / nq:6.3f} ms/query  peak RSS {peak_rss_mib():.0f} MiB  "
              f"{fmt(ham.metrics)}")
        ref_h, t_sc, t_loop = naive(lambda: reference_scores(qc[sub], gc, "hamming",
                                                             np.float32), ql[sub], gl, metrics)
        t_naive_h = (t_sc + t_loop) / n_ref * nq
        ham_sub = evaluate_retrieval(qc[sub], ql[sub], gc, gl, metrics, distance="hamming")
        diff = max(np.abs(ham_sub.per_query[m] - ref_h[m]).max() for m in metrics)
        print(f"naive hamming: {1e3 * (t_sc + t_loop) / n_ref:.2f} ms/query -> "
              f"{t_naive_h:.1f} s; speed-up {t_naive_h / t_ham:.1f}x; "
              f"agreement max |fast - reference| = {diff:.1e}")


if __name__ == "__main__":
    main()
