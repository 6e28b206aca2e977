"""Benchmark: fast exact evaluator vs the naive per-query reference, at SK-SH size.

Synthetic features with a class signal (25 classes, 15,229 sketch queries x 17,101 photos,
512-d; AP lands mid-range), then:

1. the naive reference (``zsbir.evaluation.reference``: numpy score matrix, then one query
   at a time: stable argsort, SAKE ``eval_AP_inner``/``VOCap`` with its envelope loop,
   ``eval_precision``) for map@all + p@100 on a subset of queries, extrapolated to all;
2. the fast evaluator (``evaluate_retrieval``) on all queries, CPU, and CUDA if present;
3. optionally the same for 64-bit packed codes with Hamming distance;
4. agreement: fast vs reference on the subset (max abs difference per metric).

Run ``python benchmarks/bench_evaluator.py`` (``--queries 2000 --gallery 3000`` for a quick
run). Figures go to stdout; see benchmarks/README.md for recorded ones.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import numpy as np
import torch

from zsbir.evaluation import evaluate_retrieval, pairwise_scores
from zsbir.evaluation.reference import ap_sake, precision_sake, reference_scores


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(q: int, g: int, d: int, classes: int, noise: float,
              seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Class centres + a shared domain offset + isotropic noise (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shift = 0.5 * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    ql = rng.integers(0, classes, q)
    gl = rng.integers(0, classes, g)
    scale = noise / np.sqrt(d)
    qf = centres[ql] + shift + scale * rng.standard_normal((q, d), dtype=np.float32)
    gf = centres[gl] - shift + scale * rng.standard_normal((g, d), dtype=np.float32)
    return qf.astype(np.float32), ql, gf.astype(np.float32), gl


def naive(qf: np.ndarray, ql: np.ndarray, gf: np.ndarray, gl: np.ndarray,
          top: int) -> tuple[dict[str, np.ndarray], float, float]:
    """Reference pipeline: numpy float32 score matrix, then a per-query loop."""
    t0 = time.perf_counter()
    scores = reference_scores(qf, gf, "cosine", dtype=np.float32)
    t1 = time.perf_counter()
    aps = np.zeros(len(ql))
    precs = np.zeros(len(ql))
    for i in range(len(ql)):
        rel = gl == ql[i]
        aps[i] = ap_sake(scores[i], rel)
        precs[i] = precision_sake(scores[i], rel, top)
    t2 = time.perf_counter()
    return {"map@all": aps, f"p@{top}": precs}, t1 - t0, t2 - t1


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=15229)
    ap.add_argument("--gallery", type=int, default=17101)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=25)
    ap.add_argument("--noise", type=float, default=1.3, help="noise norm relative to signal")
    ap.add_argument("--ref-queries", type=int, default=500,
                    help="queries the naive reference runs on (then extrapolated)")
    ap.add_argument("--top", type=int, default=100, help="K of p@K")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--hamming-bits", type=int, default=64, help="0 to skip the Hamming run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    metrics = ("map@all", f"p@{args.top}")
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    qf, ql, gf, gl = synthetic(args.queries, args.gallery, args.dim, args.classes,
                               args.noise, args.seed)
    nq = args.queries
    print(f"data: {nq} queries x {args.gallery} gallery, {args.dim}-d, {args.classes} classes;"
          f" peak RSS {peak_rss_mb():.0f} MiB")

    # Fast evaluator first, so the peak RSS it reports is data + evaluator only.
    fast, t_fast = timed(evaluate_retrieval, qf, ql, gf, gl, metrics,
                         chunk_size=args.chunk_size)
    rss_fast = peak_rss_mb()
    print(f"fast (CPU):  {t_fast:8.2f} s  {1e3 * t_fast / nq:7.3f} ms/query  "
          f"peak RSS {rss_fast:.0f} MiB  "
          + "  ".join(f"{k}={v:.4f}" for k, v in fast.metrics.items()))

    t_cuda = None
    if torch.cuda.is_available():
        evaluate_retrieval(qf[:256], ql[:256], gf, gl, metrics, device="cuda")  # warm-up
        torch.cuda.synchronize()
        fast_cuda, t_cuda = timed(evaluate_retrieval, qf, ql, gf, gl, metrics,
                                  device="cuda")
        torch.cuda.synchronize()
        print(f"fast (CUDA, {torch.cuda.get_device_name()}): {t_cuda:8.2f} s  "
              f"{1e3 * t_cuda / nq:7.3f} ms/query  "
              + "  ".join(f"{k}={v:.4f}" for k, v in fast_cuda.metrics.items()))

    # Naive reference on a subset, extrapolated.
    n_ref = min(args.ref_queries, nq)
    sub = np.random.default_rng(args.seed + 1).choice(nq, n_ref, replace=False)
    ref, t_sc, t_loop = naive(qf[sub], ql[sub], gf, gl, args.top)
    per_q = (t_sc + t_loop) / n_ref
    t_naive = per_q * nq
    print(f"naive (numpy, {n_ref} queries): scores {t_sc:.2f} s + per-query loop "
          f"{t_loop:.2f} s = {1e3 * per_q:.3f} ms/query; extrapolated to {nq} queries: "
          f"{t_naive:.1f} s (loop only: {t_loop / n_ref * nq:.1f} s)")
    print(f"speed-up, fast CPU vs naive (end to end, scores included): {t_naive / t_fast:.1f}x")
    if t_cuda:
        print(f"speed-up, fast CUDA vs naive: {t_naive / t_cuda:.1f}x")

    # Agreement on the subset.
    fast_sub = evaluate_retrieval(qf[sub], ql[sub], gf, gl, metrics, chunk_size=97)
    s_exact = pairwise_scores(qf[sub], gf).numpy()  # the evaluator's own float32 scores
    for m in metrics:
        d_ref = np.abs(fast_sub.per_query[m] - ref[m]).max()
        exact = np.array([ap_sake(s_exact[i], gl == ql[sub][i]) if m == "map@all" else
                          precision_sake(s_exact[i], gl == ql[sub][i], args.top)
                          for i in range(n_ref)])
        d_exact = np.abs(fast_sub.per_query[m] - exact).max()
        print(f"agreement {m}: max |fast - reference| = {d_ref:.2e} (reference on numpy "
              f"scores), {d_exact:.2e} (reference on the evaluator's scores)")

    if args.hamming_bits:
        rng = np.random.default_rng(args.seed + 2)
        proj = rng.standard_normal((args.dim, args.hamming_bits)).astype(np.float32)
        qc = np.packbits(qf @ proj > 0, axis=1)
        gc = np.packbits(gf @ proj > 0, axis=1)
        ham, t_ham = timed(evaluate_retrieval, qc, ql, gc, gl, metrics, distance="hamming",
                           chunk_size=args.chunk_size)
        print(f"fast hamming ({args.hamming_bits}-bit, CPU): {t_ham:8.2f} s  "
              f"{1e3 * t_ham / nq:7.3f} ms/query  peak RSS {peak_rss_mb():.0f} MiB  "
              + "  ".join(f"{k}={v:.4f}" for k, v in ham.metrics.items()))
        s_h = -reference_scores(qc[sub], gc, "hamming", dtype=np.float32)
        ham_sub = evaluate_retrieval(qc[sub], ql[sub], gc, gl, ("map@all",), distance="hamming")
        ref_h = np.array([ap_sake(-s_h[i], gl == ql[sub][i]) for i in range(n_ref)])
        print(f"agreement hamming map@all: max |fast - reference| = "
              f"{np.abs(ham_sub.per_query['map@all'] - ref_h).max():.2e}")


if __name__ == "__main__":
    main()
