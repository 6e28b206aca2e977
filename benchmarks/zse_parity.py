"""Parity of the zsbir-zse plugin with the authors' ZSE-SBIR code.

Lin et al., "Zero-Shot Everything Sketch-Based Image Retrieval, and in Explainable Style",
CVPR 2023; code: github.com/buptLinfy/ZSE-SBIR (``model/{sa,ca,rn,model}.py``,
``utils/{loss,valid,ap}.py``). Their code is imported from a local checkout and run; nothing
of it is copied into zsbir. Usage::

    pip install einops joblib tqdm          # the authors' requirements (not zsbir's)
    python benchmarks/zse_parity.py --authors /path/to/ZSE-SBIR --config tiny   # ~1 min
    python benchmarks/zse_parity.py --authors /path/to/ZSE-SBIR --config real   # ViT-B/16

Both sides get the same random weights: the authors' ``Model(args)`` is built
(``pretrained = False``; ``--config tiny`` keeps the first 2 of its 12 ViT blocks, every
width the real one), its LayerNorm scales/shifts are randomized (a default LayerNorm would
hide a swapped one), its state dict is saved as the authors' checkpoint format
(``{'model': state_dict}``) and loaded by zsbir-zse's model ``zse(checkpoint = FILE)``,
i.e. through the same key mapping a user's released checkpoint goes through. Eval mode,
fp32, CPU, no grad. Compared, on the same random images:

1. **retrieval-token embeddings** and all self-attention tokens: their
   ``model(x, None, 'test', only_sa=True)`` against zsbir's ``forward(x, domain)``
   ``embedding`` / ``tokens``; also with token selection (keep rate 0.9 at blocks 4, 7,
   10 of the real config, their ``Encoder.keep_rate``), each side's own selection;
2. **RN scores** of aligned pairs: their ``model(sk, im, 'test')`` against zsbir's
   ``score_pairs`` from the stored tokens, with and without the per-image projections
   ``zse_ca`` (``precompute``);
3. **losses**: their train-stage ``model(cat(sk, sk_neg), cat(im, im_neg))`` (in eval mode,
   so that dropout is off) into their ``triplet_loss(.) * 2`` and ``rn_loss(., target) * 4``
   (train.py), against zsbir's step ``zse_pairs`` outputs into ``zse_triplet`` and
   ``zse_relation`` on the same images laid out as the ``zse`` sampler's tuples;
4. **exhaustive evaluation**: their ``valid_cls`` (``retrieval = 'rn'``, batches of
   ``test_sk`` / ``test_im`` = 20) on tensor datasets of the random images with random
   labels, its distance matrix captured, against zsbir-zse's scores of every pair; then
   their ``utils/ap.py`` ``calculate`` against zsbir's metrics ``map@all``, ``map@200``,
   ``p@100-zse``, ``p@200-zse`` on the *same* score matrix (their distance = - score).

Tolerances (written down; fp32 CPU, the two sides differ in operation order only):
embeddings and tokens: ``max|zsbir - authors| / max|authors| <= 1e-5``; RN scores (in
(0, 1)): ``max|difference| <= 1e-5``; losses: relative ``<= 1e-5``; metrics on the same
score matrix: ``<= 1e-12`` (equal up to summation order). Exit status 1 when a figure is
above its tolerance, 2 when a side cannot be built.

Run-time shims (no file of theirs is edited): ``torch.Tensor.cuda`` and
``torch.nn.Module.cuda`` return the object itself while their code runs (their code calls
``.cuda()`` everywhere); ``sys.argv`` is their program name alone while ``options`` is
imported; their generic top-level packages (``model``, ``utils``, ``options``) are removed
from ``sys.modules`` afterwards; ``utils.valid.calculate`` is wrapped to capture the
distance matrix (the wrapped function still runs); ``args.num_workers = 0``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

TOL_REL = 1e-5
TOL_SCORE = 1e-5
TOL_METRIC = 1e-12
THEIR_PACKAGES = ("model", "utils", "options", "data_utils")
METRICS = ("map@all", "map@200", "p@100-zse", "p@200-zse")


@contextlib.contextmanager
def cpu_cuda() -> Iterator[None]:
    """``.cuda()`` is the identity (their code targets CUDA; this runs on the CPU)."""
    t, m = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    torch.nn.Module.cuda = lambda self, *a, **k: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = t, m  # type: ignore[method-assign]


def load_authors(path: str | Path) -> SimpleNamespace:
    """Their modules, imported from the checkout ``path``."""
    root = Path(path).resolve()
    if not (root / "model" / "model.py").is_file():
        raise FileNotFoundError(f"{root} is not a ZSE-SBIR checkout (no model/model.py)")
    for name in list(sys.modules):
        if name.split(".")[0] in THEIR_PACKAGES:
            del sys.modules[name]
    argv = sys.argv
    sys.path.insert(0, str(root))
    sys.argv = [argv[0]]
    try:
        ns = SimpleNamespace(
            model=importlib.import_module("model.model"),
            options=importlib.import_module("options"),
            loss=importlib.import_module("utils.loss"),
            valid=importlib.import_module("utils.valid"),
            ap=importlib.import_module("utils.ap"))
        ns.args = ns.options.Option().parse()
    finally:
        sys.argv = argv
        sys.path.remove(str(root))
        for name in list(sys.modules):
            if name.split(".")[0] in THEIR_PACKAGES:
                del sys.modules[name]
    ns.args.pretrained = False
    ns.args.num_workers = 0
    return ns


def authors_model(au: SimpleNamespace, config: str, seed: int = 0,
                  keep_rate: tuple[float, ...] | None = None) -> torch.nn.Module:
    """Their ``Model(args)`` with seeded random weights (LayerNorms randomized too);
    ``tiny``: its first 2 ViT blocks."""
    torch.manual_seed(seed)
    with cpu_cuda():
        m = au.model.Model(au.args)
    enc = m.sa.model.transformer
    if config == "tiny":
        enc.layers = enc.layers[:2]
    if keep_rate is not None:
        enc.keep_rate = tuple(keep_rate)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith((".a", "norm.weight", "layer_norm_input.weight",
                              "layer_norm_out.weight")):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith((".b", "norm.bias", "layer_norm_input.bias",
                                "layer_norm_out.bias")):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return m.eval()


def zsbir_model(their: torch.nn.Module, config: str, keep_rate: tuple[float, ...] | None,
                dtype: torch.dtype = torch.float32) -> Any:
    """zsbir-zse's ``zse`` model loading their state dict through ``checkpoint = FILE``
    (the authors' format; ``dtype`` float16 as their released files)."""
    from zsbir_zse.model import ZseModel

    depth = len(their.sa.model.transformer.layers)
    if keep_rate is not None:  # the self-attention module alone (its own token count)
        from zsbir_zse.vit import SelfAttentionEncoder
        from zsbir_zse.weights import from_authors

        enc = SelfAttentionEncoder(depth=depth, keep_rate=list(keep_rate))
        enc.load_state_dict({k.removeprefix("encoder."): v for k, v in from_authors(
            their.state_dict()).items() if k.startswith("encoder.")}, strict=True)
        enc.eval()
        return lambda x, d: {"tokens": (t := enc(x)), "embedding": t[:, 0]}
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "best_checkpoint.pth"
        torch.save({"model": {k: v.to(dtype) if v.is_floating_point() else v
                              for k, v in their.state_dict().items()}, "epoch": 1}, f)
        m = ZseModel(depth=depth, checkpoint=str(f))
    return m.eval()


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


class Report:
    def __init__(self) -> None:
        self.failed = False

    def row(self, what: str, value: float, tol: float, note: str = "") -> None:
        ok = value <= tol
        self.failed |= not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {what:<58} {value:.2e}  (tol {tol:.0e}){note}")


def compare_tokens(au: SimpleNamespace, config: str, n: int, seed: int, rep: Report,
                   keep_rate: tuple[float, ...] | None = None, label: str = "") -> None:
    their = authors_model(au, config, seed, keep_rate)
    mine = zsbir_model(their, config, keep_rate)
    x = images(n, seed + 2)
    with torch.no_grad(), cpu_cuda():
        t_tok, _ = their(x, None, "test", only_sa=True)
        out = mine(x, torch.ones(n, dtype=torch.long))
    rep.row(f"retrieval-token embeddings{label} ({n} images)", rel(out["embedding"],
                                                                   t_tok[:, 0]), TOL_REL)
    rep.row(f"all self-attention tokens{label} {tuple(t_tok.shape)}", rel(out["tokens"], t_tok),
            TOL_REL)


def compare_pairs_and_losses(au: SimpleNamespace, config: str, b: int, seed: int,
                             rep: Report) -> None:
    from zsbir_zse.training import ROLES, ZseRelationLoss, ZseTripletLoss, pair_outputs

    their = authors_model(au, config, seed)
    mine = zsbir_model(their, config, None)
    sk, im, sk_neg, im_neg = (images(b, seed + 10 + i) for i in range(4))
    with torch.no_grad(), cpu_cuda():
        # RN scores of aligned pairs, their test path (SA tokens, then CA + RN)
        s_tok, _ = their(sk, None, "test", only_sa=True)
        p_tok, _ = their(im, None, "test", only_sa=True)
        _, t_rn = their(s_tok, p_tok, "test")
        o_s = mine(sk, torch.ones(b, dtype=torch.long))
        o_p = mine(im, torch.zeros(b, dtype=torch.long))
        m_rn = mine.score_pairs(o_s["tokens"], o_p["tokens"])
        m_rn_pre = mine.score_pairs(o_s["tokens"], o_p["tokens"], o_s["zse_ca"], o_p["zse_ca"])
        rep.row(f"RN scores, {b} pairs (range {float(t_rn.min()):.4f}..{float(t_rn.max()):.4f})",
                float((m_rn - t_rn.view(-1)).abs().max()), TOL_SCORE)
        rep.row("RN scores, per-image projections precomputed (zse_ca)",
                float((m_rn_pre - t_rn.view(-1)).abs().max()), TOL_SCORE)
        # losses: their train-stage forward, train.py's weights
        au.args.batch = b
        cls_fea, rn_scores = their(torch.cat((sk, sk_neg)), torch.cat((im, im_neg)))
        target = torch.clamp(torch.cat((torch.ones(b), torch.zeros(b))), 0.01, 0.99)
        t_tri = au.loss.triplet_loss(cls_fea, au.args) * 2
        t_rnl = au.loss.rn_loss(rn_scores, target.unsqueeze(1)) * 4
        # zsbir: the same images as `zse` sampler tuples (anchor, positive, negative,
        # negative_pair_sketch), one forward, the step's pair outputs, the two losses
        x = torch.stack([sk, im, im_neg, sk_neg], dim=1).flatten(0, 1)
        dom = torch.tensor([1, 0, 0, 1]).repeat(b)
        batch = {"image": x, "domain": dom, "tuples": torch.arange(4 * b).view(b, 4),
                 "roles": ROLES}
        out = mine(x, dom)
        out.update(pair_outputs(mine, out, batch))
        m_tri = ZseTripletLoss()(out, batch) * 2
        m_rnl = ZseRelationLoss()(out, batch) * 4
    rep.row(f"triplet loss x 2 (authors {float(t_tri):.6f})", rel(m_tri, t_tri), TOL_REL)
    rep.row(f"RN regression loss x 4 (authors {float(t_rnl):.6f})", rel(m_rnl, t_rnl), TOL_REL)


def authors_valid(au: SimpleNamespace, model: torch.nn.Module, sk: torch.Tensor,
                  sk_lab: np.ndarray, im: torch.Tensor, im_lab: np.ndarray,
                  clock=time.perf_counter) -> tuple[np.ndarray, tuple[float, ...], float, float]:
    """Their ``valid_cls`` (rn) on tensor datasets: (distance matrix, their 4 figures,
    seconds of the scoring loop, seconds of their ``calculate``; by ``clock``)."""
    from torch.utils.data import TensorDataset

    captured: dict[str, Any] = {}
    real = au.valid.calculate

    def capture(distance, class_same, test=None):
        captured["dist"], captured["t0"] = distance, clock()
        result = real(distance, class_same, test=test)
        captured["t1"] = clock()
        return result

    au.valid.calculate = capture
    au.args.retrieval, au.args.test_sk, au.args.test_im = "rn", 20, 20
    try:
        with cpu_cuda():
            start = clock()
            figures = au.valid.valid_cls(au.args, model,
                                         TensorDataset(sk, torch.from_numpy(sk_lab)),
                                         TensorDataset(im, torch.from_numpy(im_lab)))
    finally:
        au.valid.calculate = real
        torch.set_grad_enabled(True)  # valid_cls switches autograd off globally
    return (captured["dist"], tuple(float(f) for f in figures), captured["t0"] - start,
            captured["t1"] - captured["t0"])


def zsbir_metrics(scores: np.ndarray, q_lab: np.ndarray, g_lab: np.ndarray
                  ) -> dict[str, float]:
    from zsbir.evaluation import evaluate_scores

    return {k: float(v) for k, v in evaluate_scores(
        torch.from_numpy(np.ascontiguousarray(scores, np.float32)), q_lab, g_lab,
        metrics=list(METRICS)).metrics.items() if k in METRICS}


def exhaustive_scores(model: torch.nn.Module, sk: torch.Tensor, im: torch.Tensor,
                      precompute: bool = True, batch: int = 16, block: int = 64
                      ) -> np.ndarray:
    """zsbir-zse's exhaustive scores: each image's outputs once (tokens and, with
    ``precompute``, the per-image projections ``zse_ca``), then every pair, in blocks of
    one sketch x up to ``block`` photos."""
    with torch.no_grad():
        q = embed(model, sk, 1, batch)
        g = embed(model, im, 0, batch)
        out = np.empty((len(sk), len(im)), np.float32)
        for i in range(len(sk)):
            for lo in range(0, len(im), block):
                hi = min(lo + block, len(im))
                qs = [v[i:i + 1].expand(hi - lo, *v.shape[1:]) for v in q.values()]
                gs = [v[lo:hi] for v in g.values()]
                if precompute:
                    s = model.score_pairs(qs[0], gs[0], qs[1], gs[1])
                else:
                    s = model.score_pairs(qs[0], gs[0])
                out[i, lo:hi] = s.numpy()
    return out


def embed(model: torch.nn.Module, x: torch.Tensor, domain: int, batch: int
          ) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            o = model(x[lo:lo + batch], torch.full((len(x[lo:lo + batch]),), domain))
            for k in ("tokens", "zse_ca"):
                parts.setdefault(k, []).append(o[k])
    return {k: torch.cat(v) for k, v in parts.items()}


def compare_evaluation(au: SimpleNamespace, config: str, n_sk: int, n_im: int, seed: int,
                       rep: Report) -> None:
    their = authors_model(au, config, seed)
    mine = zsbir_model(their, config, None)
    sk, im = images(n_sk, seed + 20), images(n_im, seed + 21)
    rng = np.random.default_rng(seed)
    sk_lab = rng.integers(0, 3, n_sk)
    im_lab = rng.integers(0, 3, n_im)
    dist, figures, _, _ = authors_valid(au, their, sk, sk_lab, im, im_lab)
    scores = exhaustive_scores(mine, sk, im)
    rep.row(f"exhaustive RN scores, {n_sk} x {n_im} (valid_cls's -distance)",
            float(np.abs(scores + dist).max()), TOL_SCORE)
    same = (sk_lab[:, None] == im_lab[None, :]).astype(int)
    with contextlib.redirect_stdout(None):
        theirs_same = au.ap.calculate(dist, same, test=True)
    ours = zsbir_metrics(-dist, sk_lab, im_lab)
    for name, value in zip(METRICS, theirs_same, strict=True):
        rep.row(f"{name} on their distances (authors {value:.6f})", abs(ours[name] - value),
                TOL_METRIC)
    own = zsbir_metrics(scores, sk_lab, im_lab)
    print("  info  metrics on each side's own scores (authors' valid_cls / zsbir-zse): "
          + ", ".join(f"{k} {a:.6f}/{own[k]:.6f}" for k, a in zip(METRICS, figures,
                                                                    strict=True)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors", required=True, help="a checkout of buptLinfy/ZSE-SBIR")
    ap.add_argument("--config", choices=("tiny", "real"), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pairs", type=int, default=3, help="tuples for the RN/loss checks")
    ap.add_argument("--sketches", type=int, default=4)
    ap.add_argument("--photos", type=int, default=25, help="> test_im, so 2 photo batches")
    a = ap.parse_args(argv)
    try:
        au = load_authors(a.authors)
        import zsbir_zse  # noqa: F401
    except (ImportError, FileNotFoundError) as e:
        print(f"cannot build a side: {e}", file=sys.stderr)
        return 2
    torch.set_grad_enabled(True)
    print(f"ZSE-SBIR parity, config {a.config} (ViT depth {2 if a.config == 'tiny' else 12}, "
          f"real widths), fp32 CPU, {torch.get_num_threads()} threads, seed {a.seed}")
    rep = Report()
    start = time.perf_counter()
    compare_tokens(au, a.config, 3, a.seed, rep)
    if a.config == "real":
        kr = (1, 1, 1, 0.9, 1, 1, 0.9, 1, 1, 0.9, 1, 1)
        compare_tokens(au, a.config, 2, a.seed, rep, kr, ", token selection 196->144")
    else:
        compare_tokens(au, a.config, 2, a.seed, rep, (1, 0.9), ", token selection 0.9")
    compare_pairs_and_losses(au, a.config, a.pairs, a.seed, rep)
    compare_evaluation(au, a.config, a.sketches, a.photos, a.seed, rep)
    print(f"{'FAIL' if rep.failed else 'PASS'} ({time.perf_counter() - start:.0f} s)")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
