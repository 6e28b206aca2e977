"""Approximate vs exact gallery search on a synthetic 1e6-vector gallery (zsbir.hashing.ann).

Measures, single-threaded (faiss and BLAS limited to ``--threads``, default 1, because the
machine is shared), for ``--n`` gallery vectors of ``--dim`` dimensions:

- real-valued cosine search: exact (``IndexFlatIP``) vs IVF with float32 and float16
  storage at several ``nprobe``: recall@K against exact, queries/s, build time, bytes per
  vector in the index;
- ``--bits``-bit ITQ codes of the same vectors: exact Hamming (``IndexBinaryFlat``) vs
  binary IVF at several ``nprobe`` and multi-index hashing at several ``nflip``
  (tie-aware recall: an approximate neighbour counts when its distance is within the
  exact K-th distance).

Synthetic data, clustered like class-structured embeddings: ``--clusters`` centres drawn
from N(0, I), every vector (gallery and query) a centre plus N(0, sigma^2 I) noise
(``--sigma``), so near neighbours mostly share a centre, as photos of a class do.

    PYTHONPATH=. python benchmarks/bench_ann.py                    # 1e6 x 512, ~5-10 min
    PYTHONPATH=. python benchmarks/bench_ann.py --n 50000 --queries 200   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import time

import numpy as np


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def synthetic(n: int, centres: np.ndarray, sigma: float, rng: np.random.Generator,
              chunk: int = 100_000) -> np.ndarray:
    out = np.empty((n, centres.shape[1]), np.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        out[i:i + m] = centres[rng.integers(0, len(centres), m)]
        out[i:i + m] += sigma * rng.standard_normal((m, centres.shape[1]), dtype=np.float32)
    return out


def timed_search(index, queries: np.ndarray, k: int) -> tuple[tuple, float]:
    index.search(queries[:10], k)  # warm-up (first-call allocations), not timed
    t0 = time.perf_counter()
    res = index.search(queries, k)
    return res, len(queries) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--train-size", type=int, default=64_000)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--bits", type=int, default=64)
    ap.add_argument("--nflip", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import faiss
    import torch

    from zsbir.hashing import ann
    from zsbir.hashing.hashers import ITQHasher

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    info = {"machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} cores", "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load_before": uptime(), "faiss": faiss.__version__, "args": vars(args)}
    print(json.dumps(info, indent=1), flush=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    centres = rng.standard_normal((args.clusters, args.dim), dtype=np.float32)
    gallery = synthetic(args.n, centres, args.sigma, rng)
    queries = synthetic(args.queries, centres, args.sigma, rng)
    print(f"data: {args.n} x {args.dim} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []

    def row(kind: str, params: str, res: tuple, qps: float, exact: tuple, binary: bool,
            build_s: float, bytes_per: float) -> None:
        r = {"index": kind, "params": params, "queries_per_s": qps, "build_s": build_s,
             "bytes_per_vector": bytes_per,
             f"recall@{args.k}": ann.recall_at_k(res, exact, args.k, binary=binary)}
        rows.append(r)
        print(f"{kind:14s} {params:22s} recall@{args.k}={r[f'recall@{args.k}']:.4f} "
              f"{qps:9.1f} q/s  build {build_s:6.1f} s  {bytes_per:6.1f} B/vec", flush=True)

    # ---------------- real-valued
    t0 = time.perf_counter()
    flat = ann.build_exact(gallery, binary=False)
    build = time.perf_counter() - t0
    exact, qps = timed_search(flat, queries, args.k)
    row("flat (exact)", "-", exact, qps, exact, False, build, 4 * args.dim)
    del flat
    for storage in ("float32", "float16"):
        t0 = time.perf_counter()
        ivf = ann.build_ivf(gallery, nlist=args.nlist, storage=storage,
                            train_size=args.train_size, seed=0)
        build = time.perf_counter() - t0
        per = ivf.index.code_size + 8  # stored vector + its int64 id
        for nprobe in args.nprobe:
            ivf.set_nprobe(nprobe)
            res, qps = timed_search(ivf, queries, args.k)
            row(f"ivf {storage}", f"nlist={args.nlist} nprobe={nprobe}", res, qps, exact,
                False, build, per)
        del ivf

    # ---------------- binary (ITQ)
    t0 = time.perf_counter()
    sample = gallery[np.sort(rng.choice(args.n, min(args.n, args.train_size), replace=False))]
    itq = ITQHasher(bits=args.bits).fit(sample, seed=0)
    codes = np.concatenate([itq.encode(gallery[i:i + 100_000])
                            for i in range(0, args.n, 100_000)])
    qcodes = itq.encode(queries)
    print(f"itq{args.bits}: fit + encode in {time.perf_counter() - t0:.1f} s", flush=True)
    del gallery
    nbytes = codes.shape[1]
    t0 = time.perf_counter()
    bflat = ann.build_exact(codes, binary=True)
    build = time.perf_counter() - t0
    bexact, qps = timed_search(bflat, qcodes, args.k)
    row("binary flat", f"{args.bits} bits (exact)", bexact, qps, bexact, True, build, nbytes)
    del bflat
    t0 = time.perf_counter()
    bivf = ann.build_binary_ivf(codes, nlist=args.nlist, train_size=args.train_size, seed=0)
    build = time.perf_counter() - t0
    for nprobe in args.nprobe:
        bivf.set_nprobe(nprobe)
        res, qps = timed_search(bivf, qcodes, args.k)
        row("binary ivf", f"nlist={args.nlist} nprobe={nprobe}", res, qps, bexact, True,
            build, nbytes + 8)
    del bivf
    for nflip in args.nflip:
        t0 = time.perf_counter()
        mih = ann.build_mih(codes, nflip=nflip)
        build = time.perf_counter() - t0
        res, qps = timed_search(mih, qcodes, args.k)
        p = mih.params
        row("mih", f"{p['nhash']}x{p['substring_bits']} bits nflip={nflip}", res, qps,
            bexact, True, build, nbytes + 8)
        del mih

    info["load_after"] = uptime()
    info["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    info["rows"] = rows
    print(f"load after: {info['load_after']}; peak RSS {info['peak_rss_gib']:.2f} GiB")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(info, fh, indent=1)


if __name__ == "__main__":
    main()
