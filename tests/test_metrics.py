"""Metric names, formulas and the naive references, on hand-worked rankings.

Each hand example is checked three ways: the literal per-query reference
(zsbir.evaluation.reference), the fast evaluator (evaluate_scores), and, where sklearn is
importable, sklearn itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from zsbir.evaluation import METRICS, evaluate_scores, metric_info, parse_metric
from zsbir.evaluation import reference as ref

ALL_PATTERNS = ("map@all", "map@all-sklearn", "map@K", "map@K-sempcyc", "map@K-yelamarthi",
                "p@K", "p@K-zse")


def one_query(scores, relevant, metrics):
    """Fast evaluator and reference on a single query (label 1 = relevant)."""
    scores = np.asarray(scores, dtype=np.float32)[None, :]
    gl = np.asarray(relevant, dtype=np.int64)
    fast = evaluate_scores(scores, np.array([1]), gl, metrics).metrics
    slow = {parse_metric(m).name: ref.reference_metric(m, scores[0], gl == 1) for m in metrics}
    return fast, slow


# ----------------------------------------------------------------------------- names

def test_metrics_list_is_exact():
    assert METRICS == ALL_PATTERNS


@pytest.mark.parametrize("name, canon, family, k", [
    ("map@all", "map@all", "voc_ap", None),
    ("mAP@all", "map@all", "voc_ap", None),
    ("map@all-sklearn", "map@all-sklearn", "sklearn_ap", None),
    ("map@200", "map@200", "voc_ap", 200),
    (" MAP@0200 ", "map@200", "voc_ap", 200),
    ("map@200-sempcyc", "map@200-sempcyc", "sklearn_ap", 200),
    ("map@200-yelamarthi", "map@200-yelamarthi", "yelamarthi", 200),
    ("P@100", "p@100", "precision", 100),
    ("p@200-zse", "p@200-zse", "precision_zse", 200),
    ("p@1", "p@1", "precision", 1),
])
def test_parse_metric(name, canon, family, k):
    spec = parse_metric(name)
    assert (spec.name, spec.family, spec.k) == (canon, family, k)
    assert spec.formula == metric_info(name)


@pytest.mark.parametrize("bad, hint", [
    ("map@al", "map@all"),
    ("mAP", None),
    ("p@all", None),
    ("map@0", None),
    ("map@200-sklearn", "map@200-sempcyc"),
    ("precision@100", None),
    ("map@all-yelamarthi", None),
    ("p@-5", None),
])
def test_parse_metric_rejects(bad, hint):
    with pytest.raises(ValueError) as err:
        parse_metric(bad)
    if hint:
        assert hint in str(err.value)


def test_parse_metric_rejects_non_string():
    with pytest.raises(ValueError):
        parse_metric(200)  # type: ignore[arg-type]


def test_metric_info_names_sources():
    sources = {"map@all": "SAKE", "map@all-sklearn": "SEM-PCYC", "map@K": "SAKE",
               "map@K-sempcyc": "SEM-PCYC", "map@K-yelamarthi": "Yelamarthi",
               "p@K": "SAKE", "p@K-zse": "ZSE-SBIR"}
    for pattern, source in sources.items():
        assert source in metric_info(pattern)
        assert "\n" not in metric_info(pattern)
    assert "200" in metric_info("map@200") and "{K}" not in metric_info("map@200")


# ----------------------------------------------------------------------------- formulas

def test_voc_envelope_vs_non_interpolated():
    # relevance in rank order 0 1 0 1 1: P at positives 1/2, 2/4, 3/5
    scores = [5, 4, 3, 2, 1]
    rel = [0, 1, 0, 1, 1]
    metrics = ["map@all", "map@all-sklearn", "map@3", "map@3-sempcyc", "map@3-yelamarthi",
               "p@3", "p@3-zse", "p@2-zse", "map@5", "map@10"]
    fast, slow = one_query(scores, rel, metrics)
    expected = {
        "map@all": 0.6,  # envelope: every positive gets max(1/2, 2/4, 3/5) = 0.6
        "map@all-sklearn": (1 / 2 + 2 / 4 + 3 / 5) / 3,
        "map@3": (1 / 2) / 3,  # envelope on the top 3 only, / min(3, #pos = 3)
        "map@3-sempcyc": 1 / 2,  # one positive found in the top 3
        "map@3-yelamarthi": (1 / 2) / 3,
        "p@3": 1 / 3,
        "p@3-zse": 1 / 3,
        "p@2-zse": 1 / 2,
        "map@5": 0.6,
        "map@10": 0.6,  # K >= G: same as map@all
    }
    for m, v in expected.items():
        assert fast[m] == pytest.approx(v, abs=1e-12), m
        assert slow[m] == pytest.approx(v, abs=1e-12), m


def test_map_at_k_divides_by_min_k_positives():
    # 2 positives in the whole gallery, both in the top 4 (ranks 1 and 3)
    fast, slow = one_query([9, 8, 7, 6, 5, 4], [1, 0, 1, 0, 0, 0],
                           ["map@4", "map@2", "p@4", "p@4-zse", "map@4-yelamarthi"])
    for d in (fast, slow):
        assert d["map@4"] == pytest.approx((1 + 2 / 3) / 2)
        assert d["map@2"] == pytest.approx(1 / 2)  # top-2 holds one positive; / min(2, 2)
        assert d["p@4"] == pytest.approx(2 / 4)
        assert d["p@4-zse"] == pytest.approx(1 / 2)  # ZSE: top min(K, #pos) = 2 hold 1
        assert d["map@4-yelamarthi"] == pytest.approx((1 + 2 / 3) / 4)


def test_k_larger_than_gallery():
    fast, slow = one_query([3, 2, 1], [0, 1, 1], ["p@100", "map@100-yelamarthi", "map@100",
                                                  "map@100-sempcyc", "p@100-zse"])
    for d in (fast, slow):
        assert d["p@100"] == pytest.approx(2 / 3)  # / min(K, G)
        assert d["map@100-yelamarthi"] == pytest.approx((1 / 2 + 2 / 3) / 3)
        assert d["map@100"] == pytest.approx(2 / 3)
        assert d["map@100-sempcyc"] == pytest.approx((1 / 2 + 2 / 3) / 2)
        assert d["p@100-zse"] == pytest.approx(1 / 2)  # top min(100, 2) = 2 hold 1


def test_ties_index_rule_and_sklearn_groups():
    # Four items, all tied: rank-based formulas follow the gallery index; sklearn sees one
    # threshold with precision 1/2.
    metrics = ["map@all", "map@all-sklearn", "p@1", "p@2", "map@2-sempcyc", "map@2"]
    for rel, voc, p1 in (([0, 1, 0, 1], 0.5, 0.0), ([1, 0, 1, 0], (1 + 2 / 3) / 2, 1.0)):
        fast, slow = one_query([7, 7, 7, 7], rel, metrics)
        for d in (fast, slow):
            assert d["map@all"] == pytest.approx(voc)
            assert d["p@1"] == p1
            assert d["p@2"] == 0.5
            assert d["map@all-sklearn"] == pytest.approx(0.5)
            assert d["map@2-sempcyc"] == pytest.approx(0.5)  # one group of 2, 1 positive


def test_sklearn_ties_partial_group():
    # scores 3 2 2 1, relevant at the second 2 and at 1: thresholds 3 | 2 | 1
    fast, slow = one_query([3, 2, 2, 1], [0, 0, 1, 1], ["map@all-sklearn", "map@all",
                                                        "map@2-sempcyc", "map@3-sempcyc"])
    for d in (fast, slow):
        assert d["map@all-sklearn"] == pytest.approx(0.5 * (1 / 3) + 0.5 * (2 / 4))
        assert d["map@all"] == pytest.approx(0.5)  # index rule: positives at ranks 3, 4
        # top 2 = items 0, 1 (index rule): no positive -> 0
        assert d["map@2-sempcyc"] == 0.0
        # top 3 = items 0, 1, 2: threshold 2 holds 1 positive of 3 items
        assert d["map@3-sempcyc"] == pytest.approx(1 / 3)


def test_negative_zero_ties_positive_zero():
    fast, slow = one_query([-0.0, 0.0, -1.0], [0, 1, 0], ["map@all", "p@1", "map@all-sklearn"])
    for d in (fast, slow):
        assert d["p@1"] == 0.0  # -0.0 == +0.0 tie: index 0 (negative) first
        assert d["map@all"] == pytest.approx(0.5)
        assert d["map@all-sklearn"] == pytest.approx(0.5)


def test_no_positive_query_scores_zero():
    metrics = [p.replace("K", "3") for p in ALL_PATTERNS]
    fast, slow = one_query([3, 2, 1], [0, 0, 0], metrics)
    assert all(v == 0.0 for v in fast.values())
    assert all(v == 0.0 for v in slow.values())


def test_reference_sklearn_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for trial in range(40):
        n = int(rng.integers(2, 60))
        scores = rng.integers(0, 4 if trial % 2 else 1000, n).astype(np.float64)
        rel = rng.random(n) < 0.3
        rel[rng.integers(n)] = True
        assert ref.ap_sklearn(scores, rel) == pytest.approx(
            sk.average_precision_score(rel, scores), abs=1e-12)
        k = int(rng.integers(1, n + 1))
        top = ref.ranking(scores)[:k]
        if rel[top].any():
            assert ref.ap_sempcyc_at_k(scores, rel, k) == pytest.approx(
                sk.average_precision_score(rel[top], scores[top]), abs=1e-12)


def test_formulas_in_result_are_json():
    res = evaluate_scores(np.array([[1.0, 0.5]]), np.array([0]), np.array([0, 1]),
                          ["mAP@all", "map@all", "P@1"])
    assert list(res.metrics) == ["map@all", "p@1"]  # canonical names, duplicates merged
    data = json.loads(json.dumps(res.to_dict()))
    assert data == res.to_dict()
    assert "SAKE" in data["formulas"]["map@all"]
