"""Rerankers (issue 17): each built-in against its naive per-query reference on random
inputs, chunk invariance, rerank_topk, the chunked evaluator entry, and validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zsbir.evaluation import evaluate_score_fn, evaluate_scores
from zsbir.registry import rerankers
from zsbir.rerankers import reference as ref
from zsbir.rerankers import rerank_topk


def _data(seed: int, nq: int = 14, ng: int = 37, d: int = 8, domain_gap: float = 0.6):
    """Clustered photos; sketches are noisy copies of some photos shifted by a common
    offset (a domain gap), so reciprocal sets are non-trivial but not full."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, d))
    g = centres[rng.integers(0, 5, ng)] + 0.5 * rng.standard_normal((ng, d))
    q = g[rng.integers(0, ng, nq)] + 0.4 * rng.standard_normal((nq, d))
    q += domain_gap * rng.standard_normal(d)
    return q.astype(np.float32), g.astype(np.float32)


def _build(name: str, **kw):
    return rerankers.get(name)(**kw)


CASES = [
    ("aqe", {"k": 3}, lambda q, g: ref.alpha_qe_ref(q, g, 3, 0.0)),
    ("alpha_qe", {"k": 4, "alpha": 3.0}, lambda q, g: ref.alpha_qe_ref(q, g, 4, 3.0)),
    ("alpha_qe", {"k": 50, "alpha": 1.5}, lambda q, g: ref.alpha_qe_ref(q, g, 50, 1.5)),
    ("dba", {"k": 3, "alpha": 0.0}, lambda q, g: ref.dba_ref(q, g, 3, 0.0)),
    ("dba", {"k": 4, "alpha": 3.0, "qe_k": 2}, lambda q, g: ref.dba_ref(q, g, 4, 3.0, 2)),
    ("csls", {"k": 5}, lambda q, g: ref.csls_ref(q, g, 5)),
    ("domain_center", {}, ref.domain_center_ref),
    ("k_reciprocal", {"k1": 6, "k2": 3, "lambda_value": 0.3},
     lambda q, g: ref.k_reciprocal_ref(q, g, 6, 3, 0.3)),
    ("k_reciprocal", {"k1": 20, "k2": 6, "lambda_value": 0.0},
     lambda q, g: ref.k_reciprocal_ref(q, g, 20, 6, 0.0)),
    ("k_reciprocal", {"k1": 3, "k2": 1, "lambda_value": 0.5},
     lambda q, g: ref.k_reciprocal_ref(q, g, 3, 1, 0.5)),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("name", "kw", "naive"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_naive_reference(name, kw, naive, seed):
    q, g = _data(seed)
    r = _build(name, chunk_size=5, **kw)  # several chunks
    r.fit(g, queries=q)
    got = r.scores(q, g)
    want = naive(q, g)
    assert got.shape == (len(q), len(g)) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
    # and it changes the ranking of at least some query (not a disguised identity)
    if name != "domain_center" or seed == 0:
        plain = ref._unit(q) @ ref._unit(g).T
        assert not np.allclose(got, plain, atol=1e-3)


def test_k_reciprocal_sets_are_not_trivial():
    """The inputs exercise both branches: some queries have reciprocal neighbours and
    some expansion sets are taken, others not."""
    q, g = _data(0)
    r = _build("k_reciprocal", k1=6, k2=3).fit(g)
    s = torch.from_numpy(ref._unit(q).astype(np.float32)) @ r.gallery.T
    v, i = torch.topk(s, r.kk1, dim=1)
    recip = (v >= r.t1[i]).sum(1)
    assert recip.max() > 0 and recip.min() < r.kk1
    assert r.r_mask.sum() > len(g) and not bool(r.r_mask.all())


@pytest.mark.parametrize("name", ["alpha_qe", "dba", "csls", "domain_center", "k_reciprocal"])
def test_rows_do_not_depend_on_the_other_queries(name):
    q, g = _data(3, nq=20)
    r = _build(name, chunk_size=7).fit(g, queries=q)
    full = r.scores(q, g)
    fn = r.score_rows(q, g)
    rows = np.array([11, 2, 19, 5])
    np.testing.assert_allclose(fn(rows).numpy(), full[rows], atol=1e-6)


def test_tta_matches_reference_and_needs_views():
    rng = np.random.default_rng(0)
    qv = rng.standard_normal((9, 2, 6)).astype(np.float32)
    gv = rng.standard_normal((13, 2, 6)).astype(np.float32)
    r = _build("tta")
    assert r.needs_model and r.views == ("hflip",)
    r.fit(gv)
    np.testing.assert_allclose(r.scores(qv, gv), ref.tta_ref(qv, gv), atol=2e-6)
    with pytest.raises(ValueError, match="view"):
        r.fit(rng.standard_normal((13, 3, 6)).astype(np.float32))
    with pytest.raises(ValueError, match="3-D"):
        r.fit(gv[:, 0])


def test_rerank_topk_is_the_top_of_scores():
    q, g = _data(4)
    r = _build("alpha_qe", k=3, chunk_size=4)
    s, i = rerank_topk(r, q, g, 6)
    full = r.scores(q, g)
    assert s.shape == i.shape == (len(q), 6)
    np.testing.assert_allclose(s, np.take_along_axis(full, i, 1), atol=1e-6)
    np.testing.assert_allclose(s, -np.sort(-full, axis=1)[:, :6], atol=1e-6)
    c = _build("csls", k=3)
    s2, _ = rerank_topk(c, q, g, 100)  # fits on the queries itself; k clipped to G
    assert s2.shape == (len(q), len(g))
    # a transductive reranker is refitted when the queries change (same gallery)
    q2 = q[:6] + 0.5
    s3, _ = rerank_topk(c, q2, g, len(g))
    np.testing.assert_allclose(s3, -np.sort(-ref.csls_ref(q2, g, 3), axis=1), atol=2e-5)


def test_uses_queries_and_refit():
    q, g = _data(5)
    c = _build("csls")
    with pytest.raises(ValueError, match="queries"):
        c.fit(g)
    with pytest.raises(ValueError, match="at least 2 queries"):
        _build("domain_center").fit(g, queries=q[:1])
    r = _build("dba", k=2).fit(g)
    g2 = g[::-1].copy()
    np.testing.assert_allclose(r.scores(q, g2), ref.dba_ref(q, g2, 2, 3.0), atol=2e-5)


def test_bad_input_is_a_clear_error():
    r = _build("aqe")
    with pytest.raises(ValueError, match="NaN"):
        r.fit(np.full((4, 3), np.nan, np.float32))
    with pytest.raises(ValueError, match="2-D"):
        r.fit(np.zeros(4, np.float32))
    r.fit(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="width"):
        r.scores(np.ones((2, 3), np.float32), np.eye(4, dtype=np.float32))


def test_evaluate_score_fn_equals_evaluate_scores():
    rng = np.random.default_rng(0)
    s = rng.standard_normal((40, 60)).astype(np.float32)
    ql, gl = rng.integers(0, 4, 40), rng.integers(0, 4, 60)
    asked = []

    def fn(rows):
        asked.append(len(rows))
        return s[rows]

    a = evaluate_score_fn(fn, ql, gl, ["map@all", "p@10"], chunk_size=7)
    b = evaluate_scores(s, ql, gl, ["map@all", "p@10"])
    assert a.metrics == pytest.approx(b.metrics, abs=1e-12)
    assert max(asked) <= 7 and sum(asked) == 40
    with pytest.raises(ValueError, match="shape"):
        evaluate_score_fn(lambda rows: s[rows, :5], ql, gl, ["map@all"])


def test_registered_and_validated():
    from zsbir.manifest import ManifestError, resolve

    assert {"aqe", "alpha_qe", "dba", "k_reciprocal", "csls", "domain_center",
            "tta"} <= set(rerankers.names())
    for name in rerankers.names():
        comp = rerankers.component(name)
        assert comp.summary and ("et al." in comp.doc or "Chum" in comp.doc
                                 or "centering" in comp.doc or "augmentation" in comp.doc)
    from pathlib import Path

    from zsbir.manifest import load

    base = load(Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml")
    m = resolve({**base, "rerankers": [{"name": "alpha_qe", "k": 3}, {"name": "csls"}]})
    assert [t["name"] for t in m.rerankers] == ["alpha_qe", "csls"]
    with pytest.raises(ManifestError, match=r"rerankers\[0\]\.k"):
        resolve({**base, "rerankers": [{"name": "alpha_qe", "k": 0}]})
    with pytest.raises(ManifestError, match="k_reciprocl"):
        resolve({**base, "rerankers": [{"name": "k_reciprocl"}]})


# ---------------------------------------------------------------------- in a run
def _tiny_experiment(tmp_path, rerank_tables):
    import json
    from pathlib import Path

    from zsbir.build import build
    from zsbir.manifest import apply_overrides, load, resolve

    raw = load(Path(__file__).resolve().parents[1] / "examples" / "quickstart.toml")
    raw = apply_overrides(raw, [
        "protocol.num_classes=6", "protocol.num_unseen=3", "protocol.photos_per_class=5",
        "protocol.sketches_per_class=4", "protocol.image_size=32", "data.image_size=32",
        "data.workers=0", "model.head.embed_dim=16", "evaluation.grid_queries=0",
        "evaluation.generalized=true", "hashers[1].bits=8",
        f"run.output_dir={json.dumps(str(tmp_path))}", "run.name=r"])
    raw["rerankers"] = rerank_tables
    return build(resolve(raw), "evaluate")


def test_evaluate_experiment_scores_every_reranker(tmp_path):
    from zsbir.engine.embed import embed_split
    from zsbir.engine.run import evaluate_experiment
    from zsbir.evaluation import evaluate_scores

    exp = _tiny_experiment(tmp_path, [{"name": "aqe", "k": 2}, {"name": "csls", "k": 3},
                                      {"name": "tta"}])
    model = exp.model
    res = evaluate_experiment(exp)
    assert exp.model is model  # the view wrapper is gone after embedding
    for task in ("synthetic", "synthetic-generalized"):
        per = res["results"][task]
        assert set(per) == {"real", "itq8", "real+aqe2", "real+csls3", "real+tta_hflip"}
        for entry in per.values():
            assert 0 <= entry["map@all"]["value"] <= 1
        assert f"{task} real+aqe2" in res["seconds"]["rerankers"]
    assert [n for n in res["notes"] if "itq8" in n] == [
        "rerankers skipped on binary hasher itq8: they re-rank real-valued embeddings"]

    # the same figures computed independently: plain and flipped embeddings by hand
    q, q_kept, _ = embed_split(exp, exp.data.query)
    g, g_kept, _ = embed_split(exp, exp.data.gallery)
    ql, gl = exp.data.query.labels[q_kept], exp.data.gallery.labels[g_kept]

    class Flipped(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image, domain):
            return self.m(torch.flip(image, dims=[-1]), domain)

    exp.model = Flipped(model)
    qf, _, _ = embed_split(exp, exp.data.query)
    gf, _, _ = embed_split(exp, exp.data.gallery)
    exp.model = model
    metric = exp.manifest.evaluation.metrics[0]
    per = res["results"]["synthetic"]
    want = {
        "real+aqe2": ref.alpha_qe_ref(q, g, 2, 0.0),
        "real+csls3": ref.csls_ref(q, g, 3),
        "real+tta_hflip": ref.tta_ref(np.stack([q, qf], 1), np.stack([g, gf], 1)),
    }
    for key, scores in want.items():
        got = per[key][metric]["value"]
        assert got == pytest.approx(evaluate_scores(scores, ql, gl, [metric])
                                    .metrics[metric], abs=1e-6), key
    plain = evaluate_scores(ref._unit(q) @ ref._unit(g).T, ql, gl, [metric]).metrics[metric]
    assert per["real"][metric]["value"] == pytest.approx(plain, abs=1e-6)


def test_cli_evaluate_reranker(tmp_path):
    import json

    from click.testing import CliRunner

    from zsbir.cli import main

    q, g = _data(6, nq=30, ng=50)
    rng = np.random.default_rng(6)
    ql, gl = rng.integers(0, 3, 30), rng.integers(0, 3, 50)
    path = tmp_path / "f.npz"
    np.savez(path, query_features=q, query_labels=ql, gallery_features=g, gallery_labels=gl)
    res = CliRunner().invoke(main, ["evaluate", "--features", str(path), "--json",
                                    "--metric", "map@all", "--reranker", "alpha_qe:k=3,alpha=2",
                                    "--reranker", "csls"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    want = evaluate_scores(ref.alpha_qe_ref(q, g, 3, 2.0), ql, gl, ["map@all"])
    assert out["real+alpha_qe3"]["metrics"]["map@all"] == pytest.approx(
        want.metrics["map@all"], abs=1e-6)
    assert "real+csls10" in out
    bad = CliRunner().invoke(main, ["evaluate", "--features", str(path), "--reranker",
                                    "alpha_qe:k=0"])
    assert bad.exit_code == 2 and "alpha_qe.k: must be >= 1" in bad.output
    assert "Traceback" not in bad.output


def test_k_reciprocal_approximate_neighbours_match_exact_on_a_small_gallery():
    """faiss HNSW finds the exact neighbours of a 37-item gallery, so the approximate
    variant must then give the exact scores."""
    q, g = _data(7)
    exact = _build("k_reciprocal", k1=6, k2=3).fit(g).scores(q, g)
    approx_r = _build("k_reciprocal", k1=6, k2=3, approximate=True)
    assert approx_r.tag.endswith("_approx")
    np.testing.assert_allclose(approx_r.fit(g).scores(q, g), exact, atol=1e-5)
