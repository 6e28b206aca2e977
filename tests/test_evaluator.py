"""The fast evaluator against the naive per-query references, on random inputs.

Covers: every metric variant; continuous scores, sparse ties, heavy (quantized) ties and
Hamming-like integer scores; chunk sizes that do not divide Q; K larger than G; queries
without positives; per-class means; the torch (device) code path run on CPU; and the
cosine / euclidean / hamming score computations against brute force (and faiss).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zsbir.evaluation import (
    MEMORY_BUDGET_BYTES,
    EvalResult,
    auto_chunk_size,
    evaluate_retrieval,
    evaluate_scores,
    hamming_distances,
    kernels,
    pairwise_scores,
)
from zsbir.evaluation import ranking as rk
from zsbir.evaluation.reference import reference_evaluate, reference_scores


def all_metrics(g: int) -> list[str]:
    ks = sorted({1, 5, 100, g, g + 50})
    out = ["map@all", "map@all-sklearn"]
    for k in ks:
        out += [f"map@{k}", f"map@{k}-sempcyc", f"map@{k}-yelamarthi", f"p@{k}", f"p@{k}-zse"]
    return out


def make_scores(rng: np.random.Generator, q: int, g: int, ties: str) -> np.ndarray:
    s = rng.standard_normal((q, g)).astype(np.float32)
    if ties == "sparse":  # a few exact duplicates per row
        for _ in range(2 * q):
            r, a, b = rng.integers(q), rng.integers(g), rng.integers(g)
            s[r, b] = s[r, a]
    elif ties == "heavy":  # quantized: ties everywhere
        s = np.round(s * 2).astype(np.float32)
    elif ties == "hamming":  # -distance of 16-bit codes
        s = -rng.binomial(16, 0.5, (q, g)).astype(np.float32)
    return s


def labels(rng: np.random.Generator, q: int, g: int, classes: int) -> tuple:
    # query classes include one absent from the gallery (queries without positives)
    return rng.integers(0, classes + 1, q), rng.integers(0, classes, g)


def assert_matches_reference(res: EvalResult, ref: dict[str, np.ndarray]) -> None:
    for name, per_query in ref.items():
        np.testing.assert_allclose(res.per_query[name], per_query, rtol=0, atol=1e-12,
                                   err_msg=name)
        assert res.metrics[name] == pytest.approx(per_query.mean(), abs=1e-12)


@pytest.mark.parametrize("ties", ["none", "sparse", "heavy", "hamming"])
@pytest.mark.parametrize("q, g, classes", [(1, 1, 1), (5, 9, 2), (37, 200, 4), (64, 513, 6)])
def test_fast_equals_reference(q, g, classes, ties):
    rng = np.random.default_rng(q * 1000 + g)
    s = make_scores(rng, q, g, ties)
    ql, gl = labels(rng, q, g, classes)
    metrics = all_metrics(g)
    ref = reference_evaluate(s, ql, gl, metrics)
    for chunk in (1, 7, None):
        assert_matches_reference(evaluate_scores(s, ql, gl, metrics, chunk_size=chunk), ref)


@pytest.mark.parametrize("ties", ["none", "sparse", "heavy", "hamming"])
@pytest.mark.parametrize("q, g", [(9, 40), (37, 200), (64, 513)])
def test_top_k_only_path_equals_reference(q, g, ties, monkeypatch):
    """Only @K metrics with K <= G/4: the partition path, incl. ties at the boundary."""
    tops = []
    original = rk._np_ranks_float

    def spy(*args, **kwargs):
        tops.append(args[4] if len(args) > 4 else kwargs.get("top"))
        return original(*args, **kwargs)

    monkeypatch.setattr(rk, "_np_ranks_float", spy)
    rng = np.random.default_rng(q + g + 1)
    s = make_scores(rng, q, g, ties)
    ql, gl = labels(rng, q, g, 3)
    k = g // 4
    metrics = [f"map@{k}", f"map@{k}-sempcyc", f"map@{k}-yelamarthi", f"p@{k}",
               "p@3-zse", "map@1", "map@2-sempcyc"]
    ref = reference_evaluate(s, ql, gl, metrics)
    for chunk in (5, None):
        assert_matches_reference(evaluate_scores(s, ql, gl, metrics, chunk_size=chunk), ref)
    assert tops and set(tops) == {k}


@pytest.mark.parametrize("ties", ["sparse", "heavy", "hamming"])
def test_torch_path_equals_reference(ties):
    """The device (torch) code path, run on CPU tensors."""
    rng = np.random.default_rng(11)
    s = make_scores(rng, 29, 150, ties)
    ql, gl = labels(rng, 29, 150, 3)
    metrics = all_metrics(150)
    res = rk._run(rk._PrecomputedScorer(s, torch.device("cpu")), ql, gl, metrics, 6,
                  torch.device("cpu"), per_class=False, use_numpy=False)
    assert_matches_reference(res, reference_evaluate(s, ql, gl, metrics))


def test_tie_branches_are_exercised(monkeypatch):
    """Sparse ties are corrected in place; heavy ties take the keys path; both exact."""
    calls = []
    original = kernels._np_ranks_keys  # called by the float kernel for heavily tied rows

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "_np_ranks_keys", spy)
    rng = np.random.default_rng(5)
    ql, gl = labels(rng, 40, 300, 3)
    metrics = ["map@all", "map@all-sklearn", "map@50-sempcyc", "p@10"]
    s = make_scores(rng, 40, 300, "sparse")
    assert_matches_reference(evaluate_scores(s, ql, gl, metrics, chunk_size=40),
                             reference_evaluate(s, ql, gl, metrics))
    assert calls == []
    s = make_scores(rng, 40, 300, "heavy")
    assert_matches_reference(evaluate_scores(s, ql, gl, metrics, chunk_size=40),
                             reference_evaluate(s, ql, gl, metrics))
    assert calls


def test_hamming_ties_follow_gallery_index():
    """Binary codes: many equal distances; ranks follow the gallery index within a tie."""
    q = np.packbits(np.zeros((1, 8), dtype=bool), axis=1)
    bits = np.zeros((6, 8), dtype=bool)
    bits[:, 0] = True  # every gallery code at distance 1
    g = np.packbits(bits, axis=1)
    for gl, ap, p1 in (([0, 1, 0, 1, 0, 0], 0.5, 0.0), ([1, 0, 0, 0, 0, 1], (1 + 2 / 6) / 2, 1.0)):
        res = evaluate_retrieval(q, [1], g, np.array(gl), ["map@all", "p@1", "map@all-sklearn"],
                                 distance="hamming")
        assert res.metrics["map@all"] == pytest.approx(ap)
        assert res.metrics["p@1"] == p1
        assert res.metrics["map@all-sklearn"] == pytest.approx(2 / 6)  # one threshold


def test_queries_without_positives_count_as_zero():
    rng = np.random.default_rng(2)
    s = rng.standard_normal((6, 20)).astype(np.float32)
    ql = np.array([0, 0, 9, 9, 9, 1])
    gl = rng.integers(0, 2, 20)
    res = evaluate_scores(s, ql, gl, ["map@all", "p@5"], per_class=True)
    assert res.num_queries_without_positives == 3
    assert res.per_class["map@all"][9] == 0.0
    ref = reference_evaluate(s, ql, gl, ["map@all"])["map@all"]
    assert res.metrics["map@all"] == pytest.approx(ref.sum() / 6)


def test_per_class_breakdown():
    rng = np.random.default_rng(8)
    s = make_scores(rng, 50, 120, "sparse")
    ql, gl = labels(rng, 50, 120, 4)
    ql = ql + 10  # arbitrary label values
    gl = gl + 10
    metrics = ["map@all", "p@10-zse"]
    res = evaluate_scores(s, ql, gl, metrics, chunk_size=9, per_class=True)
    ref = reference_evaluate(s, ql, gl, metrics)
    for m in metrics:
        assert set(res.per_class[m]) == set(np.unique(ql).tolist())
        for c, v in res.per_class[m].items():
            assert v == pytest.approx(ref[m][ql == c].mean(), abs=1e-12)
    assert evaluate_scores(s, ql, gl, metrics).per_class == {}
    d = res.to_dict()
    assert set(d["per_class"]["map@all"]) == {str(c) for c in np.unique(ql)}


# ----------------------------------------------------------------------------- scores

@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_float_scores_match_brute_force(distance):
    rng = np.random.default_rng(4)
    q = rng.standard_normal((23, 17)).astype(np.float32)
    g = rng.standard_normal((41, 17)).astype(np.float32)
    fast = pairwise_scores(torch.from_numpy(q), g, distance).numpy()
    np.testing.assert_allclose(fast, reference_scores(q, g, distance), atol=1e-5)


@pytest.mark.parametrize("nbytes", [1, 3, 8, 9, 16])
def test_hamming_matches_brute_force_and_faiss(nbytes):
    rng = np.random.default_rng(nbytes)
    q = rng.integers(0, 256, (13, nbytes), dtype=np.uint8)
    g = rng.integers(0, 256, (57, nbytes), dtype=np.uint8)
    brute = -reference_scores(q, g, "hamming")
    for use_numpy in (True, False):  # numpy popcount and the torch SWAR path
        assert (hamming_distances(q, g, use_numpy=use_numpy).numpy() == brute).all()
    assert (pairwise_scores(q, g, "hamming").numpy() == -brute).all()
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexBinaryFlat(8 * nbytes)
    index.add(g)
    dist, idx = index.search(q, g.shape[0])
    assert (np.take_along_axis(brute, idx, 1) == dist).all()


def test_exact_end_to_end_euclidean_integer_features():
    """Integer features: euclidean scores are exact, so results must match exactly."""
    rng = np.random.default_rng(6)
    q = rng.integers(-3, 4, (45, 6)).astype(np.float32)
    g = rng.integers(-3, 4, (230, 6)).astype(np.float32)  # many exact distance ties
    ql, gl = labels(rng, 45, 230, 5)
    metrics = all_metrics(230)
    ref = reference_evaluate(reference_scores(q, g, "euclidean"), ql, gl, metrics)
    for chunk in (4, 45, None):
        assert_matches_reference(evaluate_retrieval(q, ql, g, gl, metrics, distance="euclidean",
                                                    chunk_size=chunk), ref)


@pytest.mark.parametrize("use_numpy", [True, False])
def test_exact_end_to_end_hamming(use_numpy):
    rng = np.random.default_rng(7)
    q = rng.integers(0, 256, (33, 2), dtype=np.uint8)
    g = rng.integers(0, 256, (300, 2), dtype=np.uint8)
    ql, gl = labels(rng, 33, 300, 4)
    metrics = all_metrics(300)
    ref = reference_evaluate(reference_scores(q, g, "hamming"), ql, gl, metrics)
    scorer = rk._Scorer(q, g, "hamming", torch.device("cpu"), use_numpy)
    res = rk._run(scorer, ql, gl, metrics, 5, torch.device("cpu"), False, use_numpy)
    assert_matches_reference(res, ref)


def test_cosine_end_to_end():
    rng = np.random.default_rng(9)
    q = rng.standard_normal((40, 32)).astype(np.float32)
    g = rng.standard_normal((250, 32)).astype(np.float32)
    ql, gl = labels(rng, 40, 250, 3)
    metrics = ["map@all", "map@all-sklearn", "map@200", "p@100", "map@200-yelamarthi"]
    res = evaluate_retrieval(torch.from_numpy(q), torch.from_numpy(ql), g, gl, metrics,
                             chunk_size=7)
    ref = reference_evaluate(pairwise_scores(q, g).numpy(), ql, gl, metrics)
    assert_matches_reference(res, ref)
    # cosine ranks like SAKE's negative euclidean distance of L2-normalized features
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    sake = evaluate_retrieval(qn, ql, gn, gl, metrics, distance="euclidean")
    for m in metrics:
        assert sake.metrics[m] == pytest.approx(res.metrics[m], abs=1e-6)


# ----------------------------------------------------------------------------- API

def test_result_fields_and_json():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((10, 8)).astype(np.float32)
    g = rng.standard_normal((30, 8)).astype(np.float32)
    res = evaluate_retrieval(q, rng.integers(0, 3, 10), g, rng.integers(0, 3, 30))
    assert list(res.metrics) == ["map@all", "p@100"]
    assert (res.num_queries, res.num_gallery) == (10, 30)
    assert set(res.formulas) == set(res.metrics)
    assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
    import json
    assert json.loads(json.dumps(res.to_dict())) == res.to_dict()


def test_auto_chunk_size_respects_budget():
    c = auto_chunk_size(17101)
    assert c >= 1 and c * 17101 * rk._BYTES_PER_CELL <= MEMORY_BUDGET_BYTES
    assert auto_chunk_size(10**9) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(metrics=["map@al"]), "unknown metric"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(distance="manhattan"), "distance"),
    (dict(distance="hamming"), "uint8"),
    (dict(metrics=[]), "no metric"),
])
def test_bad_arguments(kwargs, match):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((4, 8)).astype(np.float32)
    g = rng.standard_normal((6, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=match):
        evaluate_retrieval(q, np.zeros(4, int), g, np.zeros(6, int), **kwargs)


def test_bad_inputs():
    q = np.ones((4, 8), np.float32)
    g = np.ones((6, 8), np.float32)
    with pytest.raises(ValueError, match="shape"):
        evaluate_retrieval(q, np.zeros(3, int), g, np.zeros(6, int))
    with pytest.raises(ValueError, match="integer labels"):
        evaluate_retrieval(q, np.zeros(4), g, np.zeros(6, int))
    with pytest.raises(ValueError, match="widths"):
        evaluate_retrieval(q, np.zeros(4, int), g[:, :5], np.zeros(6, int))
    q_nan = q.copy()
    q_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_retrieval(q_nan, np.zeros(4, int), g, np.zeros(6, int))
    s = np.zeros((4, 6), np.float32)
    s[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate_scores(s, np.zeros(4, int), np.zeros(6, int))
    with pytest.raises(ValueError, match="at least one"):
        evaluate_scores(np.zeros((0, 6), np.float32), np.zeros(0, int), np.zeros(6, int))
    with pytest.raises(ValueError, match="float features"):
        evaluate_retrieval(q.astype(np.uint8), np.zeros(4, int), g.astype(np.uint8),
                           np.zeros(6, int))
