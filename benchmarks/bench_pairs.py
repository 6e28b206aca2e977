"""Benchmark: the cost of pair scoring (issue 25, point 4) for one scorer and configuration.

Measures, on this machine, with the core's batching (:class:`zsbir.pairs.PairBatcher`):

- **top-K re-scoring per query** for K = 50, 100, 200 (``--ks``): scoring the K candidate
  pairs of one query, and reading those K photos' stored outputs from an index's SQLite
  table (:mod:`zsbir.search.outputs`, float32 and float16) as ``zsbir search
  --pair-scorer`` does. Neither depends on the gallery size (the embedding ranking that
  picks the K is the plain search, timed in ``bench_ann.py``);
- **exhaustive scoring**: ``--queries`` x ``--gallery`` pairs (a measured subset), as
  evaluation runs it (``PairBatcher.rows``: each query against every gallery item), then
  the per-pair cost **extrapolated** to SK-SH size (15,229 sketch queries x 17,101
  photos: Sketchy Extended, the SAKE / SBTKNet split), stated as extrapolated;
- the naive loop it replaces (one pair at a time through ``score_pairs``), on a few pairs,
  for the batching's speed-up.

The per-item outputs come from the scorer's model on random images (``--manifest``: the
model and ``[pair_scorer]`` of a manifest, random weights, pretrained weights not read) or
are random tokens of a given shape (``--scorer NAME --tokens T --dim D``: a scorer without
weights, such as ``maxsim``, whose cost depends only on the shapes). Computing the
outputs (one forward pass per image) is timed as well (``--manifest`` only).

Usage (from the repository root)::

    python benchmarks/bench_pairs.py --scorer maxsim --tokens 197 --dim 768
    python benchmarks/bench_pairs.py --manifest plugins/zsbir-zse/examples/tiny.toml \\
        --queries 4 --gallery 64 --json out.json

Recorded figures: benchmarks/README.md ("Pair scoring").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SKSH_QUERIES, SKSH_GALLERY = 15_229, 17_101


def _best(fn: Any, repeat: int) -> float:
    """The best of ``repeat`` wall times of ``fn()`` (seconds); one warm-up call first."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def _from_manifest(path: str, n_q: int, n_g: int, device: torch.device
                   ) -> tuple[Any, dict, dict, dict[str, Any]]:
    """The manifest's scorer around its model (random weights) and the model's outputs on
    random sketches and photos."""
    from zsbir.build import build_component, build_pair_scorer
    from zsbir.context import BuildContext
    from zsbir.injection import supply
    from zsbir.manifest import load, resolve

    m = resolve(load(Path(path)), path)
    if m.pair_scorer is None:
        sys.exit(f"{path}: no [pair_scorer] table")
    seen = [f"c{i}" for i in range(max(2, int(m.protocol.get("num_classes", 10))))]
    ctx = BuildContext(device=device, seed=0, image_size=m.data_cfg.image_size,
                       seen_classes=seen, unseen_classes=["u0"], purpose="evaluate",
                       load_pretrained=False)
    torch.manual_seed(0)
    model = build_component("models", m.model, ctx,
                            **supply("models", num_classes=len(seen))).to(device).eval()
    scorer = build_pair_scorer(m, ctx, model)
    size = m.data_cfg.image_size
    g = torch.Generator().manual_seed(0)
    names = scorer.outputs
    outs: dict[str, dict[str, list[torch.Tensor]]] = {"q": {}, "g": {}}
    t0 = time.perf_counter()
    with torch.inference_mode():
        for side, n, bit in (("q", n_q, 1), ("g", n_g, 0)):
            for lo in range(0, n, 16):
                b = min(16, n - lo)
                x = torch.randn(b, 3, size, size, generator=g).to(device)
                out = model(x, torch.full((b,), bit, dtype=torch.long, device=device))
                for name in names:
                    outs[side].setdefault(name, []).append(out[name].float().cpu())
    per_item = (time.perf_counter() - t0) / (n_q + n_g)
    q = {k: torch.cat(v).numpy() for k, v in outs["q"].items()}
    gal = {k: torch.cat(v).numpy() for k, v in outs["g"].items()}
    info = {"manifest": path, "model": m.model.get("name"), "pair_scorer": m.pair_scorer,
            "image_size": size, "forward_ms_per_image": 1000 * per_item}
    return scorer, q, gal, info


def _random_tokens(name: str, n_q: int, n_g: int, tokens: int, dim: int
                   ) -> tuple[Any, dict, dict, dict[str, Any]]:
    from zsbir.pairs import make_pair_scorer

    scorer = make_pair_scorer(name)
    rng = np.random.default_rng(0)
    shape = lambda n: (n, tokens, dim)  # noqa: E731
    q = {o: rng.standard_normal(shape(n_q)).astype(np.float32) for o in scorer.outputs}
    g = {o: rng.standard_normal(shape(n_g)).astype(np.float32) for o in scorer.outputs}
    return scorer, q, g, {"scorer": name, "tokens": tokens, "dim": dim,
                          "outputs": "random tokens"}


def _read_cost(g: dict[str, np.ndarray], ks: list[int], dtype: str, repeat: int
               ) -> dict[str, float]:
    """ms to read K photos' stored outputs from an index's outputs table (SQLite, a temp
    file, page cache warm), as ``Index.outputs`` does for one query's candidates."""
    from zsbir.search.outputs import ensure_schema, read_outputs

    n = len(next(iter(g.values())))
    with tempfile.TemporaryDirectory() as tmp:
        con = sqlite3.connect(Path(tmp) / "index.sqlite", isolation_level=None)
        con.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, path TEXT)")
        ensure_schema(con)
        con.execute("BEGIN")
        con.executemany("INSERT INTO photos(id, path) VALUES(?, ?)",
                        [(i, f"p{i}") for i in range(n)])
        for name, arr in g.items():
            data = arr.astype(dtype)
            con.executemany("INSERT INTO outputs(photo_id, name, data) VALUES(?, ?, ?)",
                            [(i, name, data[i].tobytes()) for i in range(n)])
        con.execute("COMMIT")
        meta = {"output_names": list(g), "output_dtype": dtype,
                "outputs": {k: list(v.shape[1:]) for k, v in g.items()}}
        rng = np.random.default_rng(1)
        out = {}
        for k in ks:
            ids = rng.choice(n, size=min(k, n), replace=False)
            out[str(k)] = 1000 * _best(lambda ids=ids: [read_outputs(con, meta, name, ids)
                                                        for name in g], repeat)
        con.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", help="a manifest with [pair_scorer] (its model's outputs)")
    ap.add_argument("--scorer", default="maxsim", help="without --manifest: a pair scorer "
                    "without weights, on random tokens")
    ap.add_argument("--tokens", type=int, default=197, help="tokens per item (random)")
    ap.add_argument("--dim", type=int, default=768, help="token width (random)")
    ap.add_argument("--queries", type=int, default=8, help="measured queries")
    ap.add_argument("--gallery", type=int, default=400, help="measured gallery items "
                    "(>= the largest K)")
    ap.add_argument("--ks", default="50,100,200")
    ap.add_argument("--batch-pairs", type=int, default=None,
                    help="pairs per block (default: the manifest's, else 256)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as set)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive-pairs", type=int, default=64)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from zsbir.pairs import PairBatcher

    ks = [int(k) for k in args.ks.split(",")]
    device = torch.device(args.device)
    n_g = max(args.gallery, max(ks))
    if args.manifest:
        scorer, q, g, info = _from_manifest(args.manifest, args.queries, n_g, device)
        bp = args.batch_pairs or int(info["pair_scorer"]["batch_pairs"])
    else:
        scorer, q, g, info = _random_tokens(args.scorer, args.queries, n_g, args.tokens,
                                            args.dim)
        bp = args.batch_pairs or 256
    batcher = PairBatcher(scorer, q, g, bp, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    topk = {}
    for k in ks:  # one query's K candidates, as a search re-scores them
        qi, gi = np.zeros(k, np.int64), np.arange(k)
        topk[str(k)] = 1000 * _best(lambda qi=qi, gi=gi: (batcher.score(qi, gi), sync()),
                                    args.repeat)
    rows = np.arange(args.queries)
    t_ex = _best(lambda: (batcher.rows(rows), sync()), max(1, args.repeat - 1))
    pairs = args.queries * n_g
    per_pair = t_ex / pairs
    n_naive = min(args.naive_pairs, n_g)

    prepare = getattr(scorer, "prepare", lambda o: o)

    def naive() -> None:  # one pair at a time, per-item work per pair: what batching replaces
        for j in range(n_naive):
            scorer.score_pairs(prepare({k: torch.from_numpy(v[:1]).to(device)
                                        for k, v in q.items()}),
                               prepare({k: torch.from_numpy(v[j:j + 1]).to(device)
                                        for k, v in g.items()}))
        sync()

    with torch.inference_mode():
        t_naive = _best(naive, 1) / n_naive
    reads = {dt: _read_cost(g, ks, dt, args.repeat) for dt in ("float32", "float16")}
    bytes_per_item = {k: int(np.prod(v.shape[1:])) * 4 for k, v in g.items()}
    sksh = SKSH_QUERIES * SKSH_GALLERY
    out = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()), "device": str(device),
        "torch": torch.__version__, **info, "batch_pairs": bp,
        "stored_bytes_per_photo_float32": bytes_per_item,
        "topk_score_ms_per_query": topk,
        "topk_read_ms_per_query": reads,
        "exhaustive_measured": {"queries": args.queries, "gallery": n_g, "pairs": pairs,
                                "seconds": t_ex, "us_per_pair": 1e6 * per_pair},
        "naive_us_per_pair": 1e6 * t_naive,
        "batching_speedup": t_naive / per_pair,
        "exhaustive_sksh_extrapolated": {
            "pairs": sksh, "hours": sksh * per_pair / 3600,
            "note": "extrapolated from the measured subset's per-pair cost"},
    }
    if "forward_ms_per_image" in info:
        out["exhaustive_sksh_extrapolated"]["forward_minutes"] = (
            (SKSH_QUERIES + SKSH_GALLERY) * info["forward_ms_per_image"] / 60000)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
