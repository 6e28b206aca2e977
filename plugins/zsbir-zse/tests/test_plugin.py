"""The plugin as users meet it: entry points, the contract suite, the example manifests,
and a real `zsbir run` of the tiny example (train with the pair step, evaluate by the
retrieval token, by top-K re-scoring and exhaustively by the relation network), then
`zsbir evaluate RUN_DIR`, `zsbir index build` and `zsbir search --pair-scorer`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("zsbir_zse", reason="install the plugin: pip install -e plugins/zsbir-zse")

from zsbir.cli import main  # noqa: E402
from zsbir.constraints import paths_unchecked  # noqa: E402
from zsbir.manifest import load, resolve  # noqa: E402
from zsbir.testing import (  # noqa: E402
    assert_contract,
    assert_core_never_names,
    assert_registered_by,
    contract_cases,
)

PLUGIN = Path(__file__).resolve().parents[1]
TINY = PLUGIN / "examples" / "tiny_zse.toml"
PAPER = sorted(p for p in (PLUGIN / "examples").glob("zse_*.toml"))
DIST = "zsbir-zse"
COMPONENTS = {
    ("models", "zse"): "zsbir_zse.model:ZseModel",
    ("samplers", "zse"): "zsbir_zse.training:ZseSampler",
    ("steps", "zse_pairs"): "zsbir_zse.training:ZsePairStep",
    ("losses", "zse_triplet"): "zsbir_zse.training:ZseTripletLoss",
    ("losses", "zse_relation"): "zsbir_zse.training:ZseRelationLoss",
    ("pair_scorers", "zse_rn"): "zsbir_zse.scorer:ZseRelationScorer",
    ("importers", "zse"): "zsbir_zse.importer:ZseImporter",
}


def test_registered_only_through_entry_points():
    for comp in assert_registered_by(DIST, COMPONENTS).values():
        assert comp.summary


def test_no_file_of_zsbir_names_the_plugin():
    assert_core_never_names(DIST)


@pytest.mark.parametrize(("kind", "name"), contract_cases(dist=DIST))
def test_contract(kind, name):
    assert_contract(kind, name)


def test_paper_examples_are_the_four_settings():
    assert [p.name for p in PAPER] == ["zse_quickdraw.toml", "zse_sketchy_sh.toml",
                                       "zse_sketchy_ye.toml", "zse_tuberlin.toml"]


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_paper_examples_validate_with_the_paper_settings(path):
    raw = load(path)
    raw["protocol"]["root"] = str(path.parent)  # the datasets are not on this machine
    with paths_unchecked():  # the weights files are the user's
        m = resolve(raw, str(path))
    assert m.model["name"] == "zse" and m.model["anchors"] == 49 and m.model["depth"] == 12
    assert m.model["vit_weights"].endswith("sam_ViT-B_16.pth")
    assert {(t["name"], t["weight"]) for t in m.losses} == {("zse_triplet", 2.0),
                                                           ("zse_relation", 4.0)}
    assert m.sampler["name"] == "zse" and m.sampler["tuples_per_epoch"] == 10000
    assert m.train.batch_size == 60 and m.train.epochs == 30  # 15 tuples of 4 images
    assert (m.optimizer["name"], m.optimizer["lr"], m.optimizer["weight_decay"]) == (
        "adamw", 1e-5, 1e-2)
    assert m.pair_scorer["name"] == "zse_rn" and m.pair_scorer["exhaustive"]
    text = path.read_text()
    assert "Paper reports" in text


def test_validate_refuses_a_missing_weights_file(tmp_path):
    raw = load(TINY)
    raw["model"]["checkpoint"] = str(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"model.checkpoint"):
        resolve(raw, str(TINY))


def _run(tmp_path: Path) -> Path:
    result = CliRunner().invoke(main, ["run", str(TINY), "--set",
                                       f"run.output_dir={json.dumps(str(tmp_path))}", "-q"])
    assert result.exit_code == 0, result.output
    return tmp_path / "tiny_zse"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return _run(tmp_path_factory.mktemp("zse-run"))


def test_run_reports_the_three_rankings(run_dir):
    res = json.loads((run_dir / "metrics.json").read_text())["results"]["synthetic"]
    assert set(res) == {"real", "real+zse_rn@4", "zse_rn-exhaustive"}
    for entry in res.values():
        assert 0 <= entry["map@all"]["value"] <= 1
        assert "utils/ap.py" in entry["p@100-zse"]["formula"]
    log = (run_dir / "train_log.jsonl")
    if log.exists():
        assert "zse_triplet" in log.read_text() and "zse_relation" in log.read_text()


def test_evaluate_run_dir_gives_the_same_figures(run_dir):
    result = CliRunner().invoke(main, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    first = json.loads((run_dir / "metrics.json").read_text())["results"]["synthetic"]
    again = json.loads(next((run_dir / "eval").rglob("metrics.json")).read_text())
    again = again["results"]["synthetic"]
    for key in ("real", "real+zse_rn@4", "zse_rn-exhaustive"):
        assert again[key]["map@all"]["value"] == pytest.approx(first[key]["map@all"]["value"])


def _photos(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ant", "bee"):
        (root / "photos" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                root / "photos" / c / f"{i}.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "q.png")
    return root / "photos"


def test_index_and_search_rescore_the_top_k_with_the_relation_network(run_dir, tmp_path):
    from zsbir.search.api import Index

    photos = _photos(tmp_path)
    idx_dir = tmp_path / "idx"
    r = CliRunner().invoke(main, ["index", "build", str(run_dir), str(photos), str(idx_dir),
                                  "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["search", str(idx_dir), str(tmp_path / "q.png"), "--top",
                                  "6", "--pair-scorer", "zse_rn", "--top-k", "4", "--json",
                                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    results = json.loads(r.output)["queries"][0]["results"]
    scored = [x["pair_score"] for x in results[:4]]
    assert all(s is not None for s in scored) and scored == sorted(scored, reverse=True)
    assert all(x.get("pair_score") is None for x in results[4:])
    # each pair score is the relation network on the stored tokens, one pair at a time
    with Index.open(idx_dir, "cpu") as idx:
        assert "tokens" in idx.output_names
        scorer = idx.pair_scorer("zse_rn")
        model = scorer.model
        q = idx.query_outputs([idx.query_image(str(tmp_path / "q.png"))], ["tokens"])
        ids = np.array([x["id"] for x in results[:4]])
        g = torch.from_numpy(idx.outputs("tokens", ids)).float()
        qt = torch.from_numpy(q["tokens"]).float()
        with torch.no_grad():
            for i, want in enumerate(scored):
                s_out, p_out = model.cross(qt[:1], g[i:i + 1])
                assert float(model.relation_score(s_out, p_out)[0]) == pytest.approx(
                    want, abs=1e-5)
