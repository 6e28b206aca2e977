"""Photos embedded per second per Ray actor (``zsbir index build --ray``), against the
one-process build, on this machine's CPUs.

1. trains (or reuses, ``--workdir``) bench_serve.py's throwaway EfficientNet-Lite0 run
   (``examples/real/lb.toml``, 2 steps: the weights do not change the timing) and writes
   ``--photos`` real Sketchy photos (JPEG, 256 px; the model sees them at 224 px);
2. builds a faiss index of them in one process (``--workers 0``: decoding in the main
   process, the model with all the process's threads), then with ``--ray`` on a local Ray
   instance of ``--cpus`` CPUs with 1 and 2 actors (one thread each when there are as many
   actors as CPUs);
3. prints, per build: the wall time including Ray's start, and the steady rate (photos
   committed after the first batch / time from the first to the last commit: Ray start-up
   and each actor's model load excluded), in photos/s and photos/s per actor; and checks
   that every build stored the same ids and embeddings (1e-6).

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

from bench_ann import uptime  # noqa: E402
from bench_serve import DATA, make_photos, train_run  # noqa: E402


def stored(index: Path) -> list[tuple[int, str, np.ndarray]]:
    con = sqlite3.connect(index / "index.sqlite")
    try:
        return [(i, p, np.frombuffer(e, np.float32)) for i, p, e in
                con.execute("SELECT id, path, embedding FROM photos ORDER BY path")]
    finally:
        con.close()


def timed_build(run: Path, photos: Path, index: Path, batch: int, ray_opts) -> dict:
    from zsbir.search import store

    commits: list[tuple[float, int]] = []
    original = store._commit_batch

    def commit(con, meta, found, kept, emb, skipped):
        original(con, meta, found, kept, emb, skipped)
        commits.append((time.perf_counter(), len(kept)))

    store._commit_batch = commit
    try:
        t0 = time.perf_counter()
        s = store.build_index(run, photos, index, device="cpu", batch_size=batch, workers=0,
                              ray=ray_opts)
        wall = time.perf_counter() - t0
    finally:
        store._commit_batch = original
    steady_n = sum(n for _, n in commits[1:])
    steady_s = commits[-1][0] - commits[0][0] if len(commits) > 1 else float("nan")
    return {"embedded": s.embedded, "wall_s": wall, "steady_photos": steady_n,
            "steady_s": steady_s, "steady_rate": steady_n / steady_s if steady_s else 0.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", type=Path, help="keep the run and photos here (reused)")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs ../shared ({DATA})")
    from zsbir.search.ray_embed import RayOptions

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "runs" / "bench"
    if not (run / "checkpoints" / "final.pt").is_file():
        run = train_run(work / "runs")
    photos = work / f"photos-{args.photos}"
    if not photos.is_dir():
        make_photos(photos, args.photos)
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs; {uptime()}")
    results, indexes = {}, {}
    for name, opts in [("one process", None)] + [
            (f"ray, {a} actor(s)", RayOptions(actors=a, num_cpus=args.cpus, device="cpu"))
            for a in args.actors]:
        index = Path(tempfile.mkdtemp(prefix="bench-ray-index-", dir=work)) / "index"
        r = timed_build(run, photos, index, args.batch_size, opts)
        actors = opts.actors if opts else 1
        results[name], indexes[name] = r, index
        print(f"{name:>18}: {r['embedded']} photos, wall {r['wall_s']:.1f} s; steady "
              f"{r['steady_rate']:.2f} photos/s ({r['steady_rate'] / actors:.2f} per actor, "
              f"{r['steady_photos']} photos in {r['steady_s']:.1f} s); {uptime()}")
    base = stored(indexes["one process"])
    for name, index in indexes.items():
        got = stored(index)
        assert [(i, p) for i, p, _ in got] == [(i, p) for i, p, _ in base], name
        diff = max(float(np.abs(a[2] - b[2]).max()) for a, b in zip(got, base))
        print(f"{name:>18}: same ids and paths as one process; largest embedding "
              f"difference {diff:.2e}")


if __name__ == "__main__":
    main()
