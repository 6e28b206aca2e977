"""Generalized-retrieval rerankers (issue 29): the outputs contract (contract 3), the naive
references, and ``zsbir tune``'s choice on synthetic data where the right answer is known,
then end to end on a tiny trained run (tune -> manifest.resolved.toml -> evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from zsbir.engine.tune import GRIDS, choose, pseudo_folds, score_grid
from zsbir.registry import rerankers
from zsbir.rerankers import rerank_topk
from zsbir.rerankers.reference import seen_posterior_ref

FAMILIES = ("seen_suppress", "seen_gate", "seen_suppress_kr", "seen_gate_kr")


def _params(name: str) -> dict:
    p = {"gamma": 0.4, "temperature": 0.7}
    if "gate" in name:
        p.update(tau=0.45, width=0.08, beta=0.3)
    if "kr" in name:
        p.update(k1=5, k2=3)
    return p


@pytest.mark.parametrize("name", FAMILIES)
def test_equal_to_naive_reference_on_random_inputs(name):
    rng = np.random.default_rng(1)
    q, g = rng.normal(size=(7, 6)), rng.normal(size=(15, 6))
    lq, lg = 2 * rng.normal(size=(7, 4)), 2 * rng.normal(size=(15, 4))
    p = _params(name)
    r = rerankers.get(name)(**p, chunk_size=3)  # several query chunks
    r.fit(g.astype(np.float32), gallery_outputs={"logits": lg.astype(np.float32)})
    got = r.scores(q.astype(np.float32), g.astype(np.float32),
                   query_outputs={"logits": lq.astype(np.float32)})
    kr = (p.pop("k1"), p.pop("k2"), 0.3) if "kr" in name else None
    want = seen_posterior_ref(q, g, lq, lg, gated="gate" in name, kr=kr, **p)
    np.testing.assert_allclose(got, want, atol=2e-5)  # float32 against float64
    # rerank_topk passes the outputs through and agrees with the full matrix
    s, idx = rerank_topk(rerankers.get(name)(**_params(name)), q.astype(np.float32),
                         g.astype(np.float32), 4, query_outputs={"logits": lq},
                         gallery_outputs={"logits": lg})
    np.testing.assert_allclose(s, np.sort(want, axis=1)[:, ::-1][:, :4], atol=2e-5)
    assert (np.take_along_axis(want, idx, 1) == np.sort(want, 1)[:, ::-1][:, :4]).all() or \
        np.allclose(np.take_along_axis(want, idx, 1), np.sort(want, 1)[:, ::-1][:, :4],
                    atol=2e-5)


def test_outputs_errors_name_the_output_and_the_reranker():
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(5, 4)).astype(np.float32)
    r = rerankers.get("seen_suppress")()
    with pytest.raises(ValueError, match=r"seen_suppress.*'logits' of the gallery"):
        r.fit(g)
    with pytest.raises(ValueError, match=r"gallery output 'logits' has \(4, 2\) rows"):
        r.fit(g, gallery_outputs={"logits": np.zeros((4, 2), np.float32)})
    bad = np.zeros((5, 2), np.float32)
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        r.fit(g, gallery_outputs={"logits": bad})
    r.fit(g, gallery_outputs={"logits": np.zeros((5, 2), np.float32)})
    with pytest.raises(ValueError, match=r"'logits' of the query"):
        r.scores(q, g)
    with pytest.raises(ValueError, match="query logits have 3 classes"):
        r.scores(q, g, query_outputs={"logits": np.zeros((3, 3), np.float32)})
    # a reranker without outputs ignores them
    plain = rerankers.get("aqe")(k=2)
    plain.fit(g, gallery_outputs={"logits": np.zeros((1, 1))})


def test_calibrated_stacking_lowers_confident_gallery_items_only():
    """gamma sigma(g): with a uniform posterior (sigma = 1/C for every item) the ranking is
    the cosine's; a confident item falls by gamma (1 - 1/C) relative to an unsure one."""
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ \
        (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    z = np.zeros((6, 5), np.float32)
    r = rerankers.get("seen_suppress")(gamma=0.5).fit(g, gallery_outputs={"logits": z})
    s = r.scores(q, g, query_outputs={"logits": np.zeros((4, 5), np.float32)})
    np.testing.assert_allclose(s, cos - 0.5 / 5, atol=1e-6)
    z[2, 0] = 50.0  # item 2: sure it is seen class 0
    r.fit(g, gallery_outputs={"logits": z})
    s2 = r.scores(q, g, query_outputs={"logits": np.zeros((4, 5), np.float32)})
    np.testing.assert_allclose(s2[:, 2], cos[:, 2] - 0.5, atol=1e-5)


def test_gate_spares_a_query_the_classifier_knows():
    """A sketch the classifier is sure of (sigma(q) -> 1 > tau) gets u(q) -> 0: no
    suppression (its own seen class's photos stay), plus beta times the class agreement."""
    rng = np.random.default_rng(0)
    q, g = rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    zg = np.zeros((6, 3), np.float32)
    zg[:3, 1] = 40.0  # photos 0-2: surely seen class 1
    zq = np.zeros((2, 3), np.float32)
    zq[0, 1] = 40.0  # query 0: surely seen class 1; query 1: unsure (uniform)
    r = rerankers.get("seen_gate")(gamma=0.5, tau=0.6, width=0.01, beta=0.0)
    r.fit(g, gallery_outputs={"logits": zg})
    s = r.scores(q, g, query_outputs={"logits": zq})
    cos = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ \
        (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    np.testing.assert_allclose(s[0], cos[0], atol=1e-5)  # seen query: untouched
    np.testing.assert_allclose(s[1, :3], cos[1, :3] - 0.5, atol=1e-4)  # unseen: suppressed
    r.beta = 0.2
    s = r.scores(q, g, query_outputs={"logits": zq})
    np.testing.assert_allclose(s[0, :3], cos[0, :3] + 0.2, atol=1e-5)


# ---------------------------------------------------------------------------- tune
def test_pseudo_folds_partition_the_seen_classes():
    f = pseudo_folds(10, 3, seed=4)
    assert sorted(np.concatenate(f).tolist()) == list(range(10))
    assert [len(x) for x in f] == [4, 3, 3]
    assert [x.tolist() for x in f] == [x.tolist() for x in pseudo_folds(10, 3, seed=4)]
    with pytest.raises(ValueError, match="folds"):
        pseudo_folds(5, 1, 0)


def _task(rng: np.random.Generator, informative: bool, seen_queries: bool = False) -> dict:
    """A fold where seen-class photos crowd every unseen sketch's ranking: 3 pseudo-unseen
    classes (4 sketches, 3 photos each) and 4 pseudo-seen ones (8 photos each) that sit
    nearer the sketches than their own photos are. ``informative``: the classifier is sure of
    the seen photos (and sketches) and unsure of the unseen ones; else every logit is 0."""
    d, hub = 16, np.eye(16)[0]
    mu = np.eye(16)[1:8]
    def items(c: int, n: int, toward_hub: float) -> np.ndarray:
        return toward_hub * hub + mu[c] + 0.05 * rng.normal(size=(n, d))
    q = np.concatenate([items(c, 4, 2.0) for c in range(3)])
    gu = np.concatenate([items(c, 3, 0.4) for c in range(3)])
    gs = np.concatenate([items(c, 8, 2.0) for c in range(3, 7)])
    s = np.concatenate([items(c, 2, 2.0) for c in range(3, 7)])
    def logits(labels: np.ndarray, seen: bool) -> np.ndarray:
        z = np.zeros((len(labels), 4))
        if informative and seen:
            z[np.arange(len(labels)), labels - 3] = 10.0
        return z
    lq, lu = np.repeat(np.arange(3), 4), np.repeat(np.arange(3), 3)
    ls, lss = np.repeat(np.arange(3, 7), 8), np.repeat(np.arange(3, 7), 2)
    return {"q": q, "lq": lq, "zq": logits(lq, False),
            "g": np.concatenate([gu, gs]), "lg": np.concatenate([lu, ls]),
            "zg": np.concatenate([logits(lu, False), logits(ls, True)]),
            "n_unseen_gallery": len(gu), "s": s, "ls": lss, "zs": logits(lss, True)}


SMALL = {"gamma": [0.0, 0.1, 0.5, 1.0], "temperature": [1.0]}


def test_tune_finds_the_suppression_when_the_posterior_tells_seen_photos():
    rng = np.random.default_rng(0)
    tasks = [_task(rng, True) for _ in range(2)]
    scored = score_grid("seen_suppress", SMALL, tasks)
    best = choose("seen_suppress", scored, max_unseen_drop=0.0)
    plain = scored[0]
    assert plain["params"]["gamma"] == 0.0
    assert np.mean(plain["generalized"]) < 0.5  # the seen photos crowd the top
    assert best["params"]["gamma"] > 0
    # perfect suppression: generalized = the unseen-only figure
    assert np.mean(best["generalized"]) == pytest.approx(np.mean(best["unseen"]), abs=1e-9)
    # the chosen point's figure is the registered reranker's on that fold
    r = rerankers.get("seen_suppress")(**best["params"])
    t = tasks[0]
    r.fit(t["g"].astype(np.float32), gallery_outputs={"logits": t["zg"]})
    from zsbir.evaluation.ranking import evaluate_scores

    s = r.scores(t["q"].astype(np.float32), t["g"].astype(np.float32),
                 query_outputs={"logits": t["zq"]})
    assert evaluate_scores(s, t["lq"], t["lg"], ["map@all"]).metrics["map@all"] == \
        pytest.approx(best["generalized"][0], abs=1e-6)


def test_tune_keeps_gamma_zero_when_the_posterior_says_nothing():
    rng = np.random.default_rng(1)
    tasks = [_task(rng, False) for _ in range(2)]
    best = choose("seen_suppress", score_grid("seen_suppress", SMALL, tasks), 0.01)
    assert best["params"]["gamma"] == 0.0  # every point ties: the smallest correction


def test_tune_gate_spares_seen_queries():
    """With seen sketches among the queries the gated family must open the gate for the
    unseen sketches (unsure) and close it for the seen ones (sure): its objective beats
    plain suppression's, and the chosen tau lies between the two confidences."""
    rng = np.random.default_rng(2)
    tasks = [_task(rng, True, seen_queries=True) for _ in range(2)]
    grid = {"gamma": [0.0, 1.5], "temperature": [1.0], "tau": [0.1, 0.5, 0.99],
            "width": [0.01], "beta": [0.0]}
    best = choose("seen_gate", score_grid("seen_gate", grid, tasks), 0.01)
    assert best["params"]["gamma"] == 1.5 and best["params"]["tau"] == 0.5
    # tau = 2 > any confidence: the gate always open, i.e. plain calibrated stacking
    ungated = [e for e in score_grid("seen_gate", {**grid, "tau": [2.0]}, tasks)
               if e["params"]["gamma"] == 1.5][0]
    plain = 0.5 * (np.mean(ungated["generalized"]) + np.mean(ungated["seen_queries"]))
    assert best["objective"] > plain + 0.05


def test_choose_respects_the_unseen_drop():
    def entry(gamma, gen, unseen):
        return {"params": {"gamma": gamma}, "generalized": [gen], "unseen": [unseen],
                "seen_queries": []}
    scored = [entry(0.0, 0.10, 0.30), entry(0.1, 0.15, 0.295), entry(0.5, 0.25, 0.20)]
    assert choose("seen_suppress", scored, 0.01)["params"]["gamma"] == 0.1
    assert choose("seen_suppress", scored, 0.2)["params"]["gamma"] == 0.5
    assert choose("seen_suppress", scored, 0.0)["params"]["gamma"] == 0.0


def test_default_grids_name_only_parameters_of_their_reranker():
    import inspect

    for fam, grid in GRIDS.items():
        sig = inspect.signature(rerankers.get(fam)).parameters
        assert set(grid) <= set(sig), fam
        assert 0.0 in grid["gamma"], fam  # the uncorrected ranking is a candidate


# ---------------------------------------------------------------------------- end to end
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = [
    "protocol.num_classes=10", "protocol.num_unseen=3", "protocol.photos_per_class=6",
    "protocol.sketches_per_class=6", "protocol.image_size=32", "data.image_size=32",
    "data.workers=0", "model.head.embed_dim=16", "train.epochs=1", "train.batch_size=8",
    "sampler.sketches_per_batch=4", "evaluation.grid_queries=0", "protocol.val_fraction=0.34",
    "run.device=\"cpu\"", "hashers=[{name=\"none\"}]",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from zsbir.engine.run import run_experiment
    from zsbir.manifest import apply_overrides, load, resolve

    tmp = tmp_path_factory.mktemp("runs")
    raw = apply_overrides(load(EXAMPLES / "quickstart.toml"),
                          TINY + [f"run.output_dir={json.dumps(str(tmp))}", "run.name=t"])
    run_experiment(resolve(raw))
    return tmp / "t"


def test_tune_writes_the_choice_and_evaluate_scores_it(run_dir):
    from zsbir.cli import main
    from zsbir.manifest import load

    res = CliRunner().invoke(main, ["tune", str(run_dir), "--reranker", "seen_suppress",
                                    "--reranker", "seen_gate", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "nothing written" in res.output and not (run_dir / "tune.json").exists()
    res = CliRunner().invoke(main, ["tune", str(run_dir), "--reranker", "seen_suppress",
                                    "--reranker", "seen_gate", "--json"])
    assert res.exit_code == 0, res.output
    chosen = json.loads(res.output)
    record = json.loads((run_dir / "tune.json").read_text())
    assert record["chosen"] == chosen
    # 7 seen classes; folds of seen classes only, disjoint, the unseen ones never in them
    assert sorted(sum(record["folds"], [])) == list(range(7))
    assert all(n == len(GRIDS[f]["gamma"]) * len(GRIDS[f]["temperature"]) *
               (6 if "gate" in f else 1) for f, n in
               ((f, len(v["points"])) for f, v in record["families"].items()))
    tables = {t["name"]: t for t in load(run_dir / "manifest.resolved.toml")["rerankers"]}
    for fam, params in chosen.items():
        assert {k: tables[fam][k] for k in params} == params
    res = CliRunner().invoke(main, ["evaluate", str(run_dir), "--set",
                                    "evaluation.generalized=true", "--json"])
    assert res.exit_code == 0, res.output
    ev = json.loads((run_dir / "eval" / "synthetic" / "metrics.json").read_text())
    keys = set(ev["results"]["synthetic-generalized"])
    tag = rerankers.get("seen_suppress")(**chosen["seen_suppress"]).tag
    assert f"real+{tag}" in keys and any(k.startswith("real+seen_gate") for k in keys)
    assert ev["evaluated"]["rerankers_from"].endswith("(zsbir tune)")


def test_tune_refuses_a_folder_without_final_pt(tmp_path):
    from zsbir.cli import main

    res = CliRunner().invoke(main, ["tune", str(tmp_path)])
    assert res.exit_code != 0 and "final.pt" in res.output
    assert "Traceback" not in res.output


def test_evaluate_hands_the_logits_to_the_reranker(run_dir, monkeypatch):
    """Evaluation computes the logits in the embedding pass and hands them over aligned
    with the rows: what a reranker receives equals the model's own logits."""
    from zsbir.build import build
    from zsbir.engine.checkpoint import load_checkpoint
    from zsbir.engine.embed import embed_outputs
    from zsbir.engine.evaluate import evaluate_experiment
    from zsbir.engine.evaluate_run import _manifest_for
    from zsbir.rerankers.seen import SeenPosterior

    ckpt = load_checkpoint(run_dir / "checkpoints" / "final.pt")
    m = _manifest_for(ckpt, None, None, ['rerankers=[{name="seen_suppress", gamma=0.2}]',
                                         "evaluation.grid_queries=0"], "t")
    exp = build(m, "evaluate", checkpoint=ckpt)
    exp.model.eval()
    got: dict = {}
    real_fit = SeenPosterior.fit

    def spy(self, gallery, queries=None, **kw):
        got["gallery"], got["logits"] = gallery, kw["gallery_outputs"]["logits"]
        return real_fit(self, gallery, queries, **kw)

    monkeypatch.setattr(SeenPosterior, "fit", spy)
    res = evaluate_experiment(exp, None)
    assert "real+seen_suppress_g0.2" in res["results"]["synthetic"]
    out, _, _ = embed_outputs(exp, exp.data.gallery, ("embedding", "logits"))
    np.testing.assert_allclose(got["logits"], out["logits"], atol=1e-5)
    unit = out["embedding"] / np.linalg.norm(out["embedding"], axis=1, keepdims=True)
    np.testing.assert_allclose(got["gallery"] / np.linalg.norm(got["gallery"], axis=1,
                                                                keepdims=True), unit, atol=1e-5)


def test_fast_map_equals_the_evaluators_map_at_all():
    from zsbir.engine.tune import _map
    from zsbir.evaluation.ranking import evaluate_scores

    rng = np.random.default_rng(3)
    for _ in range(3):
        s = rng.normal(size=(20, 90)).astype(np.float32)
        ql, gl = rng.integers(0, 6, 20), rng.integers(0, 8, 90)
        want = evaluate_scores(s, ql, gl, ["map@all"]).metrics["map@all"]
        assert _map(torch.from_numpy(s), ql, gl) == pytest.approx(want, abs=1e-9)


def _folder_and_sketch(tmp_path: Path) -> tuple[Path, Path]:
    """A photo folder of 3 synthetic classes x 4 photos, and a sketch of class 1."""
    from PIL import Image

    from zsbir.data.synthetic import render

    photos = tmp_path / "photos"
    for c in range(3):
        (photos / f"c{c}").mkdir(parents=True)
        for i in range(4):
            Image.fromarray(render(c, 0, i, 3, 32)).save(photos / f"c{c}" / f"{i}.png")
    sketch = tmp_path / "s.png"
    Image.fromarray(render(1, 1, 0, 7, 32)).save(sketch)
    return photos, sketch


def test_search_reranks_with_the_stored_logits(run_dir, tmp_path):
    """``zsbir search --rerank seen_gate:...`` reads the photos' stored logits and the
    sketch's from its forward pass: the same ranking as the reranker on those arrays; an
    index without stored logits is refused with the command that builds one."""
    from zsbir.cli import main
    from zsbir.search import store
    from zsbir.search.api import Index
    from zsbir.search.errors import SearchError

    photos, sketch = _folder_and_sketch(tmp_path)
    final = run_dir / "checkpoints" / "final.pt"  # the checkpoint alone: no tuned tables
    for name, extra in (("with", ["--outputs", "logits"]), ("without", [])):
        res = CliRunner().invoke(main, ["index", "build", str(final), str(photos),
                                        str(tmp_path / name), "--workers", "0", "--device",
                                        "cpu", *extra])
        assert res.exit_code == 0, res.output
    spec = "seen_gate:gamma=0.3,tau=0.6,width=0.1,beta=0.2"
    with Index.open(tmp_path / "with", "cpu") as idx:
        got = idx.search(sketch, top=5, rerank=spec)
        q = idx.query_outputs([sketch], ("logits",))
        g = store.gallery_embeddings(idx._con, idx._fx.ids)
        zg = idx.outputs("logits", idx._fx.ids)
        r = rerankers.get("seen_gate")(gamma=0.3, tau=0.6, width=0.1, beta=0.2)
        scores, order = rerank_topk(r, q["embedding"], g, 5,
                                    query_outputs={"logits": q["logits"]},
                                    gallery_outputs={"logits": zg})
        assert [x.path for x in got] == [str(photos / idx._fx.paths[j]) for j in order[0]]
        np.testing.assert_allclose([x.score for x in got], scores[0], atol=1e-5)
    with Index.open(tmp_path / "without", "cpu") as idx:
        with pytest.raises(SearchError, match="--outputs logits"):
            idx.search(sketch, rerank="seen_suppress")
    res = CliRunner().invoke(main, ["search", str(tmp_path / "with"), str(sketch),
                                    "--rerank", spec, "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_ceiling_auroc_equals_brute_force_pair_counting():
    """benchmarks/real_sketchy_mini.py's AUROC (the seen-class detector diagnostic of the
    generalized task): P(positive > negative) + half the ties, against every pair counted."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "real_sketchy_mini.py"
    spec = importlib.util.spec_from_file_location("real_sketchy_mini_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    for _ in range(5):
        pos = rng.integers(0, 8, rng.integers(1, 40)).astype(float)  # ties on purpose
        neg = rng.integers(0, 8, rng.integers(1, 40)).astype(float)
        naive = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
        assert mod._auroc(pos, neg) == pytest.approx(naive, abs=1e-12)
    assert mod._auroc(np.array([1.0, 2.0]), np.array([0.0])) == 1.0


def test_the_index_searches_with_the_values_zsbir_tune_chose(run_dir, tmp_path):
    """`zsbir tune` writes its choice into RUN_DIR/manifest.resolved.toml, not into the
    checkpoint: an index built from RUN_DIR records those tables (and stores the logits
    they read without --outputs), so a bare `--rerank seen_suppress` uses the tuned
    values; `zsbir index update` takes a later choice."""
    from zsbir.cli import main
    from zsbir.engine.tune import write_choice
    from zsbir.search.api import Index

    photos, sketch = _folder_and_sketch(tmp_path)
    write_choice(run_dir, {"seen_suppress": {"gamma": 5.0, "temperature": 0.5}})
    res = CliRunner().invoke(main, ["index", "build", str(run_dir), str(photos),
                                    str(tmp_path / "idx"), "--workers", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output

    def ranking(idx, spec):
        return [(x.path, round(x.score, 5)) for x in idx.search(sketch, top=12, rerank=spec)]

    with Index.open(tmp_path / "idx", "cpu") as idx:
        assert "logits" in idx.output_names
        tuned = ranking(idx, "seen_suppress")
        assert tuned == ranking(idx, "seen_suppress:gamma=5.0,temperature=0.5")
        assert tuned != ranking(idx, "seen_suppress:gamma=0.0")  # the values matter here
    write_choice(run_dir, {"seen_suppress": {"gamma": 0.0, "temperature": 0.5}})
    res = CliRunner().invoke(main, ["index", "update", str(tmp_path / "idx"), "--workers", "0",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with Index.open(tmp_path / "idx", "cpu") as idx:
        assert ranking(idx, "seen_suppress") == ranking(idx, "seen_suppress:gamma=0.0")
