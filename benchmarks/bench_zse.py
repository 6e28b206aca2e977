"""Speed of ZSE-SBIR's relation-network retrieval: zsbir-zse against the authors' loop.

Lin et al., CVPR 2023; code: github.com/buptLinfy/ZSE-SBIR. Their ``utils/valid.py``
``valid_cls`` (``retrieval = 'rn'``) runs, for every batch of ``test_sk`` = 20 sketches, the
self-attention module on *every* photo again (batches of ``test_im`` = 20), then the
cross-attention and relation network on all 20 x 20 pairs of each pair of batches, the
first-layer projections of both images recomputed for every pair. zsbir-zse computes each
image's tokens once (and, with ``precompute``, its first-layer projections ``zse_ca``), then
scores aligned blocks of pairs, as the core's pair batching does. Usage::

    python benchmarks/bench_zse.py --authors /path/to/ZSE-SBIR            # ~10 min, CPU

Measured, in one run, on the same random weights (the authors' model, loaded into
zsbir-zse through the checkpoint format), fp32, this machine's CPU:

1. ``tiny`` config (real widths, 2 of 12 ViT blocks) and ``real`` config (ViT-B/16), each on a
   small set (``--sketches`` x ``--photos``; the sketches span 2 of their batches of 20, so
   their photo recomputation shows): the wall time of their ``valid_cls`` scoring loop
   (their ``calculate`` excluded: timed apart) against zsbir-zse's exhaustive path (embed
   every image once, then every pair in blocks of ``--block`` pairs), with and without
   ``precompute``; the scores compared (max |difference|);
2. the unit costs (seconds per image for the self-attention module, per pair for their
   ``model(sk, im, 'test')`` and zsbir-zse's pair scoring), from which the full SK-SH
   evaluation (15,229 sketches x 17,101 photos) is *extrapolated* for both;
3. top-K re-scoring: the time to score K = 50, 100, 200 pairs of one query (one sketch
   against its K photos, their tokens already stored), extrapolated to SK-SH's 15,229 queries.

Every figure is the process's CPU time (all threads; ``time.process_time``): on a shared
machine, wall time mostly measures the other processes (it is printed beside the
end-to-end figures). The cross-attention and relation network have the real widths in
both configs, so their per-pair costs (and the top-K figures) are measured once, in the
first config.

Prints a Markdown table (benchmarks/README.md, section "ZSE-SBIR") with the machine, load
and thread count.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zse_parity as zp  # noqa: E402

SKSH_QUERIES, SKSH_GALLERY = 15229, 17101


#: the clock of every figure: the process's CPU time (all its threads), which a shared
#: machine's load does not inflate the way it inflates wall time (wall time is printed too)
clock = time.process_time


def timed(fn, repeat: int = 1) -> float:
    best = math.inf
    for _ in range(repeat):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return best


def zsbir_exhaustive(model, sk, im, precompute: bool, block: int, batch: int = 20
                     ) -> tuple[np.ndarray, float, float]:
    """Every image once, then aligned blocks of ``block`` (query, photo) pairs gathered by
    index (row-major, as the core's pair batching): (scores, embed s, pair s)."""
    t0 = clock()
    q = zp.embed(model, sk, 1, batch)
    g = zp.embed(model, im, 0, batch)
    t1 = clock()
    nq, ng = len(sk), len(im)
    qi = torch.arange(nq).repeat_interleave(ng)
    gi = torch.arange(ng).repeat(nq)
    out = torch.empty(nq * ng)
    with torch.no_grad():
        for lo in range(0, nq * ng, block):
            a, b = qi[lo:lo + block], gi[lo:lo + block]
            if precompute:
                s = model.score_pairs(q["tokens"][a], g["tokens"][b], q["zse_ca"][a],
                                      g["zse_ca"][b])
            else:
                s = model.score_pairs(q["tokens"][a], g["tokens"][b])
            out[lo:lo + block] = s
    return out.view(nq, ng).numpy(), t1 - t0, clock() - t1


def sa_costs(their, mine, repeat: int) -> dict[str, float]:
    """CPU seconds per image of the self-attention module: theirs (``only_sa``) and
    zsbir-zse's forward (which also gives ``zse_ca`` in eval mode)."""
    x = zp.images(10, 99)
    with torch.no_grad(), zp.cpu_cuda():
        t_a = timed(lambda: their(x, None, "test", only_sa=True), repeat) / 10
        t_m = timed(lambda: mine(x, torch.zeros(10, dtype=torch.long)), repeat) / 10
    return {"sa_authors": t_a, "sa_zsbir": t_m}


def pair_costs(their, mine, repeat: int) -> dict[str, float]:
    """CPU seconds per pair of the cross-attention + RN (the same at every ViT depth):
    theirs, their test-stage ``model(sk, im, 'test')`` on 5 x 20 pairs as valid_cls calls
    it (``repeat`` copies included); zsbir-zse's on the same 100 pairs gathered by index,
    plain and from the precomputed projections."""
    x = zp.images(20, 98)
    with torch.no_grad(), zp.cpu_cuda():
        tok, _ = their(x, None, "test", only_sa=True)
        t_a = timed(lambda: their(tok[:5].unsqueeze(1).repeat(1, 20, 1, 1).flatten(0, 1),
                                  tok.unsqueeze(0).repeat(5, 1, 1, 1).flatten(0, 1),
                                  "test"), repeat) / 100
        o_s = mine(x[:5], torch.ones(5, dtype=torch.long))
        o_p = mine(x, torch.zeros(20, dtype=torch.long))
        a, b = torch.arange(5).repeat_interleave(20), torch.arange(20).repeat(5)
        t_m = timed(lambda: mine.score_pairs(o_s["tokens"][a], o_p["tokens"][b]),
                    repeat) / 100
        t_p = timed(lambda: mine.score_pairs(o_s["tokens"][a], o_p["tokens"][b],
                                             o_s["zse_ca"][a], o_p["zse_ca"][b]), repeat) / 100
    return {"pair_authors": t_a, "pair_zsbir": t_m, "pair_zsbir_pre": t_p}


def topk_costs(mine, ks: tuple[int, ...], repeat: int) -> dict[int, tuple[float, float]]:
    """Seconds to re-score one query's K pairs (tokens stored): (no precompute, precompute)."""
    out = {}
    x = zp.images(max(ks) // 10 + 1, 7)
    with torch.no_grad():
        o_s = mine(x[:1], torch.ones(1, dtype=torch.long))
        o_p = mine(x, torch.zeros(len(x), dtype=torch.long))
        for k in ks:
            gi = torch.arange(k) % len(x)
            qi = torch.zeros(k, dtype=torch.long)
            plain = timed(lambda qi=qi, gi=gi: mine.score_pairs(o_s["tokens"][qi],
                                                                o_p["tokens"][gi]), repeat)
            pre = timed(lambda qi=qi, gi=gi: mine.score_pairs(
                o_s["tokens"][qi], o_p["tokens"][gi], o_s["zse_ca"][qi], o_p["zse_ca"][gi]),
                repeat)
            out[k] = (plain, pre)
    return out


def hms(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def run_config(au, config: str, n_sk: int, n_im: int, block: int, repeat: int,
               ks: tuple[int, ...], pairs: dict[str, float] | None
               ) -> tuple[list[str], dict[str, float]]:
    their = zp.authors_model(au, config, 0)
    mine = zp.zsbir_model(their, config, None)
    sk, im = zp.images(n_sk, 1), zp.images(n_im, 2)
    rng = np.random.default_rng(0)
    sk_lab, im_lab = rng.integers(0, 3, n_sk), rng.integers(0, 3, n_im)
    w0 = time.perf_counter()
    dist, _, t_auth, t_calc = zp.authors_valid(au, their, sk, sk_lab, im, im_lab, clock)
    w1 = time.perf_counter()
    with torch.no_grad():
        s_plain, e1, p1 = zsbir_exhaustive(mine, sk, im, False, block)
        w2 = time.perf_counter()
        s_pre, e2, p2 = zsbir_exhaustive(mine, sk, im, True, block)
        w3 = time.perf_counter()
    diff = max(float(np.abs(s_plain + dist).max()), float(np.abs(s_pre + dist).max()))
    u = {**sa_costs(their, mine, repeat), **(pairs or pair_costs(their, mine, repeat))}
    rows = [
        f"| {config} | exhaustive {n_sk} x {n_im}, measured (CPU s; wall s) | valid_cls loop "
        f"{t_auth:.1f} ({w1 - w0:.0f}) | {e1 + p1:.1f} ({w2 - w1:.0f}): embed {e1:.1f} + pairs "
        f"{p1:.1f}; precompute {e2 + p2:.1f} ({w3 - w2:.0f}): embed {e2:.1f} + pairs {p2:.1f} | "
        f"{t_auth / (e1 + p1):.2f}x / {t_auth / (e2 + p2):.2f}x | max abs diff {diff:.1e} |",
        f"| {config} | unit costs, measured (CPU) | {u['sa_authors'] * 1e3:.0f} ms/image SA, "
        f"{u['pair_authors'] * 1e3:.0f} ms/pair CA+RN | {u['sa_zsbir'] * 1e3:.0f} ms/image "
        f"SA (+ zse_ca), {u['pair_zsbir'] * 1e3:.0f} ms/pair; precompute "
        f"{u['pair_zsbir_pre'] * 1e3:.0f} ms/pair | per pair "
        f"{u['pair_authors'] / u['pair_zsbir']:.2f}x / "
        f"{u['pair_authors'] / u['pair_zsbir_pre']:.2f}x | |",
    ]
    q, g = SKSH_QUERIES, SKSH_GALLERY
    authors = math.ceil(q / 20) * g * u["sa_authors"] + q * u["sa_authors"] \
        + q * g * u["pair_authors"]
    plain = (q + g) * u["sa_zsbir"] + q * g * u["pair_zsbir"]
    pre = (q + g) * u["sa_zsbir"] + q * g * u["pair_zsbir_pre"]
    rows.append(
        f"| {config} | SK-SH exhaustive {q} x {g}, **extrapolated** from the unit costs (CPU) "
        f"| {hms(authors)} | {hms(plain)}; precompute {hms(pre)} | "
        f"{authors / plain:.2f}x / {authors / pre:.2f}x | |")
    if ks:
        tk = topk_costs(mine, ks, repeat)
        rows.append(
            f"| {config} | top-K re-scoring per query, measured (CPU; for SK-SH's {q} queries: "
            "**extrapolated**) | | " + "; ".join(
                f"K={k}: {a * 1e3:.0f} ms ({hms(a * q)}), precompute {b * 1e3:.0f} ms "
                f"({hms(b * q)})" for k, (a, b) in tk.items()) + " | | |")
    return rows, {k: u[k] for k in ("pair_authors", "pair_zsbir", "pair_zsbir_pre")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors", required=True, help="a checkout of buptLinfy/ZSE-SBIR")
    ap.add_argument("--configs", default="tiny,real")
    ap.add_argument("--sketches", type=int, default=40, help="2 of their batches of 20")
    ap.add_argument("--photos", type=int, default=10)
    ap.add_argument("--block", type=int, default=100, help="pairs per block")
    ap.add_argument("--repeat", type=int, default=2, help="best of N for the unit costs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    au = zp.load_authors(a.authors)
    load = os.getloadavg()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; load {load[0]:.1f}/{load[1]:.1f}/"
          f"{load[2]:.1f}; torch {torch.__version__}, {torch.get_num_threads()} threads; fp32 CPU")
    print("| config | what | authors' code | zsbir-zse (plain; precompute) | speed-up "
          "(plain / precompute) | scores |")
    print("|---|---|---|---|---|---|")
    pairs = None  # the pair part has the real widths in both configs: measured once
    for i, config in enumerate(a.configs.split(",")):
        rows, pairs = run_config(au, config, a.sketches, a.photos, a.block, a.repeat,
                                 (50, 100, 200) if i == 0 else (), pairs)
        for row in rows:
            print(row, flush=True)
    load = os.getloadavg()
    print(f"load at the end: {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
