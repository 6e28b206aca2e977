"""Pair scoring (issue 25, point 2): the ``pair_scorers`` kind and ``[pair_scorer]``, the
built-in ``maxsim`` against its naive reference, the core's batching (independent of block
size and composition), top-K re-scoring against a naive re-sort, per-item outputs
(``embed_outputs``), validation with key paths, and a tiny ``zsbir run`` + ``zsbir
evaluate RUN_DIR`` with exhaustive and top-K pair scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from zsbir.cli import main
from zsbir.evaluation import evaluate_score_fn
from zsbir.evaluation.reference import reference_evaluate
from zsbir.manifest import ManifestError, apply_overrides, load, resolve
from zsbir.pairs import PairBatcher, merged_scores, rescore_order, stable_topk
from zsbir.pairs.maxsim import MaxSim
from zsbir.pairs.reference import maxsim_ref, rescored_ranking_ref

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = [
    "protocol.num_classes=8", "protocol.num_unseen=3", "protocol.photos_per_class=6",
    "protocol.sketches_per_class=6", "protocol.image_size=64", "data.image_size=64",
    "data.workers=0", "model.head.embed_dim=16", "train.epochs=1", "train.batch_size=8",
    "sampler.sketches_per_batch=4", "train.log_every=1", "evaluation.grid_queries=0",
    "hashers[1].bits=8", "run.device=\"cpu\"",
]
PAIRS = {"name": "maxsim", "top_k": 5, "exhaustive": True, "batch_pairs": 7}


# ------------------------------------------------------------------------------ maxsim
@pytest.mark.parametrize(("normalize", "reduce"), [(True, "sum"), (False, "sum"),
                                                   (True, "mean")])
def test_maxsim_equals_the_naive_per_pair_reference(normalize, reduce):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(11, 5, 8)).astype(np.float32)
    d = rng.normal(size=(11, 7, 8)).astype(np.float32)
    s = MaxSim(normalize=normalize, reduce=reduce)
    got = s.score_pairs(s.prepare({"tokens": torch.from_numpy(q)}),
                        s.prepare({"tokens": torch.from_numpy(d)})).numpy()
    want = [maxsim_ref(q[i], d[i], normalize, reduce) for i in range(11)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_maxsim_takes_one_vector_as_one_token_and_refuses_other_shapes():
    rng = np.random.default_rng(1)
    q, d = rng.normal(size=(4, 6)), rng.normal(size=(4, 6))
    s = MaxSim()
    got = s.score_pairs(s.prepare({"tokens": torch.tensor(q)}),
                        s.prepare({"tokens": torch.tensor(d)}))
    cos = (q * d).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(d, axis=1)
    np.testing.assert_allclose(got.numpy(), cos, rtol=1e-5)
    with pytest.raises(ValueError, match="do not pair"):
        MaxSim().score_pairs({"tokens": torch.zeros(2, 3, 4)}, {"tokens": torch.zeros(2, 3, 5)})


# ---------------------------------------------------------------------------- batching
def _outputs(rng: np.random.Generator, n: int, t: int = 4, d: int = 6) -> dict[str, np.ndarray]:
    return {"tokens": rng.normal(size=(n, t, d)).astype(np.float32)}


def test_batching_is_independent_of_block_size_and_composition():
    rng = np.random.default_rng(2)
    q, g = _outputs(rng, 5), _outputs(rng, 9)
    naive = np.array([[maxsim_ref(q["tokens"][i], g["tokens"][j]) for j in range(9)]
                      for i in range(5)])
    qi, gi = np.repeat(np.arange(5), 9), np.tile(np.arange(9), 5)
    perm = rng.permutation(len(qi))
    for bp in (1, 3, 7, 9, 45, 10_000):  # 9: one query's whole row, as views
        b = PairBatcher(MaxSim(), q, g, batch_pairs=bp)
        np.testing.assert_allclose(b.score(qi, gi).reshape(5, 9), naive, rtol=1e-5, atol=1e-5)
        # another order of the same pairs: every pair keeps its score (bit for bit)
        ref = PairBatcher(MaxSim(), q, g, batch_pairs=1).score(qi, gi)
        np.testing.assert_array_equal(b.score(qi[perm], gi[perm]), ref[perm])
        np.testing.assert_allclose(b.rows(np.array([3, 0])).numpy(), naive[[3, 0]],
                                   rtol=1e-5, atol=1e-5)


def test_batcher_names_a_missing_output_and_a_bad_scorer():
    rng = np.random.default_rng(3)
    with pytest.raises(ValueError, match="'tokens'.*gallery side lacks"):
        PairBatcher(MaxSim(), _outputs(rng, 2), {"logits": np.zeros((2, 3), np.float32)})

    class Bad:
        tag, outputs = "bad", ("tokens",)

        def score_pairs(self, query, gallery):
            return torch.zeros(len(query["tokens"]) + 1)

    with pytest.raises(ValueError, match="'bad' returned"):
        PairBatcher(Bad(), _outputs(rng, 2), _outputs(rng, 2)).score([0], [1])


# ---------------------------------------------------------------------- top-K re-scoring
def _naive_topk(s: np.ndarray, k: int) -> np.ndarray:
    return np.array([sorted(range(len(r)), key=lambda j: (-float(r[j]), j))[:k] for r in s])


@pytest.mark.parametrize("k", [1, 4, 13, 40])
def test_stable_topk_equals_a_naive_sort_with_ties(k):
    rng = np.random.default_rng(4)
    s = np.round(rng.normal(size=(17, 40)), 1).astype(np.float32)  # many ties
    s[0, :] = 0.0
    s[1, ::2] = -0.0  # -0.0 ties with 0.0
    np.testing.assert_array_equal(stable_topk(s, k), _naive_topk(s, k))


@pytest.mark.parametrize("binary", [False, True])
def test_topk_rescoring_equals_a_naive_resort(binary):
    rng = np.random.default_rng(5)
    nq, ng, k = 12, 30, 8
    base = (-rng.integers(0, 6, size=(nq, ng)).astype(np.float32) if binary
            else rng.normal(size=(nq, ng)).astype(np.float32))
    pair = np.round(rng.normal(size=(nq, ng)), 1).astype(np.float32) * 50  # ties too
    top = stable_topk(base, k)
    got = pair[np.arange(nq)[:, None], top]
    merged = merged_scores(base, top, got)
    idx, sc = rescore_order(top, got)
    for i in range(nq):
        want = rescored_ranking_ref(base[i], pair[i], k)
        ranked = sorted(range(ng), key=lambda j: (-float(merged[i, j]), j))
        assert ranked == want
        assert idx[i].tolist() == want[:k]
        np.testing.assert_array_equal(sc[i], pair[i, want[:k]])
    # the project's metrics on the merged rows equal the per-query references on them
    ql, gl = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
    metrics = ["map@all", "p@5", "map@all-sklearn", "map@10"]
    res = evaluate_score_fn(lambda rows: merged[rows], ql, gl, metrics, chunk_size=5)
    ref = reference_evaluate(merged, ql, gl, metrics)
    for m in metrics:
        np.testing.assert_allclose(res.per_query[m], ref[m], atol=1e-12)


# --------------------------------------------------------------------------- manifest
def _raw(tmp_path: Path, pair: dict | None = PAIRS, extra: tuple[str, ...] = ()) -> dict:
    raw = apply_overrides(load(EXAMPLES / "quickstart.toml"),
                          [*TINY, f"run.output_dir={json.dumps(str(tmp_path))}",
                           "run.name=p", *extra])
    if pair is not None:
        raw["pair_scorer"] = dict(pair)
    return raw


def test_validation_refuses_bad_pair_scorer_values_with_key_paths(tmp_path):
    m = resolve(_raw(tmp_path))
    assert m.pair_scorer == {"name": "maxsim", "top_k": 5, "exhaustive": True,
                             "batch_pairs": 7, "output": "tokens", "normalize": True,
                             "reduce": "sum"}
    assert resolve(_raw(tmp_path, None)).pair_scorer is None
    assert resolve(_raw(tmp_path, {"name": "maxsim"})).pair_scorer["top_k"] == 0
    bad = {"name": "maxsim", "top_k": -1, "exhaustive": "yes", "batch_pairs": 0,
           "normalise": True, "model": "x"}
    with pytest.raises(ManifestError) as err:
        resolve(_raw(tmp_path, bad))
    paths = {p.path for p in err.value.problems}
    assert {"pair_scorer.top_k", "pair_scorer.exhaustive", "pair_scorer.batch_pairs",
            "pair_scorer.normalise", "pair_scorer.model"} <= paths, paths
    with pytest.raises(ManifestError, match=r"pair_scorer\.name.*maxsim"):
        resolve(_raw(tmp_path, {"name": "maxsimm"}))
    with pytest.raises(ManifestError, match=r"pair_scorer\.top_k.*got str"):
        resolve(_raw(tmp_path, {"name": "maxsim", "top_k": "5"}))


def test_zsbir_validate_reports_the_key_paths(tmp_path):
    from zsbir.manifest import dump_toml

    f = tmp_path / "m.toml"
    f.write_text(dump_toml(_raw(tmp_path, {"name": "maxsim", "top_k": 1.5,
                                           "batch_pairs": -3})))
    res = CliRunner().invoke(main, ["validate", str(f)])
    assert res.exit_code != 0
    assert "pair_scorer.top_k" in res.output and "pair_scorer.batch_pairs" in res.output
    assert "Traceback" not in res.output


# --------------------------------------------------------------------- per-item outputs
def test_a_scorer_reading_an_output_the_model_lacks_is_refused_before_training(tmp_path):
    from zsbir.build import BuildError, build

    m = resolve(_raw(tmp_path, {"name": "maxsim", "output": "nope", "top_k": 3}))
    with pytest.raises(BuildError, match=r"\[pair_scorer\] reads the model output 'nope', "
                                         r"which model 'backbone_head' does not give"):
        build(m, "train")
    f = tmp_path / "m.toml"
    from zsbir.manifest import dump_toml

    f.write_text(dump_toml(m.data))
    res = CliRunner().invoke(main, ["run", str(f)])
    assert res.exit_code == 1 and "reads the model output 'nope'" in res.output
    assert "Traceback" not in res.output


def test_embed_outputs_gives_every_output_once_and_names_a_missing_one(tmp_path):
    from zsbir.build import build
    from zsbir.engine.embed import embed_outputs, embed_split

    exp = build(resolve(_raw(tmp_path)), "evaluate")
    outs, kept, skipped = embed_outputs(exp, exp.data.gallery, ("embedding", "tokens"))
    assert set(outs) == {"embedding", "tokens"} and not skipped
    assert outs["tokens"].dtype == np.float32 and outs["tokens"].shape == (len(kept), 4, 512)
    emb, kept2, _ = embed_split(exp, exp.data.gallery)
    np.testing.assert_array_equal(emb, outs["embedding"])
    np.testing.assert_array_equal(kept, kept2)
    with pytest.raises(ValueError, match=r"model 'backbone_head' gives no output 'nope'"):
        embed_outputs(exp, exp.data.gallery, ("embedding", "nope"))


def test_tokens_are_the_backbones_unpooled_map_and_change_nothing_else(tmp_path):
    from zsbir.build import build

    exp = build(resolve(_raw(tmp_path)), "evaluate")
    model = exp.model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x, torch.zeros(2, dtype=torch.long))
        feats = model.backbone.model.forward_features(x)
        pooled = model.backbone(x)
    torch.testing.assert_close(out["features"], pooled)
    torch.testing.assert_close(out["tokens"], feats.flatten(2).transpose(1, 2))


# ------------------------------------------------------------------ run + evaluate RUN_DIR
@pytest.fixture(scope="module")
def pair_run(tmp_path_factory) -> tuple[Path, dict]:
    from zsbir.engine.run import run_experiment

    tmp = tmp_path_factory.mktemp("pair-runs")
    res = run_experiment(resolve(_raw(tmp)))
    return tmp / "p", res


def test_run_reports_exhaustive_and_topk_pair_scoring(pair_run):
    run_dir, res = pair_run
    task = res["results"]["synthetic"]
    assert {"real", "itq8", "real+maxsim@5", "itq8+maxsim@5", "maxsim-exhaustive"} == set(task)
    for key in ("real+maxsim@5", "maxsim-exhaustive"):
        assert set(task[key]) == {"map@all", "p@100", "map@all-sklearn"}
        assert task[key]["map@all"]["formula"] == task["real"]["map@all"]["formula"]
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["results"]["synthetic"]["maxsim-exhaustive"] == task["maxsim-exhaustive"]
    assert "synthetic maxsim-exhaustive" in saved["seconds"]["pair_scorer"]


def test_run_figures_equal_a_naive_recomputation(pair_run):
    """The exhaustive and top-K figures from the run equal those recomputed here from the
    final model's outputs with the naive references (per pair, per query)."""
    from zsbir.build import build
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.embed import embed_outputs

    run_dir, res = pair_run
    ckpt = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    exp = build(resolve(ckpt["manifest"]), "evaluate", checkpoint=ckpt)
    q, qk, _ = embed_outputs(exp, exp.data.query, ("embedding", "tokens"))
    g, gk, _ = embed_outputs(exp, exp.data.gallery, ("embedding", "tokens"))
    ql, gl = exp.data.query.labels[qk], exp.data.gallery.labels[gk]
    pair = np.array([[maxsim_ref(a, b) for b in g["tokens"]] for a in q["tokens"]])
    metrics = ["map@all", "p@100", "map@all-sklearn"]
    task = res["results"]["synthetic"]
    ref = reference_evaluate(pair.astype(np.float32), ql, gl, metrics)
    for m in metrics:
        assert task["maxsim-exhaustive"][m]["value"] == pytest.approx(ref[m].mean(), abs=1e-6)
    qn = q["embedding"] / np.linalg.norm(q["embedding"], axis=1, keepdims=True)
    gn = g["embedding"] / np.linalg.norm(g["embedding"], axis=1, keepdims=True)
    cos = qn @ gn.T
    ranks = np.zeros_like(cos)
    for i in range(len(cos)):
        order = rescored_ranking_ref(cos[i], pair[i], 5)
        ranks[i, order] = -np.arange(len(order))  # a score row with that exact ranking
    ref = reference_evaluate(ranks, ql, gl, ["map@all", "p@100"])
    for m in ("map@all", "p@100"):
        assert task["real+maxsim@5"][m]["value"] == pytest.approx(ref[m].mean(), abs=1e-5)


def test_evaluate_run_dir_gives_the_same_pair_figures(pair_run):
    run_dir, res = pair_run
    out = CliRunner().invoke(main, ["evaluate", str(run_dir)])
    assert out.exit_code == 0, out.output
    ev = json.loads((run_dir / "eval" / "synthetic" / "metrics.json").read_text())
    for key in ("real+maxsim@5", "itq8+maxsim@5", "maxsim-exhaustive"):
        for m, v in res["results"]["synthetic"][key].items():
            assert ev["results"]["synthetic"][key][m]["value"] == pytest.approx(
                v["value"], abs=1e-6), (key, m)
