"""Naive per-query references of every built-in reranker: plain numpy and python loops
over one query at a time, written straight from the papers' formulas (see each
reranker's module). Slow; the tests check the fast rerankers against them."""

from __future__ import annotations

import numpy as np

__all__ = ["alpha_qe_ref", "csls_ref", "dba_ref", "domain_center_ref", "k_reciprocal_ref",
           "seen_posterior_ref", "tta_ref"]


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _top(sims: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest values, best first (stable: lower index wins ties)."""
    return list(np.argsort(-sims, kind="stable")[:k])


def _weight(s: float, alpha: float) -> float:
    return 1.0 if alpha == 0 else max(s, 0.0) ** alpha


def _expand_one(x: np.ndarray, base: np.ndarray, k: int, alpha: float,
                exclude: int | None = None) -> np.ndarray:
    sims = np.array([float(x @ b) for b in base])
    if exclude is not None:
        sims[exclude] = -np.inf
    out = x.copy()
    for i in _top(sims, k):
        out = out + _weight(sims[i], alpha) * base[i]
    return out / np.linalg.norm(out)


def alpha_qe_ref(q: np.ndarray, g: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """alphaQE / AQE: per query, expand with its k nearest photos, score the gallery."""
    q, g = _unit(q), _unit(g)
    out = np.zeros((len(q), len(g)))
    for a in range(len(q)):
        qe = _expand_one(q[a], g, min(k, len(g)), alpha)
        for b in range(len(g)):
            out[a, b] = qe @ g[b]
    return out


def dba_ref(q: np.ndarray, g: np.ndarray, k: int, alpha: float, qe_k: int = 0) -> np.ndarray:
    """alphaDBA (then alphaQE with qe_k > 0), one gallery item and one query at a time."""
    q, g = _unit(q), _unit(g)
    aug = np.stack([_expand_one(g[i], g, min(k, len(g) - 1), alpha, exclude=i)
                    for i in range(len(g))])
    out = np.zeros((len(q), len(g)))
    for a in range(len(q)):
        x = q[a] if qe_k == 0 else _expand_one(q[a], aug, min(qe_k, len(g)), alpha)
        for b in range(len(g)):
            out[a, b] = x @ aug[b]
    return out


def csls_ref(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """CSLS = 2 cos - r_G(q) - r_Q(g), means over the k nearest of the other domain."""
    q, g = _unit(q), _unit(g)
    r_q = np.array([np.mean(sorted((float(g[b] @ x) for x in q), reverse=True)[:k])
                    for b in range(len(g))])
    out = np.zeros((len(q), len(g)))
    for a in range(len(q)):
        sims = [float(q[a] @ y) for y in g]
        r_g = np.mean(sorted(sims, reverse=True)[:k])
        for b in range(len(g)):
            out[a, b] = 2 * sims[b] - r_g - r_q[b]
    return out


def domain_center_ref(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    """<norm(q - mean of the queries), norm(g - mean of the gallery)>."""
    q, g = _unit(q), _unit(g)
    mq, mg = q.mean(0), g.mean(0)
    out = np.zeros((len(q), len(g)))
    for a in range(len(q)):
        x = (q[a] - mq) / np.linalg.norm(q[a] - mq)
        for b in range(len(g)):
            y = (g[b] - mg) / np.linalg.norm(g[b] - mg)
            out[a, b] = x @ y
    return out


def tta_ref(q_views: np.ndarray, g_views: np.ndarray) -> np.ndarray:
    """Cosine of the normalized means of each item's normalized view embeddings."""
    def avg(v: np.ndarray) -> np.ndarray:
        m = sum(x / np.linalg.norm(x) for x in v)
        return m / np.linalg.norm(m)

    qa = [avg(v) for v in q_views]
    ga = [avg(v) for v in g_views]
    return np.array([[float(x @ y) for y in ga] for x in qa])


def k_reciprocal_ref(q: np.ndarray, g: np.ndarray, k1: int, k2: int,
                     lambda_value: float) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017), the inductive cross-domain form
    of :mod:`zsbir.rerankers.kreciprocal`, with python sets, one item at a time."""
    q, g = _unit(q), _unit(g)
    n = len(g)
    kk1 = min(k1, n - 1)
    kh = min(int(round(k1 / 2)), kk1)
    sg = g @ g.T

    def nbrs(i: int, k: int) -> list[int]:  # N(g_i, k): itself, then its k nearest others
        sims = sg[i].copy()
        sims[i] = -np.inf
        return [i] + _top(sims, k)

    def recip(i: int, k: int) -> set[int]:
        return {j for j in nbrs(i, k) if i in nbrs(j, k)}

    def robust(r: set[int], exclude: int | None) -> set[int]:
        out = set(r)
        for c in r:
            if c == exclude:
                continue
            rc = recip(c, kh)
            if len(rc & r) > 2 / 3 * len(rc):
                out |= rc
        return out

    def encode(sims: np.ndarray, members: set[int]) -> np.ndarray:
        v = np.zeros(n)
        for j in members:
            v[j] = np.exp(-(1.0 - sims[j]))
        return v / v.sum() if v.sum() > 0 else v

    v_g = [encode(sg[i], robust(recip(i, kk1), exclude=i)) for i in range(n)]
    kqg = min(k2 - 1, n - 1)
    v_g_exp = [sum(v_g[j] for j in nbrs(i, kqg)) / (kqg + 1) for i in range(n)]
    out = np.zeros((len(q), n))
    for a in range(len(q)):
        s = np.array([float(q[a] @ y) for y in g])
        r: set[int] = set()
        for j in _top(s, kk1):
            thresh = sg[j][nbrs(j, kk1)[-1]] if kk1 > 0 else 1.0
            if s[j] >= thresh:  # q would enter N(g_j, k1)
                r.add(j)
        vq = encode(s, robust(r, exclude=None)) if kk1 > 0 else np.zeros(n)
        kq = min(k2 - 1, n)
        for j in _top(s, kq):
            vq = vq + v_g[j]
        vq = vq / (kq + 1)
        for b in range(n):
            mn = np.minimum(vq, v_g_exp[b]).sum()
            mx = np.maximum(vq, v_g_exp[b]).sum()
            d_j = 1.0 - mn / mx if mx > 0 else 1.0
            out[a, b] = -((1 - lambda_value) * d_j + lambda_value * (1.0 - s[b]))
    return out


def seen_posterior_ref(q: np.ndarray, g: np.ndarray, logits_q: np.ndarray,
                       logits_g: np.ndarray, gamma: float, temperature: float = 1.0,
                       gated: bool = False, tau: float = 0.5, width: float = 0.05,
                       beta: float = 0.0, kr: tuple[int, int, float] | None = None
                       ) -> np.ndarray:
    """Seen-class suppression / gating (:mod:`zsbir.rerankers.seen`), one (query, photo)
    pair at a time: ``base(q, g) - gamma u(q) sigma(g) + beta (1 - u(q)) <p(q), p(g)>``,
    ``p = softmax(z / T)``, ``sigma = max p``, ``u = 1`` (not gated) or
    ``1 / (1 + exp(-(tau - sigma(q)) / width))``; base the cosine, or the k-reciprocal
    score of :func:`k_reciprocal_ref` when ``kr = (k1, k2, lambda)``."""
    def softmax(z: np.ndarray) -> np.ndarray:
        e = np.exp((np.asarray(z, np.float64) - np.max(z)) / temperature)
        return e / e.sum()

    base = (k_reciprocal_ref(q, g, *kr) if kr is not None else _unit(q) @ _unit(g).T)
    out = np.zeros((len(q), len(g)))
    for a in range(len(q)):
        pq = softmax(logits_q[a])
        u = 1.0 / (1.0 + np.exp(-(tau - pq.max()) / width)) if gated else 1.0
        for b in range(len(g)):
            pg = softmax(logits_g[b])
            out[a, b] = base[a, b] - gamma * u * pg.max()
            if gated:
                out[a, b] += beta * (1.0 - u) * float(sum(x * y for x, y in zip(pq, pg)))
    return out
