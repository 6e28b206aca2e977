"""The index types of the two backends on the same synthetic vectors: faiss (what the
faiss backend builds: exact ``IndexFlatIP``, ``IndexIVFFlat``) and milvus-lite (what the
milvus backend builds: FLAT, IVF_FLAT, HNSW), recall@K against exact search and latency
of one query at a time.

Data as ``bench_ann.py`` makes it (clustered: ``--clusters`` centres, each vector a centre
plus N(0, sigma^2) noise, L2-normalized; cosine = inner product). For each index: build
time, then ``--queries`` queries searched one at a time (the way ``zsbir search`` and
``zsbir serve`` ask): recall@K against faiss's exact top-K, median and 95th-percentile
latency (ms), at each ``nprobe`` (IVF) or ``ef`` (HNSW) of the grid. milvus-lite also
reports its insert rate and its database's size on disk per vector. faiss runs with
``--threads`` OpenMP threads; milvus-lite's server process uses the threads it chooses.

    PYTHONPATH=. python benchmarks/bench_milvus.py                 # 1e5 x 512, ~10 min here
    PYTHONPATH=. python benchmarks/bench_milvus.py --n 20000 --dim 64 --queries 50   # quick

Results are recorded in benchmarks/README.md ("Index backends: faiss and milvus-lite").
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ann import synthetic, uptime  # noqa: E402


def recall(got: np.ndarray, exact: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(g[:k]) & set(e[:k])) / k for g, e in zip(got, exact)]))


def one_at_a_time(search, queries: np.ndarray, k: int) -> tuple[np.ndarray, float, float]:
    search(queries[:1], k)  # warm-up
    ids, times = [], []
    for q in queries:
        t0 = time.perf_counter()
        ids.append(search(q[None], k))
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return np.concatenate(ids), float(np.median(ms)), float(np.percentile(ms, 95))


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--ef", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[], help="index names to leave out")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import faiss

    from zsbir.hashing.ann import default_nlist
    from zsbir.search.backends.milvus import create_index

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    from pymilvus import DataType, MilvusClient

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.dim)).astype(np.float32)
    g = synthetic(args.n, centres, args.sigma, rng)
    q = synthetic(args.queries, centres, args.sigma, rng)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    k, nlist = args.k, default_nlist(args.n)
    print(f"{platform.node()}: {os.cpu_count()} CPUs, faiss {faiss.__version__} "
          f"({args.threads} thread(s)); n={args.n} dim={args.dim} queries={args.queries} "
          f"k={k} nlist={nlist}; {uptime()}")
    rows: list[dict] = []

    def report(engine: str, index: str, param: str, build_s: float, got: np.ndarray,
               p50: float, p95: float, extra: str = "") -> None:
        r = recall(got, exact, k)
        rows.append({"engine": engine, "index": index, "param": param, "build_s": build_s,
                     "recall": r, "p50_ms": p50, "p95_ms": p95})
        print(f"{engine:>11} {index:>8} {param:>11}: build {build_s:7.1f} s, recall@{k} "
              f"{r:.4f}, p50 {p50:7.2f} ms, p95 {p95:7.2f} ms {extra}", flush=True)

    # ---- faiss: exact and IVF (the faiss backend's structures)
    t0 = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(g)
    build = time.perf_counter() - t0
    _, exact = flat.search(q, k)
    got, p50, p95 = one_at_a_time(lambda x, kk: flat.search(x, kk)[1], q, k)
    report("faiss", "flat", "-", build, got, p50, p95)
    if "faiss-ivf" not in args.skip:
        t0 = time.perf_counter()
        quant = faiss.IndexFlatIP(args.dim)
        ivf = faiss.IndexIVFFlat(quant, args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(g[rng.choice(args.n, min(args.n, 64 * nlist), replace=False)])
        ivf.add(g)
        build = time.perf_counter() - t0
        for nprobe in args.nprobe:
            ivf.nprobe = nprobe
            got, p50, p95 = one_at_a_time(lambda x, kk: ivf.search(x, kk)[1], q, k)
            report("faiss", "ivf", f"nprobe {nprobe}", build, got, p50, p95)
        del ivf

    # ---- milvus-lite: FLAT, IVF_FLAT, HNSW (the milvus backend's index types)
    tmp = Path(tempfile.mkdtemp(prefix="bench-milvus-"))
    try:
        client = MilvusClient(str(tmp / "milvus.db"))
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=args.dim)
        client.create_collection("bench", schema=schema)
        t0 = time.perf_counter()
        for i in range(0, args.n, 5000):
            client.insert("bench", [{"id": j, "vector": g[j]}
                                    for j in range(i, min(args.n, i + 5000))])
        client.flush("bench")
        insert_s = time.perf_counter() - t0
        size = du(tmp)
        print(f"milvus-lite: inserted {args.n} vectors in {insert_s:.1f} s "
              f"({args.n / insert_s:,.0f} vectors/s); database {size / 2**20:.0f} MiB "
              f"({size / args.n:.0f} bytes/vector); {uptime()}", flush=True)

        def search(params: dict):
            def run(x: np.ndarray, kk: int) -> np.ndarray:
                res = client.search("bench", data=[x[0]], limit=kk,
                                    search_params={"params": params})
                return np.array([[h["id"] for h in res[0]]])
            return run

        plans = [("FLAT", {}, [("-", {})]),
                 ("IVF_FLAT", {"nlist": nlist},
                  [(f"nprobe {p}", {"nprobe": p}) for p in args.nprobe]),
                 ("HNSW", {"M": 16, "efConstruction": 200},
                  [(f"ef {e}", {"ef": max(e, k)}) for e in args.ef])]
        for kind, params, grid in plans:
            if f"milvus-{kind.lower()}" in args.skip:
                continue
            client.release_collection("bench")
            for name in client.list_indexes("bench"):
                client.drop_index("bench", name)
            ip = client.prepare_index_params()
            ip.add_index(field_name="vector", index_type=kind, metric_type="IP", params=params)
            t0 = time.perf_counter()
            create_index(client, "bench", ip, kind)  # a retried long build is accepted
            client.load_collection("bench")
            build = time.perf_counter() - t0
            for label, sp in grid:
                got, p50, p95 = one_at_a_time(search(sp), q, k)
                report("milvus-lite", kind.lower(), label, build, got, p50, p95)
        client.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"done; {uptime()}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
