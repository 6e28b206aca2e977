"""Tests of zsbir.hashing: ITQ against a literal reference, sign/none hashers, faiss search."""

from __future__ import annotations

import inspect
import io
import typing

import faiss
import numpy as np
import pytest
import torch

from zsbir.evaluation import evaluate_retrieval
from zsbir.hashing import (
    Hasher,
    ITQHasher,
    NoHasher,
    NotFittedError,
    SignHasher,
    hamming_distance_matrix,
    itq_quantization_loss,
    pack_bits,
    search,
)
from zsbir.registry import hashers


# ---------------------------------------------------------------------------- helpers
def _data(n: int = 400, d: int = 48, seed: int = 0) -> np.ndarray:
    """Correlated float32 features with a decaying, well-separated PCA spectrum."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    scales = 3.0 * 0.9 ** np.arange(d)
    return (rng.standard_normal((n, d)) * scales @ basis.T + 0.5).astype(np.float32)


def reference_itq(x: np.ndarray, bits: int, n_iter: int, seed: int):
    """Literal transliteration of the authors' ITQ.m (Gong & Lazebnik) in numpy.

    PCA through the SVD of the centered data (not the scatter matrix as the package does),
    eigenvector signs fixed so that each column's largest-|.| entry is positive; R0 = left
    singular vectors of randn(bits, bits) drawn from default_rng(seed); then
    ``Z = V R; UX = sign(Z); C = UX' V; [UB, sigma, UA] = svd(C); R = UA UB'``.
    """
    x = x.astype(np.float64)
    mu = x.mean(axis=0)
    xc = x - mu
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    w = vt[:bits].T.copy()
    for j in range(bits):
        i = np.argmax(np.abs(w[:, j]))
        if w[i, j] < 0:
            w[:, j] = -w[:, j]
    v = xc @ w
    r = np.linalg.svd(np.random.default_rng(seed).standard_normal((bits, bits)))[0]
    for _ in range(n_iter):
        z = v @ r
        ux = -np.ones_like(z)
        ux[z > 0] = 1
        c = ux.T @ v
        ub, _sigma, ua_t = np.linalg.svd(c)
        r = ua_t.T @ ub.T
    codes = np.packbits(v @ r > 0, axis=1)
    return mu, w, r, codes


def brute_force_ranking(
    query: np.ndarray, gallery: np.ndarray, *, binary: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Full ranking by (distance asc | cosine desc, gallery index asc): the toolkit's tie rule."""
    if binary:
        values = hamming_distance_matrix(query, gallery)
        key = values
    else:
        qn = query / np.linalg.norm(query, axis=1, keepdims=True)
        gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        values = qn.astype(np.float64) @ gn.astype(np.float64).T
        key = -values
    order = np.argsort(key, axis=1, kind="stable")
    return np.take_along_axis(values, order, 1), order


def ap_all(relevant: np.ndarray) -> float:
    """VOC all-point interpolated AP of one query's full ranking (bool relevance vector)."""
    hits = np.flatnonzero(relevant)
    if hits.size == 0:
        return 0.0
    precision = np.cumsum(relevant) / np.arange(1, relevant.size + 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(envelope[hits].mean())  # each hit adds 1/R of recall


def _unpack(codes: np.ndarray, bits: int) -> np.ndarray:
    return np.unpackbits(codes, axis=1)[:, :bits]


# ---------------------------------------------------------------------------- ITQ
def test_itq_matches_literal_reference():
    x = _data()
    itq = ITQHasher(bits=16, iterations=50).fit(x, seed=3)
    mu, w, r, codes = reference_itq(x, bits=16, n_iter=50, seed=3)
    np.testing.assert_allclose(itq.mean, mu, atol=1e-10)
    np.testing.assert_allclose(itq.projection, w, atol=1e-8)
    np.testing.assert_allclose(itq.rotation, r, atol=1e-7)
    np.testing.assert_array_equal(itq.encode(x), codes)
    v = (x.astype(np.float64) - mu) @ w
    ref_loss = itq_quantization_loss(np.where(v @ r > 0, 1.0, -1.0), v, r)
    assert itq.loss_history[-1] == pytest.approx(ref_loss, rel=1e-10)


def test_itq_loss_non_increasing_and_below_random_rotation():
    x = _data(600, 64, seed=1)
    itq = ITQHasher(bits=32, iterations=50).fit(x, seed=0)
    hist = np.array(itq.loss_history)
    assert hist.size == 51
    assert np.all(np.diff(hist) <= 1e-9 * hist[0])
    assert hist[-1] < hist[0]
    # iterations=0 keeps the random rotation R0 of the same seed: its loss is hist[0]
    rand = ITQHasher(bits=32, iterations=0).fit(x, seed=0)
    assert rand.loss_history == pytest.approx([hist[0]])
    # the loss recomputed from the final codes (B = 2 * bits - 1) matches the history
    v = (x.astype(np.float64) - itq.mean) @ itq.projection
    b = 2.0 * _unpack(itq.encode(x), 32) - 1.0
    assert itq_quantization_loss(b, v, itq.rotation) == pytest.approx(hist[-1], rel=1e-10)
    assert itq_quantization_loss(b, v, itq.rotation) < itq_quantization_loss(
        2.0 * _unpack(rand.encode(x), 32) - 1.0, v, rand.rotation
    )


def test_itq_rotation_and_projection_orthogonal():
    itq = ITQHasher(bits=24, iterations=20).fit(_data(), seed=5)
    np.testing.assert_allclose(itq.rotation.T @ itq.rotation, np.eye(24), atol=1e-10)
    np.testing.assert_allclose(itq.rotation @ itq.rotation.T, np.eye(24), atol=1e-10)
    np.testing.assert_allclose(itq.projection.T @ itq.projection, np.eye(24), atol=1e-10)


def test_itq_deterministic_given_seed():
    x = _data()
    a = ITQHasher(bits=16).fit(x, seed=7)
    b = ITQHasher(bits=16).fit(x, seed=7)
    c = ITQHasher(bits=16).fit(x, seed=8)
    np.testing.assert_array_equal(a.rotation, b.rotation)
    np.testing.assert_array_equal(a.encode(x), b.encode(x))
    assert not np.allclose(a.rotation, c.rotation)


def test_itq_codes_shape_layout_and_tag():
    x = _data()
    itq = ITQHasher(bits=20, iterations=5).fit(x)
    codes = itq.encode(x[:10])
    assert itq.binary and itq.tag == "itq20"
    assert codes.shape == (10, 3) and codes.dtype == np.uint8
    bits = np.unpackbits(codes, axis=1)
    np.testing.assert_array_equal(bits[:, :20], (itq.project(x[:10]) > 0).astype(np.uint8))
    assert not bits[:, 20:].any()  # pad bits are zero
    assert ITQHasher().tag == "itq64"


def test_itq_state_dict_roundtrip_weights_only(tmp_path):
    x = _data()
    itq = ITQHasher(bits=32, iterations=10).fit(x, seed=2)
    path = tmp_path / "itq.pt"
    torch.save(itq.state_dict(), path)
    state = torch.load(path, weights_only=True)
    fresh = ITQHasher()
    fresh.load_state_dict(state)
    assert fresh.bits == 32 and fresh.tag == "itq32"
    np.testing.assert_array_equal(fresh.encode(x), itq.encode(x))
    # values are plain data: tensors and numbers
    assert all(isinstance(v, (torch.Tensor, int, float, str, bool)) for v in state.values())


# ---------------------------------------------------------------------------- sign / none
def test_sign_hasher_basics():
    x = _data(50, 20)
    sign = SignHasher().fit(x)
    assert sign.binary and sign.tag == "sign20"
    codes = sign.encode(x)
    assert codes.shape == (50, 3) and codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, np.packbits(x - x.astype(np.float64).mean(0) > 0, 1))
    first8 = SignHasher(bits=8).fit(x)
    assert first8.tag == "sign8"
    np.testing.assert_array_equal(first8.encode(x), codes[:, :1])
    raw = SignHasher(center=False)  # nothing to learn: encode works without fit
    np.testing.assert_array_equal(raw.encode(x), np.packbits(x > 0, axis=1))
    buf = io.BytesIO()
    torch.save(sign.state_dict(), buf)
    buf.seek(0)
    loaded = SignHasher(center=False)
    loaded.load_state_dict(torch.load(buf, weights_only=True))
    np.testing.assert_array_equal(loaded.encode(x), codes)
    assert loaded.tag == "sign20"


def test_none_hasher_is_normalized_real():
    x = _data(30, 12)
    none = NoHasher()
    assert none.fit(x) is none and not none.binary and none.tag == "real"
    out = none.encode(x)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-5)
    assert none.state_dict() == {}


def test_hashers_registered_with_manifest_friendly_signatures():
    # read the registry's table directly: lookups (names/get) import zsbir.components
    registered = {name: comp.obj for name, comp in hashers._components.items()}
    assert registered["itq"] is ITQHasher
    assert registered["sign"] is SignHasher
    assert registered["none"] is NoHasher
    for cls in (ITQHasher, SignHasher, NoHasher):
        assert issubclass(cls, Hasher)
        for p in inspect.signature(cls, eval_str=True).parameters.values():
            assert p.kind is p.POSITIONAL_OR_KEYWORD, (cls, p)
            base = (typing.get_args(p.annotation)[0]  # Annotated[int, Range(...)]
                    if typing.get_origin(p.annotation) is typing.Annotated else p.annotation)
            assert base in (int, bool), (cls, p)
            assert p.default is not p.empty, (cls, p)
    assert inspect.signature(ITQHasher).parameters["iterations"].default == 50


def test_errors_are_clear():
    x = _data(40, 16)
    with pytest.raises(NotFittedError, match="fit"):
        ITQHasher(bits=8).encode(x)
    with pytest.raises(NotFittedError, match="fit"):
        ITQHasher(bits=8).state_dict()
    with pytest.raises(NotFittedError, match="fit"):
        SignHasher().encode(x)
    with pytest.raises(ValueError, match=r"bits=32 .*feature dimension D=16"):
        ITQHasher(bits=32).fit(x)
    with pytest.raises(ValueError, match=r"bits=16 .*training samples N=10"):
        ITQHasher(bits=16).fit(x[:10])
    with pytest.raises(ValueError, match=r"bits=17 .*feature dimension D=16"):
        SignHasher(bits=17).fit(x)
    with pytest.raises(ValueError, match="bits"):
        ITQHasher(bits=0)
    with pytest.raises(ValueError, match="iterations"):
        ITQHasher(iterations=-1)
    itq = ITQHasher(bits=8).fit(x)
    with pytest.raises(ValueError, match="D=15"):
        itq.encode(x[:, :15])
    with pytest.raises(ValueError, match="NaN"):
        ITQHasher(bits=8).fit(np.full((20, 16), np.nan, np.float32))
    codes = itq.encode(x)
    with pytest.raises(ValueError, match="uint8"):
        search(x, x, 5, binary=True)
    with pytest.raises(ValueError, match="widths differ"):
        search(codes, np.zeros((4, 2), np.uint8), 5, binary=True)
    with pytest.raises(ValueError, match="k must be"):
        search(codes, codes, 0, binary=True)


# ---------------------------------------------------------------------------- search
def test_packing_layout_matches_faiss():
    first = pack_bits(np.eye(64, dtype=bool)[:1])  # only bit 0 set
    np.testing.assert_array_equal(first, [[128, 0, 0, 0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(first, np.packbits(np.eye(64, dtype=np.uint8)[:1], axis=1))
    zero = np.zeros((1, 8), np.uint8)
    index = faiss.IndexBinaryFlat(64)
    index.add(zero)
    dist, idx = index.search(first, 1)
    assert dist[0, 0] == 1 and idx[0, 0] == 0
    assert hamming_distance_matrix(first, zero)[0, 0] == 1
    # every single-bit code is at distance 1 from zero, and 2 from each other
    singles = pack_bits(np.eye(64, dtype=bool))
    d, _ = search(singles, zero, None, binary=True)
    assert (d == 1).all()
    hd = hamming_distance_matrix(singles, singles)
    np.testing.assert_array_equal(hd, 2 * (1 - np.eye(64, dtype=np.int32)))


def test_hamming_distance_matrix_matches_unpackbits():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (17, 5), dtype=np.uint8)
    b = rng.integers(0, 256, (23, 5), dtype=np.uint8)
    naive = (np.unpackbits(a, axis=1)[:, None, :] != np.unpackbits(b, axis=1)[None]).sum(2)
    np.testing.assert_array_equal(hamming_distance_matrix(a, b), naive)


@pytest.mark.parametrize("n_bytes", [1, 2, 8])
def test_faiss_hamming_search_equals_brute_force_with_ties(n_bytes):
    rng = np.random.default_rng(n_bytes)
    gallery = rng.integers(0, 256, (700, n_bytes), dtype=np.uint8)
    gallery[:, 1:] &= 0x11  # few effective bits: many equal distances
    gallery[500:] = gallery[:200]  # exact duplicates
    query = rng.integers(0, 256, (31, n_bytes), dtype=np.uint8)
    want_d, want_i = brute_force_ranking(query, gallery, binary=True)
    for k in (1, 5, 37, 300, 700, None, 5000):
        dist, idx = search(query, gallery, k, binary=True)
        kk = 700 if k is None else min(k, 700)
        assert dist.shape == idx.shape == (31, kk)
        assert dist.dtype == np.int32 and idx.dtype == np.int64
        np.testing.assert_array_equal(dist, want_d[:, :kk])
        np.testing.assert_array_equal(idx, want_i[:, :kk])


def test_faiss_hamming_search_on_itq_codes():
    x = _data(500, 96, seed=4)
    codes = ITQHasher(bits=64, iterations=10).fit(x).encode(x)
    want_d, want_i = brute_force_ranking(codes[:40], codes, binary=True)
    dist, idx = search(codes[:40], codes, 100, binary=True)
    np.testing.assert_array_equal(dist, want_d[:, :100])
    np.testing.assert_array_equal(idx, want_i[:, :100])


def test_faiss_ip_search_equals_brute_force_cosine():
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((400, 32)).astype(np.float32) * 3.0
    query = rng.standard_normal((25, 32)).astype(np.float32)
    want_s, want_i = brute_force_ranking(query, gallery, binary=False)  # float64
    qn = query.astype(np.float64) / np.linalg.norm(query, axis=1, keepdims=True)
    cos = qn @ (gallery.astype(np.float64) / np.linalg.norm(gallery, axis=1, keepdims=True)).T
    # float32 (faiss) and float64 may swap near-ties; elsewhere the ranking must be identical
    gap = np.diff(want_s, axis=1)
    separated = np.ones_like(want_s, dtype=bool)
    separated[:, 1:] &= gap < -1e-5
    separated[:, :-1] &= gap < -1e-5
    for k in (1, 10, 100, None):
        scores, idx = search(query, gallery, k, binary=False)
        kk = 400 if k is None else k
        assert scores.dtype == np.float32 and idx.dtype == np.int64
        assert (idx == want_i[:, :kk])[separated[:, :kk]].all()
        np.testing.assert_allclose(np.take_along_axis(cos, idx, 1), want_s[:, :kk], atol=1e-6)
        np.testing.assert_allclose(scores, want_s[:, :kk], atol=1e-5)
    assert separated.mean() > 0.9


def test_faiss_ip_ties_follow_gallery_index():
    # exact score ties (one-hot vectors): faiss itself returns them in descending index order
    gallery = np.tile(np.eye(4, dtype=np.float32), (50, 1))  # item i is e_{i % 4}
    query = np.ones((3, 4), np.float32)
    for k in (3, 7, 200, None):
        scores, idx = search(query, gallery, k, binary=False)
        kk = 200 if k is None else k
        np.testing.assert_array_equal(idx, np.broadcast_to(np.arange(kk), (3, kk)))
        np.testing.assert_allclose(scores, 0.5)
    scores, idx = search(np.eye(4, dtype=np.float32)[[1]], gallery, 60, binary=False)
    want = np.concatenate([np.arange(1, 200, 4), [0, 2, 3, 4, 6, 7, 8, 10, 11, 12]])
    np.testing.assert_array_equal(idx[0], want)


def test_search_empty_and_none():
    codes = np.zeros((3, 2), np.uint8)
    dist, idx = search(codes, codes[:0], None, binary=True)
    assert dist.shape == idx.shape == (3, 0)


# ---------------------------------------------------------------------------- evaluator
@pytest.mark.parametrize("binary", [True, False])
def test_faiss_ranking_metrics_equal_brute_force_evaluator(binary):
    rng = np.random.default_rng(11)
    n_cls, dim = 5, 40
    centers = rng.standard_normal((n_cls, dim)) * 0.5  # overlapping classes: mAP ~ 0.5
    q_lab = rng.integers(0, n_cls, 60)
    g_lab = np.repeat(np.arange(n_cls), 80)  # 400 gallery items, every class present
    query = (centers[q_lab] + rng.standard_normal((60, dim))).astype(np.float32)
    gallery = (centers[g_lab] + rng.standard_normal((400, dim))).astype(np.float32)
    # 16-bit ITQ codes: plenty of Hamming ties; breaking them by descending gallery index
    # would change both metrics by > 0.01 here, so the tie rules must agree
    if binary:
        itq = ITQHasher(bits=16, iterations=20).fit(np.concatenate([query, gallery]), seed=0)
        query, gallery = itq.encode(query), itq.encode(gallery)
    values, idx = search(query, gallery, None, binary=binary)
    if not binary:
        # float32 rounding differs between faiss and the evaluator, so near-tied cosines may
        # swap. Keep the queries where no relevant and irrelevant item are ranked within
        # 2e-6 of each other (it suffices to check neighbours of differing relevance).
        rel = g_lab[idx] == q_lab[:, None]
        gap = np.abs(np.diff(values, axis=1))
        gap[rel[:, 1:] == rel[:, :-1]] = np.inf
        keep = gap.min(axis=1) > 2e-6
        assert keep.sum() >= 40
        query, q_lab, idx = query[keep], q_lab[keep], idx[keep]
    relevant = g_lab[idx] == q_lab[:, None]
    want_map = np.mean([ap_all(r) for r in relevant])
    want_p100 = relevant[:, :100].mean()

    got = evaluate_retrieval(
        query, q_lab, gallery, g_lab, metrics=("map@all", "p@100"),
        distance="hamming" if binary else "cosine",
    )
    assert got.metrics["map@all"] == pytest.approx(want_map, abs=1e-6)
    assert got.metrics["p@100"] == pytest.approx(want_p100, abs=1e-6)
