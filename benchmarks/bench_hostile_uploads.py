"""Peak memory of ``zsbir serve`` under concurrent hostile uploads (decompression bombs).

What it does:

1. trains a tiny synthetic run (the tests' quickstart settings: ResNet-18 from scratch at
   32 px; the model does not matter here) and indexes 24 synthetic photos;
2. starts ``zsbir serve`` in its own process on a free port of 127.0.0.1, sends one normal
   search and one thumbnail request, and reads the server's peak RSS (``VmHWM`` in
   ``/proc/PID/status``);
3. fires ``--count`` uploads at once (default 50, one thread each), cycling through five
   hostile kinds: a 125 KB GIF that decodes to 13000 x 13000 pixels (raw body), the same
   GIF as a multipart upload, a 12000 x 12000 greyscale PNG (~140 KB), a PNG header
   declaring 60000 x 60000 pixels and a GIF header declaring 65535 x 65535 (both tiny);
4. prints the HTTP statuses, the peak RSS before and after, the wall time and the load.

    PYTHONPATH=. python benchmarks/bench_hostile_uploads.py                # 50 uploads
    PYTHONPATH=/work/main python benchmarks/bench_hostile_uploads.py --count 4 --kinds 1
                      # the same against another checkout (careful: unbounded decodes)

Results are recorded in benchmarks/README.md ("Hostile uploads").
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train_tiny(out: Path) -> Path:
    import importlib.util

    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides, load, resolve

    spec = importlib.util.spec_from_file_location("_e2e", ROOT / "tests" / "test_e2e.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    raw = apply_overrides(load(ROOT / "examples" / "quickstart.toml"),
                          [*e2e.TINY, f"run.output_dir={json.dumps(str(out))}", "run.name=run"])
    run_experiment(resolve(raw))
    return out / "run"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def payloads() -> list[tuple[str, str, bytes]]:
    """(name, how: raw or form, bytes) of the hostile kinds."""
    from PIL import Image

    gif = io.BytesIO()
    im = Image.new("P", (13000, 13000), 0)
    im.putpalette([255, 255, 255, 0, 0, 0])
    im.save(gif, "GIF")
    del im
    png = io.BytesIO()
    Image.new("L", (12000, 12000), 255).save(png, "PNG", compress_level=9)
    header_png = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000,
                                                                     8, 0, 0, 0, 0))
                  + _chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + _chunk(b"IEND", b""))
    header_gif = (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
                  + b"," + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0) + b"\x08\x02\x4c\x01\x00;")
    return [("gif-13000", "raw", gif.getvalue()), ("gif-13000-form", "form", gif.getvalue()),
            ("png-12000", "raw", png.getvalue()), ("png-header-60000", "raw", header_png),
            ("gif-header-65535", "raw", header_gif)]


def status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=50, help="concurrent uploads")
    ap.add_argument("--kinds", type=int, default=5, help="use the first N hostile kinds")
    ap.add_argument("--workdir", type=Path, help="keep the run and index here (reused)")
    args = ap.parse_args()
    import httpx
    from PIL import Image

    from zsbir.data.synthetic import render
    from zsbir.search.store import build_index

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    work.mkdir(parents=True, exist_ok=True)
    run = work / "runs" / "run"
    if not (run / "checkpoints" / "final.pt").is_file():
        run = train_tiny(work / "runs")
    photos, index = work / "photos", work / "index"
    if not (index / "index.sqlite").is_file():
        for c in range(4):
            for i in range(6):
                (photos / f"c{c}").mkdir(parents=True, exist_ok=True)
                Image.fromarray(render(c, 0, i, 7, 64)).save(photos / f"c{c}" / f"{i}.png")
        build_index(run, photos, index, device="cpu", workers=0)
    kinds = payloads()[:args.kinds]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "zsbir.cli", "serve", str(index),
                               "--port", str(port), "--device", "cpu"],
                              cwd=work)  # not this checkout: PYTHONPATH picks the code
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                info = httpx.get(url + "/api/info", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise SystemExit("the server did not start")
        strokes = [[[10, 60, 110, 60, 10], [60, 10, 60, 110, 60]]]
        first = httpx.post(url + "/api/search", json={"drawing": strokes}, timeout=60).json()
        httpx.get(url + first["results"][0]["thumb"], timeout=60)
        before = status(server.pid)
        answers: list[tuple[str, int, str]] = []
        lock = threading.Lock()
        go = threading.Barrier(args.count)

        def fire(i: int) -> None:
            name, how, data = kinds[i % len(kinds)]
            go.wait()
            try:
                if how == "form":
                    r = httpx.post(url + "/api/search", timeout=300,
                                   files={"sketch": ("s.gif", data, "image/gif")})
                else:
                    r = httpx.post(url + "/api/search", content=data, timeout=300,
                                   headers={"content-type": "image/" + name[:3]})
                got = (name, r.status_code, r.json().get("error", "")[:90])
            except (httpx.HTTPError, ValueError) as exc:
                got = (name, -1, f"{type(exc).__name__}: {exc}"[:90])
            with lock:
                answers.append(got)

        load_before = os.getloadavg()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=fire, args=(i,)) for i in range(args.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        load_after = os.getloadavg()
        after = status(server.pid)
        alive = httpx.post(url + "/api/search", json={"drawing": strokes}, timeout=60)
    finally:
        server.terminate()
        server.wait(20)

    import torch

    counts: dict[str, int] = {}
    for name, code, _ in answers:
        counts[f"{name} {code}"] = counts.get(f"{name} {code}", 0) + 1
    examples = {name: msg for name, _, msg in sorted(answers)}
    result = {
        "photos": info["size"], "count": args.count, "statuses": counts,
        "messages": examples, "server_after": alive.status_code,
        "rss_mib_before": before["VmRSS"] / 1024, "peak_rss_mib_before": before["VmHWM"] / 1024,
        "peak_rss_mib_after": after["VmHWM"] / 1024, "rss_mib_after": after["VmRSS"] / 1024,
        "server_threads_after": after["Threads"], "wall_s": wall,
        "load_before": load_before, "load_after": load_after, "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }
    print(json.dumps(result, indent=2))
    print(f"{args.count} concurrent hostile uploads: peak RSS {result['peak_rss_mib_before']:.0f}"
          f" -> {result['peak_rss_mib_after']:.0f} MiB in {wall:.1f} s; load "
          f"{load_before[0]:.1f} -> {load_after[0]:.1f}")


if __name__ == "__main__":
    main()
