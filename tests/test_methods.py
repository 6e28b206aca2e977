"""The method manifests (SAKE, SBTKNet) run end to end on the synthetic protocol at a small
image size, with ImageNet-shaped weights read from a local file (random values: no
download ever), and the teacher strategies are interchangeable between them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from zsbir.engine.run import run_experiment
from zsbir.manifest import apply_overrides, load, resolve

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

SMALL = {"name": "synthetic", "num_classes": 8, "num_unseen": 3, "photos_per_class": 6,
         "sketches_per_class": 6, "image_size": 32, "seed": 0}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("weights")
    files = {}
    for name in ("legacy_seresnet50", "resnet50"):
        torch.manual_seed(0)
        path = out / f"{name}.pth"
        torch.save(timm.create_model(name).state_dict(), path)
        files[name] = str(path)
    return files


def smoke(manifest: str, tmp_path: Path, weights_file: str, extra: list[str] = ()) -> dict:
    raw = load(EXAMPLES / manifest)
    raw["protocol"] = dict(SMALL)
    raw = apply_overrides(raw, [
        f"run.output_dir={json.dumps(str(tmp_path))}", "data.image_size=32", "data.workers=0",
        "train.epochs=1", "train.max_steps_per_epoch=2", "evaluation.grid_queries=0",
        f"backbone.weights={json.dumps(weights_file)}", "hashers[1].bits=16", *extra])
    m = resolve(raw, manifest)
    results = run_experiment(m)
    for per_hasher in results["results"].values():
        for entry in per_hasher.values():
            assert all(0.0 <= v["value"] <= 1.0 for v in entry.values())
    assert results["train"]["global_steps"] == 2
    return results


@pytest.mark.slow
def test_sake_manifest_smoke(tmp_path, weights):
    res = smoke("sake_tuberlin.toml", tmp_path, weights["legacy_seresnet50"],
                ["train.batch_size=8", "sampler.sketches_per_batch=3"])
    assert set(res["results"]) == {"synthetic", "synthetic-pbir"}
    assert res["train"]["history"][0]["loss"]["sake"] > 0


@pytest.mark.slow
def test_sbtknet_manifest_smoke(tmp_path, weights):
    res = smoke("sbtknet_sketchy.toml", tmp_path, weights["resnet50"], ["train.batch_size=8"])
    assert set(res["results"]) == {"synthetic", "synthetic-generalized"}
    loss = res["train"]["history"][0]["loss"]
    assert {"domain_quadruplet", "ce", "knowledge_preservation"} <= set(loss)


def test_teachers_are_interchangeable():
    """A SAKE network with the offline teacher, and SBTKNet with the online one, validate."""
    sake = load(EXAMPLES / "sake_tuberlin.toml")
    sake["teacher"] = {"name": "class_mean"}
    sake["protocol"]["root"] = str(EXAMPLES)  # validation checks the dataset root exists
    resolve(sake)
    sbt = load(EXAMPLES / "sbtknet_tuberlin.toml")
    sbt["teacher"] = {"name": "online"}
    sbt["protocol"]["root"] = str(EXAMPLES)
    resolve(sbt)
