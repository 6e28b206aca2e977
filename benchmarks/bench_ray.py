"""Photos embedded per second per Ray actor (``zsbir index build --ray``), against the
one-process build, on this machine's CPUs.

1. trains (or reuses, ``--workdir``) bench_serve.py's throwaway EfficientNet-Lite0 run
   (``examples/real/lb.toml``, 2 steps: the weights do not change the timing) and writes
   ``--photos`` real Sketchy photos (JPEG, 256 px; the model sees them at 224 px);
2. builds a faiss index of them in one process (``--workers 0``: decoding in the main
   process, the model with all the process's threads), then with ``--ray`` on a local Ray
   instance of ``--cpus`` CPUs with 1 and 2 actors (one thread each when there are as many
   actors as CPUs);
3. prints: for the one-process build the rate by difference, (photos - baseline) / (wall
   of ``--photos`` - wall of ``--baseline``), i.e. with the model load and start-up
   subtracted; for each Ray setting the wall time (Ray's start included), the time from
   the dataset's start to its last batch, and the actors' own busy time (each batch's
   reading, decoding and embedding, timed inside the actor and summed): photos / busy
   actor-seconds is the rate **per actor**; and checks that every build stored the same
   ids and embeddings (1e-6).

    PYTHONPATH=. python benchmarks/bench_ray.py --photos 256       # about 10 minutes here
    PYTHONPATH=. python benchmarks/bench_ray.py --photos 32 --actors 1   # quick

Results are recorded in benchmarks/README.md ("Embedding on Ray").
"""

from __future__ import annotations

import argparse
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve  # noqa: E402
from bench_ann import uptime  # noqa: E402


def stored(index: Path) -> list[tuple[int, str, np.ndarray]]:
    con = sqlite3.connect(index / "index.sqlite")
    try:
        return [(i, p, np.frombuffer(e, np.float32)) for i, p, e in
                con.execute("SELECT id, path, embedding FROM photos ORDER BY path")]
    finally:
        con.close()


def timed_build(run: Path, photos: Path, index: Path, batch: int, ray_opts) -> tuple[int, float]:
    """(photos embedded, wall seconds) of one build, Ray's start included."""
    from zsbir.search import store

    t0 = time.perf_counter()
    s = store.build_index(run, photos, index, device="cpu", batch_size=batch, workers=0,
                          ray=ray_opts)
    return s.embedded, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=256)
    ap.add_argument("--baseline", type=int, default=32,
                    help="photos of the small one-process build whose time is subtracted")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", type=Path, help="keep the run and photos here (reused)")
    ap.add_argument("--data", type=Path, default=bench_serve.DATA,
                    help="sketchy-mini-seen (default: ../shared/data/sketchy-mini-seen)")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"needs ../shared ({args.data})")
    bench_serve.DATA = args.data
    from zsbir.search import ray_embed
    from zsbir.search.ray_embed import RayOptions

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "runs" / "bench"
    if not (run / "checkpoints" / "final.pt").is_file():
        run = bench_serve.train_run(work / "runs")
    folders = {}
    for n in (args.baseline, args.photos):
        folders[n] = work / f"photos-{n}"
        if not folders[n].is_dir():
            bench_serve.make_photos(folders[n], n)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; {uptime()}")
    indexes = {}
    walls = {}
    for n in (args.baseline, args.photos):  # one process: the rate by difference
        index = Path(tempfile.mkdtemp(prefix="bench-ray-index-", dir=work)) / "index"
        embedded, walls[n] = timed_build(run, folders[n], index, args.batch_size, None)
        assert embedded == n, (embedded, n)
    indexes["one process"] = index
    extra = args.photos - args.baseline
    rate = extra / (walls[args.photos] - walls[args.baseline])
    print(f"{'one process':>18}: wall {walls[args.baseline]:.1f} s for {args.baseline} "
          f"photos, {walls[args.photos]:.1f} s for {args.photos}; the {extra} more took "
          f"{walls[args.photos] - walls[args.baseline]:.1f} s: {rate:.2f} photos/s; "
          f"{uptime()}", flush=True)
    for a in args.actors:
        name = f"ray, {a} actor(s)"
        index = Path(tempfile.mkdtemp(prefix="bench-ray-index-", dir=work)) / "index"
        embedded, wall = timed_build(run, folders[args.photos], index, args.batch_size,
                                     RayOptions(actors=a, num_cpus=args.cpus, device="cpu"))
        assert embedded == args.photos
        indexes[name] = index
        last = dict(ray_embed.LAST_RUN)
        print(f"{name:>18}: wall {wall:.1f} s for {args.photos} photos (Ray's start "
              f"included); dataset start to last batch {last['seconds']:.1f} s "
              f"({args.photos / last['seconds']:.2f} photos/s); actors busy "
              f"{last['actor_seconds']:.1f} actor-s: "
              f"{args.photos / last['actor_seconds']:.2f} photos/s per busy actor; "
              f"{uptime()}", flush=True)
    base = stored(indexes["one process"])
    for name, index in indexes.items():
        got = stored(index)
        assert [(i, p) for i, p, _ in got] == [(i, p) for i, p, _ in base], name
        diff = max(float(np.abs(a[2] - b[2]).max()) for a, b in zip(got, base))
        print(f"{name:>18}: same ids and paths as one process; largest embedding "
              f"difference {diff:.2e}")


if __name__ == "__main__":
    main()
