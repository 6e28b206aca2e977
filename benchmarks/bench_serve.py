"""Latency of ``zsbir serve``'s ``POST /api/search`` on a 10,000-photo index (CPU).

What it does:

1. trains a throwaway EfficientNet-Lite0 run (ImageNet weights, ``examples/real/lb.toml``
   with 2 training steps: the weights do not change the timing, the architecture does) on
   ``../shared/data/sketchy-mini-seen``;
2. writes ``--photos`` JPEG photos (default 10,000): the 2,600 real Sketchy photos, then
   mirrored and cropped variants of them, and indexes them with ``zsbir index build``
   (real-valued 512-d, ``IndexFlatIP``: exact search);
3. starts ``zsbir serve`` in its own process on a free port of 127.0.0.1 and sends
   ``--requests`` sequential searches (after ``--warmup``), alternating JSON strokes (real
   Sketchy sketches traced into strokes, as the page sends them) and PNG uploads, each
   asking for the top 12 photos; prints p50 / p95 / max of the client-side latency (request
   sent -> JSON parsed) and the server-reported time, with the machine's load.

    PYTHONPATH=. python benchmarks/bench_serve.py                 # 10,000 photos
    PYTHONPATH=. python benchmarks/bench_serve.py --photos 2000 --requests 50   # quick

Results are recorded in benchmarks/README.md ("Search server").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "sketchy-mini-seen"
sys.path.insert(0, str(ROOT / "tests"))


def make_photos(out: Path, n: int) -> None:
    src = sorted((DATA / "photo").rglob("*.jpg"))
    variants = [lambda im: im, ImageOps.mirror,
                lambda im: im.crop((8, 8, im.width - 8, im.height - 8)).resize(im.size),
                lambda im: ImageOps.mirror(im.crop((0, 12, im.width - 12, im.height))
                                           ).resize(im.size)]
    k = 0
    for v, fn in enumerate(variants):
        for f in src:
            if k >= n:
                return
            dest = out / f.parent.name / f"{f.stem}-v{v}.jpg"
            dest.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(f) as im:
                fn(im.convert("RGB")).save(dest, quality=90)
            k += 1
    if k < n:
        raise SystemExit(f"only {k} photo variants available (asked for {n})")


def train_run(out: Path) -> Path:
    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides, load, resolve

    raw = apply_overrides(load(ROOT / "examples" / "real" / "lb.toml"), [
        f"protocol.root={json.dumps(str(DATA))}", "train.epochs=1",
        "train.max_steps_per_epoch=2", "evaluation.grid_queries=2",
        f"run.output_dir={json.dumps(str(out))}", "run.name=bench"])
    run_experiment(resolve(raw))
    return out / "bench"


def queries(count: int) -> list[tuple[str, bytes]]:
    """Alternating (json, body) strokes and (png, bytes) uploads of real sketches."""
    from test_browser import trace_strokes

    sketches = sorted((DATA / "sketch").rglob("*.png"))
    rng = np.random.default_rng(0)
    out = []
    for i, j in enumerate(rng.choice(len(sketches), count, replace=False)):
        f = sketches[j]
        if i % 2 == 0:
            strokes = trace_strokes(f)
            out.append(("application/json",
                        json.dumps({"drawing": strokes, "top": 12, "pen_width": 1.5}).encode()))
        else:
            out.append(("image/png", f.read_bytes()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--workdir", type=Path, help="keep the run and index here (reused)")
    args = ap.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"needs ../shared ({DATA})")
    import httpx

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "runs" / "bench"
    if not (run / "checkpoints" / "final.pt").is_file():
        run = train_run(work / "runs")
    photos, index = work / f"photos-{args.photos}", work / f"index-{args.photos}"
    if not photos.is_dir():
        make_photos(photos, args.photos)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "zsbir.cli", "index", "build", str(run), str(photos),
                    str(index), "--device", "cpu"], check=True)
    build_s = time.perf_counter() - t0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "zsbir.cli", "serve", str(index),
                               "--port", str(port), "--device", "cpu"])
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(600):
                try:
                    info = client.get(url + "/api/info").json()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            else:
                raise SystemExit("the server did not start")
            qs = queries(args.warmup + args.requests)
            load_before = os.getloadavg()
            client_ms, server_ms = [], []
            for i, (ctype, body) in enumerate(qs):
                t = time.perf_counter()
                r = client.post(url + "/api/search?top=12", content=body,
                                headers={"content-type": ctype})
                data = r.json()
                elapsed = 1000 * (time.perf_counter() - t)
                if r.status_code != 200 or len(data["results"]) != 12:
                    raise SystemExit(f"bad answer {r.status_code}: {data}")
                if i >= args.warmup:
                    client_ms.append(elapsed)
                    server_ms.append(data["ms"])
            load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(10)

    import torch

    def pct(a: list[float], q: float) -> float:
        return float(np.percentile(a, q))

    result = {
        "photos": info["size"], "model": info["model"], "hasher": info["hasher"],
        "requests": len(client_ms), "client_ms": {"p50": pct(client_ms, 50),
                                                  "p95": pct(client_ms, 95),
                                                  "max": max(client_ms)},
        "server_ms": {"p50": pct(server_ms, 50), "p95": pct(server_ms, 95)},
        "index_build_s": build_s, "load_before": load_before, "load_after": load_after,
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    print(json.dumps(result, indent=2))
    buf = io.StringIO()
    print(f"{info['size']} photos, {len(client_ms)} requests: client p50 "
          f"{result['client_ms']['p50']:.0f} ms, p95 {result['client_ms']['p95']:.0f} ms "
          f"(server {result['server_ms']['p50']:.0f} / {result['server_ms']['p95']:.0f} ms); "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}", file=buf)
    print(buf.getvalue().strip())


if __name__ == "__main__":
    main()
